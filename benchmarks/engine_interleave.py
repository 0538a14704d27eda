"""Running streams while a long prompt joins: its prefill interleaved with their decode steps, or whole.

    python benchmarks/engine_interleave.py --preset small --dtype bfloat16 --streams 4 --join 2048 --compile

``--streams`` sequences (short prompts) decode; before decode step ``--after`` a ``--join``-token
prompt arrives through the engine loop's feed, as a server's request does. One engine, its
``interleave_prefill`` switched on / off between alternating rounds (this VM drifts +-15%): the
running streams' longest wait between two tokens (the stall the joiner causes) and their median
one, the joiner's time to its first token, the whole run's wall time, and whether every token
equals the other mode's. ``--compile``: the compiled decode step (it runs the joiner's rows on
dummy tokens while they prefill, which the engine puts back) and compiled prefill hot paths.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import sparseek
from sparseek.engine import LLM, SamplingParams


def run(llm: LLM, prompts, joiner, params, join_params, after: int) -> dict:
    seqs = llm._requests(prompts, params)
    late = llm._requests([joiner], join_params)
    for s in late:
        s.out.index = len(prompts)
    calls, joined = [0], [None]

    def feed(idle):
        calls[0] += 1
        if calls[0] == after:
            joined[0] = time.perf_counter()
            return late
        return None

    stamps: dict[int, list[float]] = {i: [] for i in range(len(prompts) + 1)}
    t0 = time.perf_counter()
    with torch.inference_mode():
        for seq in llm._run(seqs, feed=feed):
            now = time.perf_counter()
            stamps[seq.out.index] += [now] * len(seq.new_ids)
    wall = time.perf_counter() - t0
    gaps = [b - a for i in range(len(prompts)) for a, b in zip(stamps[i], stamps[i][1:])]
    return {"max_gap": max(gaps), "median_gap": statistics.median(gaps), "ttft": stamps[len(prompts)][0] - joined[0],
            "wall": wall, "tokens": [s.out.token_ids for s in seqs + late]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="small")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--streams", type=int, default=4)
    ap.add_argument("--prompt", type=int, default=32, help="tokens of each running stream's prompt")
    ap.add_argument("--join", type=int, default=2048, help="tokens of the joining prompt")
    ap.add_argument("--after", type=int, default=8, help="the joiner arrives before this decode step")
    ap.add_argument("--tokens", type=int, default=48, help="tokens each running stream generates")
    ap.add_argument("--prefill-chunk", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--compile", action="store_true")
    a = ap.parse_args()
    model, _ = sparseek.load(a.preset, dtype=getattr(torch, a.dtype), tokenizer=False)
    g = torch.Generator().manual_seed(0)
    draw = lambda n: torch.randint(10, model.args.vocab_size, (n,), generator=g).tolist()  # noqa: E731
    prompts, joiner = [draw(a.prompt) for _ in range(a.streams)], draw(a.join)
    params = SamplingParams(max_tokens=a.tokens, temperature=0, ignore_eos=True)
    join_params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    llm = LLM(model, None, max_batch_size=a.streams + 1, max_seq_len=a.join + 64, prefill_chunk=a.prefill_chunk,
              compile=a.compile, prefix_cache_bytes=0)
    print(f"# {a.preset} {a.dtype}, {a.streams} streams of {a.prompt}-token prompts x {a.tokens} tokens, a "
          f"{a.join}-token prompt joining before step {a.after}, prefill_chunk {a.prefill_chunk}, "
          f"compile={a.compile}, {torch.get_num_threads()} threads")
    t = time.perf_counter()
    for mode in (True, False):  # warm-up (compiles, if asked)
        llm.interleave_prefill = mode
        run(llm, prompts, joiner, params, join_params, a.after)
    print(f"# warm-up {time.perf_counter() - t:.0f} s")
    results: dict[bool, list[dict]] = {True: [], False: []}
    for r in range(a.rounds):
        for mode in ((True, False) if r % 2 == 0 else (False, True)):
            llm.interleave_prefill = mode
            res = run(llm, prompts, joiner, params, join_params, a.after)
            results[mode].append(res)
            print(f"round {r} {'interleaved' if mode else 'whole      '}: longest wait {res['max_gap'] * 1e3:7.1f} ms, "
                  f"median {res['median_gap'] * 1e3:5.1f} ms, joiner's first token {res['ttft'] * 1e3:7.1f} ms, "
                  f"wall {res['wall']:.2f} s", flush=True)
    same = all(x["tokens"] == results[False][0]["tokens"] for rs in results.values() for x in rs)
    med = {m: {k: statistics.median(x[k] for x in results[m]) for k in ("max_gap", "median_gap", "ttft", "wall")}
           for m in results}
    print("\n| prefill of the joiner | streams' longest wait ms | streams' median wait ms | joiner's first token ms "
          "| wall s |\n|---|---|---|---|---|")
    for m, name in ((True, "interleaved (default)"), (False, "whole (interleave_prefill=False)")):
        x = med[m]
        print(f"| {name} | {x['max_gap'] * 1e3:.1f} | {x['median_gap'] * 1e3:.1f} | {x['ttft'] * 1e3:.1f} | "
              f"{x['wall']:.2f} |")
    print(f"\nlongest wait: interleaved / whole = {med[True]['max_gap'] / med[False]['max_gap']:.3f}; joiner's first "
          f"token {med[True]['ttft'] / med[False]['ttft']:.3f}x; wall {med[True]['wall'] / med[False]['wall']:.3f}x; "
          f"medians of {a.rounds} rounds; same tokens in every round: {same}")


if __name__ == "__main__":
    main()
