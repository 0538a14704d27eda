"""Serving from expert-sharded ranks (``sparseek.parallel.serving``): a follower engine fed rank 0's
messages runs the same steps on the same requests and so produces the same tokens (unseeded
sampling, n > 1, stop strings, aborts, failed steps included); ``torchrun ... serve`` answers the
OpenAI API with one process's tokens."""

from __future__ import annotations

import asyncio
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

import sparseek
from sparseek.engine import LLM, SamplingParams
from sparseek.engine.async_engine import AsyncEngine, EngineError
from sparseek.model import build_model
from sparseek.parallel.serving import Leader, follow
from sparseek.tokenizer import default_tokenizer
from tests.conftest import randomize_


def _llm(**kw):
    model = randomize_(build_model(sparseek.preset("debug")), 21).eval()
    return LLM(model, default_tokenizer(512), max_batch_size=2, max_seq_len=256, **kw)  # requests wait for slots


class _Pair:
    """Rank 0's engine with a ``Leader`` and a follower engine in a thread, joined by a queue."""

    def __init__(self, **kw):
        self.channel: queue.SimpleQueue = queue.SimpleQueue()
        self.engine = AsyncEngine(_llm(**kw), mirror=Leader(self.channel.put))
        self.follower = _llm(**kw)
        self.seen: dict[int, dict[int, list[int]]] = {}  # rid -> sample -> tokens
        self.finish: dict[int, dict[int, str]] = {}
        self.thread = threading.Thread(target=follow, args=(self.follower, self.channel.get, self._publish))

    def _publish(self, rid, seq):
        self.seen.setdefault(rid, {})[seq.out.sample] = list(seq.out.token_ids)
        self.finish.setdefault(rid, {})[seq.out.sample] = seq.out.finish_reason

    def caught_up(self, count: int) -> None:
        """Wait until the follower has finished ``count`` requests (it runs behind rank 0)."""
        deadline = time.time() + 30
        while time.time() < deadline:
            done = [r for r, f in list(self.finish.items()) if all(v is not None for v in f.values())]
            if len(done) >= count:
                return
            time.sleep(0.02)
        raise AssertionError(f"the follower finished {len(done)} of {count} requests")

    def __enter__(self):
        self.thread.start()
        self.engine.start()
        return self

    def __exit__(self, *exc):
        self.engine.shutdown()
        self.thread.join(30)
        assert not self.thread.is_alive()  # the follower ends when rank 0 stops


async def _collect(req, stop_after: int | None = None):
    got: dict[int, list[int]] = {}
    n = 0
    async for d in req:
        got.setdefault(d.sample, []).extend(d.token_ids)
        n += 1
        if stop_after is not None and n == stop_after:
            break  # the reader goes away: the request is aborted
    return got


def _ask(engine, prompt, params):
    """Submit from inside an event loop (as a server does) and read the whole answer."""
    async def run():
        return await _collect(engine.submit(prompt, params))
    return asyncio.run(run())


def _wait_idle(engine):
    deadline = time.time() + 20
    while engine.load["in_flight"] and time.time() < deadline:
        time.sleep(0.02)


def test_follower_runs_rank_0_s_requests_to_the_same_tokens():
    plain = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    with _Pair() as p:
        async def run():
            reqs = [p.engine.submit("x = [", plain),
                    p.engine.submit("def f(", SamplingParams(max_tokens=12, temperature=1.0, n=2, ignore_eos=True)),
                    p.engine.submit([5, 9, 17], SamplingParams(max_tokens=30, temperature=0.8, stop=["e"], seed=3)),
                    p.engine.submit("import", SamplingParams(max_tokens=60, temperature=0, ignore_eos=True))]
            outs = await asyncio.gather(*[_collect(r, stop_after=3 if i == 3 else None) for i, r in enumerate(reqs)])
            return reqs, outs

        reqs, outs = asyncio.run(run())
        _wait_idle(p.engine)
        # one more request after the others: the follower's loop was idle and wakes with rank 0's
        later = _ask(p.engine, "y =", plain)
        p.caught_up(5)
        rids = [r.rid for r in reqs]
        assert len(set(rids)) == 4
        for r in reqs[:3]:
            assert p.finish[r.rid] == {s.out.sample: s.out.finish_reason for s in r._seqs}
            assert p.seen[r.rid] == {s.out.sample: s.out.token_ids for s in r._seqs}
        assert outs[1][0] != outs[1][1]  # unseeded samples differ from each other, yet agree across ranks
        aborted = reqs[3]._seqs[0].out
        assert aborted.finish_reason == "abort" and p.finish[reqs[3].rid][0] == "abort"
        assert p.seen[reqs[3].rid][0] == aborted.token_ids and len(aborted.token_ids) < 60
        assert later[0] == p.seen[max(p.seen)][0] == _llm().generate(["y ="], plain)[0].token_ids


def test_follower_runs_each_request_s_lora_adapter(tmp_path):
    """Requests naming LoRA adapters (``--lora-modules`` on every rank): the follower runs each with
    rank 0's adapter, to the same tokens."""
    from tests.model.test_multi_lora import _adapters

    dirs = _adapters(_llm().model, tmp_path, [("a", 4, ("wq_a", "experts")), ("b", 2, ("experts",))])
    params = {name: SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, lora=name) for name in ("a", "b", None)}
    with _Pair(lora_modules=dirs) as p:
        async def run():
            reqs = [p.engine.submit([5, 9, 17, 33, 2, 71], params[n]) for n in ("a", None, "b")]
            return reqs, await asyncio.gather(*[_collect(r) for r in reqs])

        reqs, outs = asyncio.run(run())
        p.caught_up(3)
        for r, out in zip(reqs, outs):
            assert p.seen[r.rid][0] == out[0]
        assert outs[0][0] != outs[1][0] and outs[2][0] != outs[1][0]  # the adapters were applied


def test_failed_steps_start_both_ranks_again():
    """A step failing on both ranks (a deterministic error) and a failure on rank 0 alone between
    steps: rank 0's requests fail with the error, both engines start again clean, and what
    follows agrees."""
    plain = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    want = _llm().generate(["a = 1"], plain)[0].token_ids
    with _Pair() as p:
        calls = {"n": 0}

        def failing(llm):
            real = llm._decode

            def decode(*a, **k):
                if getattr(llm, "fail_next", False):
                    llm.fail_next = False
                    raise RuntimeError("injected")
                return real(*a, **k)
            return decode

        for llm in (p.engine.llm, p.follower):
            llm._decode = failing(llm)
            llm.fail_next = True
        with pytest.raises(EngineError, match="injected"):
            _ask(p.engine, "a = 1", plain)
        assert _ask(p.engine, "a = 1", plain)[0] == want

        real_publish = p.engine._publish

        def publish(seq):
            if calls["n"] == 0:
                calls["n"] += 1
                raise RuntimeError("rank 0 only")
            real_publish(seq)
        p.engine._publish = publish
        with pytest.raises(EngineError, match="rank 0 only"):
            _ask(p.engine, "a = 1", plain)
        assert _ask(p.engine, "a = 1", plain)[0] == want
        p.caught_up(2)  # the two that succeeded (a failed request may stay unfinished on the follower)
        assert p.seen[max(p.seen)][0] == want


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_serve_answers_with_one_process_s_tokens(tmp_path):
    """Two ranks, each holding half of the experts, serve the OpenAI API: completions equal the
    single-process engine's (greedy and seeded, streamed and whole), and Ctrl-C stops every rank."""
    openai = pytest.importorskip("openai")
    port = _free_port()
    log = open(tmp_path / "serve.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", f"--master-port={_free_port()}",
         "-m", "sparseek.cli", "serve", "--model", "debug", "--port", str(port), "--max-seq-len", "256"],
        stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"}, start_new_session=True)
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)
        deadline = time.time() + 240
        while True:
            try:
                client.models.list()
                break
            except openai.APIConnectionError:
                if proc.poll() is not None or time.time() > deadline:
                    raise AssertionError((tmp_path / "serve.log").read_text()[-3000:])
                time.sleep(0.5)
        llm = LLM("debug", max_seq_len=256)
        for kw in ({"temperature": 0}, {"temperature": 1.0, "seed": 7}):
            want = llm.generate(["def f(x):"], SamplingParams(max_tokens=12, ignore_eos=True, **kw))[0].text
            whole = client.completions.create(model="debug", prompt="def f(x):", max_tokens=12,
                                              extra_body={"ignore_eos": True}, **kw)
            streamed = "".join(c.choices[0].text for c in client.completions.create(
                model="debug", prompt="def f(x):", max_tokens=12, stream=True, extra_body={"ignore_eos": True}, **kw))
            assert whole.choices[0].text == streamed == want, kw
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(60)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    text = (tmp_path / "serve.log").read_text()
    # rank 0 shut down cleanly and told rank 1, which ended without an error (torchrun itself
    # reports the Ctrl-C it received with a traceback of its own: not the ranks')
    assert "Finished server process" in text and "engine step failed" not in text, text[-3000:]
    assert "[rank1]: Traceback" not in text and "[rank0]: Traceback" not in text, text[-3000:]
    assert "can no longer be heard" not in text
