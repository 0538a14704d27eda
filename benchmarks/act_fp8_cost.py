"""What DeepSeek's FP8 activation rounding (``act_fp8``) costs when emulated: prefill and batch-1
decode of one model with and without it, eager and compiled, in alternating rounds of one process.

    python benchmarks/act_fp8_cost.py --model small --dtype float32 --prompt 256 --max-tokens 32 --rounds 2

The rounding is an elementwise pass (block amax, scale, e4m3 cast and back) over every input of a
quantized GEMM; DeepSeek's kernels fuse it into the GEMM, here it runs beside it (eager: separate
passes; compiled: inductor fuses it with its neighbours). Prompts are random token ids, completions
greedy with ``ignore_eos``, prefix caching off. Printed per row: the prefill time (the fastest
first-token-only run over the rounds after an untimed warm-up), decode tokens/s (output tokens after
the first over the fastest full run minus the fastest first-token-only run), and each one's ratio to
the row without the rounding in the same mode.
"""

from __future__ import annotations

import argparse
import time

import torch

from sparseek.engine import LLM, SamplingParams


def timed(llm: LLM, prompt: list[int], n: int) -> tuple[float, float]:
    params = SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)
    t0 = time.perf_counter()
    llm.generate([prompt], SamplingParams(max_tokens=1, temperature=0, ignore_eos=True))
    t1 = time.perf_counter()
    llm.generate([prompt], params)
    return t1 - t0, time.perf_counter() - t1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="small")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--prompt", type=int, default=256)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--no-compile", action="store_true")
    a = ap.parse_args()
    torch.manual_seed(0)
    modes = [False] if a.no_compile else [False, True]
    engines = {(c, act): LLM(a.model, dtype=a.dtype, max_batch_size=1, max_seq_len=a.prompt + a.max_tokens + 16,
                             compile=c, act_fp8=act, prefix_cache_bytes=0)
               for c in modes for act in (False, True)}
    vocab = next(iter(engines.values())).args.vocab_size
    prompt = torch.randint(16, vocab, (a.prompt,), generator=torch.Generator().manual_seed(1)).tolist()
    for llm in engines.values():  # warm-up (and compilation)
        timed(llm, prompt, a.max_tokens)
    best: dict = {k: (float("inf"), float("inf")) for k in engines}
    for _ in range(a.rounds):
        for k, llm in engines.items():
            p, full = timed(llm, prompt, a.max_tokens)
            best[k] = (min(best[k][0], p), min(best[k][1], full))
    print(f"# {a.model} {a.dtype}, prompt {a.prompt}, {a.max_tokens} new tokens, batch 1, best of {a.rounds} rounds")
    print(f"{'mode':9} {'act_fp8':8} {'prefill s':>10} {'x':>6} {'decode tok/s':>13} {'x':>6}")
    for c in modes:
        base_p, base_full = best[(c, False)]
        base_tps = (a.max_tokens - 1) / max(base_full - base_p, 1e-9)
        for act in (False, True):
            p, full = best[(c, act)]
            tps = (a.max_tokens - 1) / max(full - p, 1e-9)
            print(f"{'compiled' if c else 'eager':9} {str(act):8} {p:10.3f} {p / base_p:6.2f} {tps:13.1f} "
                  f"{tps / base_tps:6.2f}")


if __name__ == "__main__":
    main()
