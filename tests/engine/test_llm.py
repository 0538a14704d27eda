"""The engine: continuous batching, sampling, stop strings, streaming, log-probabilities."""

from __future__ import annotations

import contextlib

import pytest
import torch

import sparseek
from sparseek.engine import LLM, SamplingParams
from sparseek.model import build_model
from sparseek.model.cache import Cache
from tests.conftest import randomize_, rel_err


PROMPTS = [[5, 9, 200], list(range(1, 40)), [7] * 70, [300, 2, 3, 4, 5, 6], list(range(100, 230))]


def _solo(model, tok, prompt, params):
    return LLM(model, tok, max_batch_size=1, max_seq_len=512).generate([prompt], params)[0]


@pytest.mark.parametrize("params", [
    SamplingParams(max_tokens=25, temperature=0, ignore_eos=True),
    SamplingParams(max_tokens=25, temperature=0.9, top_p=0.9, top_k=50, seed=3, ignore_eos=True),
])
def test_continuous_batching_gives_each_sequence_its_own_result(model, tok, params):
    # different max_tokens make sequences leave at different steps while others join
    per = [SamplingParams(**{**params.__dict__, "max_tokens": n}) for n in (25, 7, 18, 3, 25)]
    batched = LLM(model, tok, max_batch_size=2, max_seq_len=512).generate(PROMPTS, per)
    for p, sp, out in zip(PROMPTS, per, batched):
        alone = _solo(model, tok, p, sp)
        assert out.token_ids == alone.token_ids
        assert len(out.token_ids) == sp.max_tokens and out.finish_reason == "length"


@pytest.mark.parametrize("v3", [False, True])
def test_prompts_prefill_together_as_each_alone(model, tok, v3, monkeypatch):
    """Waiting prompts of different lengths prefill in shared forwards (several rows each, at
    most ``prefill_chunk`` tokens, crossing window, CSA and HCA boundaries), with the same first
    tokens and log-probabilities as each prompt alone, also where a shorter prompt reads junk to the
    end of a shared forward and rolls it back. Sequences that end at their first token
    hand their slot on; one that wants prompt log-probabilities waits for its own prefill; the
    rest decode on as if alone."""
    if v3:
        model = randomize_(build_model(sparseek.preset("debug-v3")), 5).eval()
    g = torch.Generator().manual_seed(4)
    lengths = (5, 40, 23, 40, 150, 12, 131, 9)
    prompts = [torch.randint(3, 500, (n,), generator=g).tolist() for n in lengths]
    per = [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True, logprobs=2) for n in (6, 1, 6, 6, 1, 6, 6, 6)]
    per[6] = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True, logprobs=2, prompt_logprobs=1)
    rows, junk = [], []
    forward, rollback = type(model).forward, Cache.rollback

    def spy(self, ids, *a, **kw):
        rows.append(ids.shape)
        return forward(self, ids, *a, **kw)
    monkeypatch.setattr(type(model), "forward", spy)
    monkeypatch.setattr(Cache, "rollback", lambda c, row, n, mtp=False: junk.append(n) or rollback(c, row, n, mtp))
    outs = LLM(model, tok, max_batch_size=6, max_seq_len=512, prefill_chunk=48).generate(prompts, per)
    assert any(b > 2 and t > 1 for b, t in rows) and all(b * t <= 48 or b == 1 for b, t in rows)
    assert any(n > 0 for n in junk)  # some prompts ended inside a forward and forgot the junk after them
    monkeypatch.setattr(type(model), "forward", forward)
    for p, sp, out in zip(prompts, per, outs):
        alone = LLM(model, tok, max_batch_size=1, max_seq_len=512).generate([p], sp)[0]
        assert out.token_ids == alone.token_ids and out.finish_reason == alone.finish_reason == "length"
        for got, want in zip(out.logprobs, alone.logprobs):
            assert got.keys() == want.keys()
            torch.testing.assert_close(torch.tensor(list(got.values())), torch.tensor(list(want.values())),
                                       rtol=0, atol=1e-4)
    assert outs[6].prompt_logprobs is not None and len(outs[6].prompt_logprobs) == lengths[6]


def test_shared_prefill_plan():
    """Each row reads its prompt (and, with a pad, at most that much junk in its last forward), the
    rows of a forward are a prefix (longest first), no forward passes the token budget, and equal
    prompts share every forward."""
    from sparseek.engine.llm import _shared_prefill

    assert _shared_prefill([64] * 32, 512) == [(32, 16)] * 4
    for lens, budget in (([150, 131, 40, 40, 23, 12, 9, 5], 48), ([7, 3, 3, 1], 4), ([600], 512)):
        for pad in (0, 8):
            plan = _shared_prefill(lens, budget, pad)
            assert all(m * c <= budget for m, c in plan)
            for i, n in enumerate(lens):  # junk (at most pad tokens) only in a row's last forward
                reads = [c for m, c in plan if m > i]
                assert sum(reads[:-1]) < n <= sum(reads) <= n + pad
            if not pad:
                assert [sum(c for m, c in plan if m > i) for i in range(len(lens))] == lens
    # lengths within the pad of each other end in one forward
    assert _shared_prefill([60, 57, 55, 53], 512, 8) == [(4, 60)] and len(_shared_prefill([60, 57, 55, 53], 512)) == 4


@pytest.mark.parametrize("mode", ["eager", "static", "speculative", "prompt-logprobs", "speculative-logprobs",
                                  "prefix", "off"])
def test_prompts_joining_mid_decode_prefill_between_decode_steps(model, tok, monkeypatch, mode):
    """A long prompt joining while another sequence decodes prefills one forward at a time with a
    decode step after each (``interleave_prefill``), so the running stream waits one forward, not
    the whole prefill; every sequence still gets the tokens it gets alone. Also through the
    fixed-shape steps a compiled engine runs (``static``, ``speculative``: they run the joining
    rows on dummy tokens, so those rows' positions and rings are put back: without that the
    tokens differ), for a prompt asking for prompt log-probabilities (prefilled alone), and for
    two joining prompts whose shared beginning is read once in a scratch row (``prefix``)."""
    g = torch.Generator().manual_seed(11)
    rand = lambda n: torch.randint(3, 500, (n,), generator=g).tolist()  # noqa: E731
    greedy = dict(temperature=0, ignore_eos=True)
    head = rand(64)
    if mode == "prefix":  # two short ones end first, then both long prompts join at once
        prompts, lens = [rand(5), rand(7), rand(9), head + rand(86), head + rand(70)], (3, 3, 40, 8, 8)
    else:
        prompts, lens = [rand(5), rand(9), rand(150)], (3, 40, 8)
    params = [SamplingParams(max_tokens=n, **greedy) for n in lens]
    if mode.endswith("logprobs"):
        params[2] = SamplingParams(max_tokens=8, prompt_logprobs=1, **greedy)
    refs = [_solo(model, tok, p, sp) for p, sp in zip(prompts, params)]
    static = mode in ("static", "speculative", "speculative-logprobs")
    if static:
        _static_steps(monkeypatch)
    busy, preserved = [], Cache.preserved
    monkeypatch.setattr(Cache, "preserved", lambda c, rows: busy.append(len(rows)) or preserved(c, rows))

    def run():
        busy.clear()
        llm = LLM(model, tok, max_batch_size=3 if mode == "prefix" else 2, max_seq_len=512, prefill_chunk=16,
                  compile=static, speculative_tokens=2 if mode.startswith("speculative") else 0,
                  interleave_prefill=mode != "off")
        return llm.generate(prompts, params)

    outs = run()
    for out, ref in zip(outs, refs):
        assert out.token_ids == ref.token_ids
    if mode.endswith("logprobs"):
        for got, want in zip(outs[2].prompt_logprobs[1:], refs[2].prompt_logprobs[1:]):
            assert got.keys() == want.keys()
            torch.testing.assert_close(torch.tensor(list(got.values())), torch.tensor(list(want.values())),
                                       rtol=0, atol=1e-4)
    # decode steps while the joining rows prefilled: one after each forward of theirs but the last
    # (the prefix mode's scratch row reads the 64 shared tokens first: 4 forwards more)
    forwards = -(-150 // 16) if mode != "prefix" else -(-64 // 16) + -(-(86 + 70) // 16)
    between = sum(n > 0 for n in busy)
    assert between == 0 if mode == "off" else between >= forwards - 1
    if mode == "static":  # the rows' rings and positions must be put back
        monkeypatch.setattr(Cache, "preserved", lambda c, rows: contextlib.nullcontext())
        assert run()[2].token_ids != refs[2].token_ids


def test_request_aborted_while_its_prompt_prefills(model, tok, monkeypatch):
    """A client gone while its long prompt prefills between others' decode steps: the prefill stops
    there (no forward more of it), the request ends with "abort" and no tokens, and the next
    waiting prompt takes the slot; the running sequence decodes on as if alone."""
    g = torch.Generator().manual_seed(5)
    short, long_, nxt = ([int(t) for t in torch.randint(3, 500, (n,), generator=g)] for n in (6, 300, 20))
    params = SamplingParams(max_tokens=30, temperature=0, ignore_eos=True)
    llm = LLM(model, tok, max_batch_size=2, max_seq_len=512, prefill_chunk=16)
    first, joiner, later = (llm._requests([p], params) for p in (short, long_, nxt))
    widths, steps = [], [0]
    forward = type(model).forward
    monkeypatch.setattr(type(model), "forward", lambda self, ids, *a, **kw: widths.append(ids.shape) or
                        forward(self, ids, *a, **kw))

    def feed(idle):
        steps[0] += 1
        if steps[0] == 3:
            return joiner + later  # the joiner takes the free slot, the other waits
        if steps[0] == 8:
            joiner[0].aborted = True
        return None

    seen = [s for s in llm._run(first, feed=feed)]
    assert joiner[0].out.finish_reason == "abort" and joiner[0].out.token_ids == [] and joiner[0] in seen
    assert 3 <= sum(shape == (1, 16) for shape in widths) < 300 // 16  # it stopped part-way
    for seq, p in ((first[0], short), (later[0], nxt)):
        assert seq.out.token_ids == _solo(model, tok, p, params).token_ids and seq.out.finish_reason == "length"


def test_greedy_matches_the_uncached_model(model, tok):
    out = _solo(model, tok, PROMPTS[1], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))
    ids = list(PROMPTS[1])
    with torch.no_grad():
        for _ in range(12):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    assert out.token_ids == ids[len(PROMPTS[1]):]


def test_seeded_sampling_is_reproducible(model, tok):
    a = _solo(model, tok, PROMPTS[0], SamplingParams(max_tokens=20, seed=7, ignore_eos=True))
    b = _solo(model, tok, PROMPTS[0], SamplingParams(max_tokens=20, seed=7, ignore_eos=True))
    c = _solo(model, tok, PROMPTS[0], SamplingParams(max_tokens=20, seed=8, ignore_eos=True))
    assert a.token_ids == b.token_ids != c.token_ids


def test_top_k_one_is_greedy(model, tok):
    g = _solo(model, tok, PROMPTS[3], SamplingParams(max_tokens=10, temperature=0, ignore_eos=True))
    k1 = _solo(model, tok, PROMPTS[3], SamplingParams(max_tokens=10, temperature=1.5, top_k=1, seed=1,
                                                        ignore_eos=True))
    assert g.token_ids == k1.token_ids


def test_stop_string_split_across_tokens(model, tok):
    params = SamplingParams(max_tokens=30, temperature=0, ignore_eos=True)
    free = _solo(model, tok, PROMPTS[2], params)
    pieces = [tok.decode([t]) for t in free.token_ids]
    # a stop string made of the end of one token and the start of the next
    i = next(i for i in range(3, len(pieces) - 1) if len(pieces[i]) >= 2 and len(pieces[i + 1]) >= 1)
    stop = pieces[i][-2:] + pieces[i + 1][:1]
    full = "".join(pieces)
    cut = full.find(stop)
    params = SamplingParams(max_tokens=30, temperature=0, ignore_eos=True, stop=[stop])
    out = _solo(model, tok, PROMPTS[2], params)
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text == full[:cut] and stop not in out.text
    streamed = "".join(d.text for d in LLM(model, tok, max_batch_size=1, max_seq_len=512).stream(PROMPTS[2], params))
    assert streamed == out.text


def test_stream_equals_generate(model, tok):
    params = SamplingParams(max_tokens=20, temperature=0.7, seed=2, ignore_eos=True)
    llm = LLM(model, tok, max_batch_size=3, max_seq_len=512)
    outs = llm.generate(PROMPTS[:3], params)
    texts, ids = ["", "", ""], [[], [], []]
    for d in llm.stream(PROMPTS[:3], params):
        texts[d.index] += d.text
        ids[d.index] += d.token_ids
    assert [o.text for o in outs] == texts and [o.token_ids for o in outs] == ids


def test_logprobs_match_the_model(model, tok):
    prompt = PROMPTS[1]
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True, logprobs=3, prompt_logprobs=2)
    out = _solo(model, tok, prompt, params)
    full = prompt + out.token_ids
    with torch.no_grad():
        lp = torch.log_softmax(model(torch.tensor([full]))[0], dim=-1)
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(prompt)
    for t in range(1, len(prompt)):
        entry = out.prompt_logprobs[t]
        assert abs(entry[prompt[t]] - float(lp[t - 1, prompt[t]])) < 1e-4 and len(entry) >= 2
    for j, tkn in enumerate(out.token_ids):
        entry = out.logprobs[j]
        assert abs(entry[tkn] - float(lp[len(prompt) - 1 + j, tkn])) < 1e-4
        assert max(entry.values()) == entry[tkn]  # greedy picks the most likely token
        assert len(entry) == 3
    assert abs(out.cumulative_logprob - sum(e[t] for e, t in zip(out.logprobs, out.token_ids))) < 1e-5


def test_eos_stops_generation(model, tok):
    out = _solo(model, tok, PROMPTS[0], SamplingParams(max_tokens=30, temperature=0, ignore_eos=True))
    first = out.token_ids[4]
    stopped = _solo(model, tok, PROMPTS[0], SamplingParams(max_tokens=30, temperature=0, stop_token_ids=[first]))
    assert stopped.finish_reason == "stop" and stopped.stop_reason == first
    assert stopped.token_ids == out.token_ids[:out.token_ids.index(first) + 1]


def test_text_prompts_and_errors(model, tok):
    llm = LLM(model, tok, max_batch_size=2, max_seq_len=64)
    out = llm.generate("def f(x):", SamplingParams(max_tokens=5, temperature=0, ignore_eos=True))[0]
    assert out.prompt_token_ids[0] == tok.bos_id and len(out.token_ids) == 5
    with pytest.raises(ValueError, match="too long"):
        llm.generate([[1] * 64])
    with pytest.raises(ValueError, match="outside"):
        llm.generate([[1, 99999]])
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1)
    # the cache's end stops generation with "length"
    out = llm.generate([[3] * 60], SamplingParams(max_tokens=50, temperature=0, ignore_eos=True))[0]
    assert out.finish_reason == "length" and len(out.token_ids) <= 5


def test_loglikelihood_matches_the_model(model, tok):
    llm = LLM(model, tok, max_batch_size=2, max_seq_len=512)
    reqs = [([5, 6, 7], [8, 9]), ([1, 2, 3], [4, 5]), (list(range(20, 60)), [61]), ([3], [4, 5, 6, 7])]
    got = llm.loglikelihood(reqs, batch_size=2)
    with torch.no_grad():
        for (ctx, cont), (score, greedy) in zip(reqs, got):
            lp = torch.log_softmax(model(torch.tensor([ctx + cont]))[0], -1)
            ref = sum(float(lp[len(ctx) - 1 + k, t]) for k, t in enumerate(cont))
            assert abs(score - ref) < 1e-4
            assert greedy == all(int(lp[len(ctx) - 1 + k].argmax()) == t for k, t in enumerate(cont))
    # a continuation equal to the greedy path is reported as greedy
    path = _solo(model, tok, [5, 6, 7], SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)).token_ids
    assert llm.loglikelihood([([5, 6, 7], path)])[0][1] is True


def _v3():
    """DeepSeek-V3's layout with its MTP layer (``model.layers.61`` in V3 / R1)."""
    return randomize_(build_model(sparseek.preset("debug-v3")), 5).eval()


@pytest.mark.parametrize("k,v3", [(1, False), (3, False), (2, True)])
def test_mtp_speculative_greedy_equals_plain(model, tok, k, v3):
    model = _v3() if v3 else model
    params = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)
    plain = LLM(model, tok, max_batch_size=2, max_seq_len=512).generate(PROMPTS[:3], params)
    spec = LLM(model, tok, max_batch_size=2, max_seq_len=512, speculative_tokens=k).generate(PROMPTS[:3], params)
    for a, b in zip(plain, spec):
        assert a.token_ids == b.token_ids
        assert b.drafted > 0


@pytest.mark.parametrize("k,batch", [(1, 1), (2, 3), (4, 3)])
def test_speculative_accepts_good_drafts(model, tok, k, batch, monkeypatch):
    """Drafts from an oracle that is right except at every fourth, fifth or sixth position (by
    prompt, so the rows of a batch accept different counts and drift apart): each output is still
    its plain greedy output, exactly the right drafts are accepted (acceptance path + rollback),
    and a batch verifies all its rows in one forward."""
    prompts = PROMPTS[1:1 + batch]
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    refs = [_solo(model, tok, p, params).token_ids for p in prompts]

    def oracle(self, s, logits):
        i = len(s.out.token_ids) + len(s.drafts)
        good = refs[s.out.index][i] if i < len(refs[s.out.index]) else 0
        return (good if i % (4 + s.out.index) != 1 else (good + 1) % 512), None

    shapes = []
    forward = type(model).forward
    monkeypatch.setattr(type(model), "forward", lambda m, ids, *a, **kw: shapes.append(tuple(ids.shape))
                        or forward(m, ids, *a, **kw))
    monkeypatch.setattr(LLM, "_propose", oracle)
    outs = LLM(model, tok, max_batch_size=batch, max_seq_len=512, speculative_tokens=k).generate(prompts, params)
    for out, ref in zip(outs, refs):
        assert out.token_ids == ref
        assert 0 < out.accepted < out.drafted
        steps = out.drafted // k
        assert steps < len(out.token_ids) - 1  # fewer forward passes than generated tokens
        assert len(out.token_ids) <= 1 + out.accepted + steps
    assert (batch, k + 1) in shapes and len({o.accepted for o in outs}) == batch  # rows advanced apart


def _static_steps(monkeypatch):
    """LLM(compile=True) with its fixed-shape steps run uncompiled: the engine's padding to the
    whole batch and its resets of idle rows, tested in seconds (compiled: the slow tests)."""
    from sparseek.engine import compile as engine_compile
    from sparseek.model import v4

    monkeypatch.setattr(engine_compile, "CompiledStep", lambda fn, device, **kw: fn)
    monkeypatch.setattr(v4, "compile_hot_paths", lambda: None)


@pytest.mark.parametrize("prefill_chunk,static,v3", [(512, False, False), (16, False, False), (512, True, False),
                                                     (16, False, True)])
def test_speculative_drafts_come_from_the_mtp_block(model, tok, monkeypatch, prefill_chunk, static, v3):
    """Every draft is the MTP block's prediction as a one-shot run of the sequence gives it: the
    first from the main model's streams at the newest position, the second chained on the MTP
    block's own output -- whatever each row of the batch accepted (an oracle makes most drafts
    right and some wrong, so the rows accept different counts), after prompts prefilled together
    or (asking for prompt log-probabilities) alone, in one chunk or many, and through the
    fixed-shape steps a compiled engine verifies and drafts with (``static``); V3's MTP layer too."""
    model = _v3() if v3 else model
    params = SamplingParams(max_tokens=14, temperature=0, ignore_eos=True)
    refs = [_solo(model, tok, p, params).token_ids for p in PROMPTS[:3]]
    params = [params, params, SamplingParams(**{**params.__dict__, "prompt_logprobs": 1})]
    seen, calls = [], []

    def oracle(self, s, logits_V):
        seen.append((s.out.index, len(s.out.token_ids), list(s.drafts), logits_V.clone()))
        i = len(s.out.token_ids) + len(s.drafts)
        good = refs[s.out.index][i] if i < len(refs[s.out.index]) else 0
        return (good if i % (3 + s.out.index) != 1 else (good + 1) % 512), None

    monkeypatch.setattr(LLM, "_propose", oracle)
    if static:
        _static_steps(monkeypatch)
        for name in ("verify_step", "mtp_step"):
            fn = getattr(type(model), name)
            monkeypatch.setattr(type(model), name, lambda *a, _f=fn, _n=name: calls.append(_n) or _f(*a))
    outs = LLM(model, tok, max_batch_size=3, max_seq_len=512, speculative_tokens=2, compile=static,
               prefill_chunk=prefill_chunk).generate(PROMPTS[:3], params)
    monkeypatch.undo()
    # the fixed-shape steps verify and draft (prompts still prefill and draft first eagerly)
    assert calls.count("verify_step") > 5 and calls.count("mtp_step") > 10 if static else not calls
    assert len({o.accepted for o in outs}) > 1 and len(outs[2].prompt_logprobs) == len(PROMPTS[2])
    with torch.no_grad():
        for out in outs:
            assert out.token_ids == refs[out.index]
            rounds = [r for r in seen if r[0] == out.index]
            assert sum(not r[2] for r in rounds) > 2
            for _, g, drafts, logits in rounds:
                if g == len(out.token_ids):
                    continue  # drafted in the step that ended the sequence (the batch drafts for all rows)
                # the newest token sits at position P = L + g - 1; the MTP block has seen P positions
                ids = torch.tensor([out.prompt_token_ids + out.token_ids])
                P = len(out.prompt_token_ids) + g - 1
                _, h = model(ids[:, :P], return_hidden=True)
                mtp_cache = model.new_cache(1, 64 + P)
                want, hm = model.forward_mtp(h, ids[:, 1:P + 1], mtp_cache, return_hidden=True)
                for d in drafts:  # chained: the MTP block's own streams and the previous draft
                    want, hm = model.forward_mtp(hm[:, -1:], torch.tensor([[d]]), mtp_cache, return_hidden=True)
                assert rel_err(logits, want[0, -1]) < 1e-4, (out.index, g, drafts)


@pytest.mark.parametrize("static", [False, True])
def test_speculative_decoding_stops_at_the_end_of_the_cache(model, tok, static, monkeypatch):
    """Rows reach the cache's end at different steps (one is admitted without room for a draft):
    each ends with "length" on a prefix of its plain greedy output, nothing writes past the cache.
    ``static``: the compiled engine's fixed-shape steps, rows going idle one by one."""
    prompts = [list(range(1, 30)), list(range(3, 38)), [9] * 37, [4, 5, 6]]
    params = SamplingParams(max_tokens=30, temperature=0, ignore_eos=True)
    plain = LLM(model, tok, max_batch_size=4, max_seq_len=40).generate(prompts, params)
    if static:
        _static_steps(monkeypatch)
    llm = LLM(model, tok, max_batch_size=4, max_seq_len=40, speculative_tokens=3, compile=static)
    spec = llm.generate(prompts, params)
    for p, s in zip(plain, spec):
        assert s.finish_reason == "length" and 0 < len(s.token_ids) <= len(p.token_ids)
        assert s.token_ids == p.token_ids[:len(s.token_ids)]
    # rows that ended early sat idle under the fixed-shape steps without drifting past the cache
    assert int(llm._cache.pos.max()) <= 40 and int(llm._cache.mtp_pos.max()) <= 40


def test_speculative_sampling_is_seeded(model, tok):
    params = SamplingParams(max_tokens=15, temperature=0.8, seed=5, ignore_eos=True)
    a = LLM(model, tok, max_batch_size=2, max_seq_len=512, speculative_tokens=2).generate(PROMPTS[:2], params)
    b = LLM(model, tok, max_batch_size=2, max_seq_len=512, speculative_tokens=2).generate(PROMPTS[:2], params)
    assert [o.token_ids for o in a] == [o.token_ids for o in b] and all(len(o.token_ids) == 15 for o in a)


@pytest.mark.slow
def test_compiled_decode_gives_the_same_tokens(model, tok, eager_hot_paths):
    """Compiled, on a cache longer than the model's span floor: the step reads a span of it."""
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    eager = LLM(model, tok, max_batch_size=2, max_seq_len=1024).generate(PROMPTS[:3], params)
    llm = LLM(model, tok, max_batch_size=2, max_seq_len=1024, compile=True)
    assert llm._spans is not None and llm._spans.length(1) < 1024
    assert [o.token_ids for o in eager] == [o.token_ids for o in llm.generate(PROMPTS[:3], params)]


@pytest.mark.slow
def test_compiled_speculative_decoding_gives_plain_tokens(model, tok, eager_hot_paths):
    """The compiled verification and draft steps (and, on a GPU, their CUDA graphs): greedy tokens
    equal plain decoding's, rows finishing at different steps, a later prompt taking a freed slot,
    the verification reading a span of a cache longer than the span floor."""
    params = [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True) for n in (14, 6, 10)]
    plain = LLM(model, tok, max_batch_size=2, max_seq_len=1024).generate(PROMPTS[:3], params)
    llm = LLM(model, tok, max_batch_size=2, max_seq_len=1024, speculative_tokens=2, compile=True)
    spec = llm.generate(PROMPTS[:3], params)
    assert [o.token_ids for o in spec] == [o.token_ids for o in plain] and all(o.drafted for o in spec)
    # both steps ran their guarded warm-up calls (and more, guards skipped: they are not counted)
    assert (llm._verify_fn._calls, llm._mtp_fn._calls) == (llm._verify_fn._warmup, llm._mtp_fn._warmup)


def test_bfloat16_engine_generates_and_batches(tok):
    """The dtype a GPU serves in: generation, logprobs and speculative decoding run in bf16, and
    batching does not change a sequence's tokens."""
    llm = LLM("debug", dtype=torch.bfloat16, max_batch_size=2, max_seq_len=256, speculative_tokens=2)
    assert llm.model.embed.weight.dtype == torch.bfloat16
    params = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True, logprobs=1)
    batched = llm.generate(PROMPTS[:3], params)
    alone = LLM("debug", dtype=torch.bfloat16, max_batch_size=1, max_seq_len=256,
                speculative_tokens=2).generate([PROMPTS[2]], params)[0]
    assert [len(o.token_ids) for o in batched] == [10, 10, 10]
    assert all(lp is not None and len(lp) == 10 for lp in (o.logprobs for o in batched))
    assert batched[2].token_ids == alone.token_ids


@pytest.mark.slow
def test_compiled_engine_stays_compiled_across_prompt_shapes(model, eager_hot_paths):
    """Prompt lengths and batch mixes give the compiled attention a dozen input structures (no
    compressed entries yet, few or many, picked or all, one block or several, one row or two):
    none may exhaust dynamo's recompile limit, which would fall back to eager code for good (and
    warn) in a server that has already run a few prompts."""
    g = torch.Generator().manual_seed(1)
    lengths = (3, 17, 40, 90, 150, 260, 420)
    prompts = [torch.randint(3, 500, (n,), generator=g).tolist() for n in lengths]
    batches = [[p] for p in prompts] + [list(pair) for pair in zip(prompts, reversed(prompts))]
    params = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)
    eager = LLM(model, None, max_batch_size=2, max_seq_len=512)
    with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
        llm = LLM(model, None, max_batch_size=2, max_seq_len=512, compile=True)
        for batch in batches:
            assert [o.token_ids for o in llm.generate(batch, params)] == [
                o.token_ids for o in eager.generate(batch, params)]


def test_requests_fed_while_running_and_aborted_ones(model, tok):
    """A server's loop: requests arrive between steps (``feed``) and join the running batch; one
    is aborted from outside mid-generation and ends with finish_reason "abort", freeing its slot;
    every other sequence gets the tokens it gets alone."""
    llm = LLM(model, tok, max_batch_size=2, max_seq_len=512)
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    first = llm._requests([PROMPTS[0]], params)
    later = [llm._requests([p], params) for p in PROMPTS[1:4]]
    steps, seen = [0], {}

    def feed(idle):
        steps[0] += 1
        if steps[0] == 3:
            return later[0] + later[1]  # one must wait for a slot
        if steps[0] == 5:
            later[0][0].aborted = True
        if steps[0] == 6:
            return later[2]
        return None

    for s in llm._run(first, feed=feed):
        seen.setdefault(id(s), s)
    outs = [first[0]] + [r[0] for r in later]
    aborted = later[0][0].out
    assert aborted.finish_reason == "abort" and 0 < len(aborted.token_ids) < 12
    for p, s in zip([PROMPTS[0], PROMPTS[2], PROMPTS[3]], [outs[0], outs[2], outs[3]]):
        assert s.out.token_ids == _solo(model, tok, p, params).token_ids and s.out.finish_reason == "length"
    assert len(seen) == 4
