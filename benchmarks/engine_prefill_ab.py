"""Time to first token for many prompts at once: the engine's shared prefill vs one prompt at a time.

    python benchmarks/engine_prefill_ab.py --preset small --dtype bfloat16 --prompts 32 --lengths 64
    python benchmarks/engine_prefill_ab.py --preset small --dtype bfloat16 --prompts 32 --lengths 16-512 --hot-paths

``LLM.generate(prompts, max_tokens=1)`` with ``batch_prefill`` on (waiting prompts share forwards, at
most ``prefill_chunk`` tokens each; a forward runs up to 8 tokens past its shortest prompts' end,
junk those rows roll back), on without that junk (every prompt's end ends a forward, the engine
before the thirteenth session) and off (each prompt's own chunked prefill), in alternating rounds
of one process (this VM drifts +-25% within minutes); the first tokens are compared (bf16 batched
and single-row GEMMs may round a near-tie differently). ``--lengths a-b``
draws each prompt's length uniformly from [a, b] (seeded), so the shared forwards lose rows as
shorter prompts end. ``--hot-paths`` compiles the prefill hot paths as ``LLM(compile=True)`` does.
"""

from __future__ import annotations

import argparse
import time

import torch

import sparseek
from sparseek.engine import LLM, SamplingParams
from sparseek.engine import llm as llm_module


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="small")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--lengths", default="64", help="N, or a-b for lengths drawn from [a, b]")
    ap.add_argument("--prefill-chunk", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--hot-paths", action="store_true")
    a = ap.parse_args()
    model, _ = sparseek.load(a.preset, dtype=getattr(torch, a.dtype), tokenizer=False)
    if a.hot_paths:
        from sparseek.model.v4 import compile_hot_paths

        compile_hot_paths()
    lo, _, hi = a.lengths.partition("-")
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(int(lo), int(hi or lo) + 1, (a.prompts,), generator=g).tolist()
    prompts = [torch.randint(10, model.args.vocab_size, (n,), generator=g).tolist() for n in lengths]
    params = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
    modes = ("shared", "shared, no junk", "one at a time")
    engines = {mode: LLM(model, None, max_batch_size=a.prompts, max_seq_len=max(lengths) + 16,
                         prefill_chunk=a.prefill_chunk, batch_prefill=mode != "one at a time") for mode in modes}
    plan = llm_module._shared_prefill

    def run(mode):
        # "no junk": forwards end at every prompt's end (no row reads past it), as before the
        # thirteenth session
        llm_module._shared_prefill = (lambda lens, budget, pad=0: plan(lens, budget)) if mode == "shared, no junk" else plan
        try:
            return engines[mode].generate(prompts, params)
        finally:
            llm_module._shared_prefill = plan

    firsts = {mode: [o.token_ids for o in run(mode)] for mode in modes}
    same = sum(x == y for x, y in zip(firsts["shared"], firsts["one at a time"]))
    print(f"{a.preset} {a.dtype}, {a.prompts} prompts of {a.lengths} tokens ({sum(lengths):,} in all), "
          f"prefill_chunk {a.prefill_chunk}, torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"same first token for {same}/{a.prompts}")
    secs = {mode: [] for mode in engines}
    for _ in range(a.rounds):
        for mode in modes:
            t = time.perf_counter()
            run(mode)
            secs[mode].append(time.perf_counter() - t)
    med = {mode: sorted(v)[len(v) // 2] for mode, v in secs.items()}
    for mode, dt in med.items():
        print(f"  {mode:15s}: {dt:6.2f} s to every first token, {sum(lengths) / dt:7,.0f} prompt tok/s "
              f"(median of {a.rounds} alternating rounds)")
    print(f"  shared prefill {med['one at a time'] / med['shared']:.2f}x faster than one at a time, "
          f"{med['shared, no junk'] / med['shared']:.2f}x faster than without junk")


if __name__ == "__main__":
    main()
