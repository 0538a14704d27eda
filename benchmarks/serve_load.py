"""What the HTTP server costs over the engine: the same requests through ``LLM.generate`` and through
``sparseek serve``'s API (streaming, concurrent clients), in alternating rounds of one process.

    python benchmarks/serve_load.py --model small --dtype float32 --requests 32 --concurrency 8 \
        --max-tokens 32 --batch 8

Prompts are random token ids of 16-256 tokens (seeded), completions greedy with ``ignore_eos`` so
every request decodes exactly ``--max-tokens`` tokens; prefix caching is off in both (the rounds
repeat the prompts). The engine row runs all requests in one ``generate`` call (the best case: the
batch is always full while requests wait); the server row has ``--concurrency`` client threads,
each streaming one request at a time over HTTP, so the batch holds up to that many sequences.
Printed: wall time, output tokens/s, time to first token (median, p90) and time per output token
after it, over the requests of the best round, and the ratio server / engine. Both must produce
the same tokens (checked).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import threading
import time

import torch

import sparseek
from sparseek.engine import LLM, SamplingParams


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="small")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--batch", type=int, default=8, help="the engine's max_batch_size")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()

    import httpx
    import uvicorn

    from sparseek.serve import build_app

    model, tok = sparseek.load(a.model, dtype=a.dtype)
    rng = random.Random(a.seed)
    V = model.args.vocab_size
    prompts = [[rng.randrange(16, V) for _ in range(rng.randint(16, 256))] for _ in range(a.requests)]
    # log-probabilities on both paths: the server's stream reports token by token through them
    params = SamplingParams(max_tokens=a.max_tokens, temperature=0, ignore_eos=True, logprobs=0)
    llm = LLM(model, tok, max_batch_size=a.batch, max_seq_len=512, prefix_cache_bytes=0)
    print(f"{a.model} {a.dtype}, {a.requests} requests of {min(map(len, prompts))}-{max(map(len, prompts))} prompt "
          f"tokens, {a.max_tokens} output tokens each, max_batch_size {a.batch}, {a.concurrency} concurrent "
          f"clients, torch {torch.__version__}, {torch.get_num_threads()} threads, best of {a.rounds} alternating rounds")

    server = uvicorn.Server(uvicorn.Config(build_app(llm, "bench"), host="127.0.0.1", port=0, log_level="warning"))
    th = threading.Thread(target=server.run, daemon=True)
    th.start()
    while not server.started:
        time.sleep(0.05)
    port = server.servers[0].sockets[0].getsockname()[1]
    url = f"http://127.0.0.1:{port}/v1/completions"

    def engine_round():
        t0 = time.perf_counter()
        firsts, ends, ids = {}, {}, {}
        for d in llm.stream(prompts, params):
            now = time.perf_counter() - t0
            firsts.setdefault(d.index, now)
            ids.setdefault(d.index, []).extend(d.token_ids)
            if d.finish_reason:
                ends[d.index] = now
        wall = time.perf_counter() - t0
        # every request was "sent" at t0: its first token waited for the ones before it
        return wall, [firsts[i] for i in range(a.requests)], [ends[i] for i in range(a.requests)], \
            [0.0] * a.requests, [ids[i] for i in range(a.requests)]

    def server_round():
        firsts, ends, starts, ids = [0.0] * a.requests, [0.0] * a.requests, [0.0] * a.requests, [None] * a.requests
        nxt, lock = [0], threading.Lock()
        t0 = time.perf_counter()

        def client():
            with httpx.Client(timeout=600) as c:
                while True:
                    with lock:
                        i = nxt[0]
                        nxt[0] += 1
                    if i >= a.requests:
                        return
                    starts[i] = time.perf_counter() - t0
                    got = []
                    body = {"prompt": prompts[i], "max_tokens": a.max_tokens, "temperature": 0, "ignore_eos": True,
                            "stream": True, "logprobs": 0}
                    with c.stream("POST", url, json=body) as r:
                        for line in r.iter_lines():
                            if not line.startswith("data: ") or line == "data: [DONE]":
                                continue
                            ch = json.loads(line[6:])["choices"]
                            if ch and ch[0]["logprobs"] and ch[0]["logprobs"]["tokens"]:
                                if not got:
                                    firsts[i] = time.perf_counter() - t0
                                got += ch[0]["logprobs"]["tokens"]
                    ends[i] = time.perf_counter() - t0
                    ids[i] = got

        clients = [threading.Thread(target=client) for _ in range(a.concurrency)]
        for c in clients:
            c.start()
        for c in clients:
            c.join()
        return time.perf_counter() - t0, firsts, ends, starts, ids

    best = {}
    for _ in range(a.rounds):
        for name, fn in (("engine", engine_round), ("server", server_round)):
            r = fn()
            if name not in best or r[0] < best[name][0]:
                best[name] = r
    server.should_exit = True
    th.join(10)

    n_out = a.requests * a.max_tokens
    eng_ids = best["engine"][4]
    same = all(len(s) == a.max_tokens for s in best["server"][4]) and \
        [[tok.token_bytes(t).decode("utf-8", "replace") for t in x] for x in eng_ids] == best["server"][4]
    print(f"same tokens through the server: {same}\n")
    print("| path | wall s | output tok/s | TTFT median s | TTFT p90 s | s per output token after the first |")
    print("|---|---|---|---|---|---|")
    for name, (wall, firsts, ends, starts, _) in best.items():
        ttft = [f - s for f, s in zip(firsts, starts)]
        tpot = [(e - f) / (a.max_tokens - 1) for e, f in zip(ends, firsts)]
        print(f"| {name} | {wall:.2f} | {n_out / wall:,.1f} | {statistics.median(ttft):.3f} | {_pct(ttft, 0.9):.3f} | "
              f"{statistics.median(tpot):.4f} |")
    print(f"\nserver / engine output tokens/s: {best['engine'][0] / best['server'][0]:.2f}x "
          "(engine TTFT counts from one submission of every request; server TTFT from each request's send)")


if __name__ == "__main__":
    main()
