"""Compiled CPU decoding with weights kept quantized in memory: how long the first call takes
(compiling the decode step and prefill's hot paths) and the batch-1 decode speed after it.

    python benchmarks/quant_compiled_decode.py --formats bf16 fp8 fp4

``fp8``: every linear layer and routed expert FP8 (DeepSeek's 128 x 128 blocks); ``fp4``: routed
experts FP4 (MXFP4), the other linear layers FP8; ``bf16``: the dense model. Random weights of
the ``small`` preset, bf16 compute, greedy decoding of 64 new tokens. To compare with another
commit, run it with ``PYTHONPATH`` pointing at that commit's checkout (a fresh inductor cache per
run: ``TORCHINDUCTOR_CACHE_DIR``, set here to a new temporary directory unless given).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time


def one(fmt: str, preset: str, new: int, rounds: int) -> None:
    import torch

    import sparseek
    from sparseek.engine import LLM, SamplingParams
    from sparseek.model import build_model
    from sparseek.quant import quantize_model_
    from sparseek.tokenizer import default_tokenizer

    args = sparseek.preset(preset)
    torch.manual_seed(0)
    m = build_model(args, dtype=torch.bfloat16).eval()
    if fmt != "bf16":
        quantize_model_(m, experts=fmt, linears="fp8")
    weights = sum(t.numel() * t.element_size() for t in list(m.parameters()) + list(m.buffers()))
    llm = LLM(m, default_tokenizer(args.vocab_size), max_batch_size=1, max_seq_len=256, compile=True)
    t0 = time.perf_counter()
    llm.generate(["hello world"], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
    first = time.perf_counter() - t0
    rates = []
    for _ in range(rounds):  # this VM drifts within a minute: best and median of several rounds
        t0 = time.perf_counter()
        llm.generate(["hello world"], SamplingParams(max_tokens=new, temperature=0, ignore_eos=True))
        rates.append(new / (time.perf_counter() - t0))
    rates.sort()
    print(f"{fmt:5s} weights {weights / 2**20:6.0f} MB  first call (compiles) {first:6.1f} s  "
          f"decode batch 1 best {rates[-1]:6.1f} median {rates[len(rates) // 2]:6.1f} tok/s", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--formats", nargs="+", default=["bf16", "fp8", "fp4"])
    ap.add_argument("--preset", default="small")
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=5, help="decodes of --new tokens timed after the first call")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.one:
        return one(a.one, a.preset, a.new, a.rounds)
    import torch

    print(f"# torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"$ python benchmarks/quant_compiled_decode.py --formats {' '.join(a.formats)}")
    for fmt in a.formats:  # each in its own process and inductor cache: no format reuses another's kernels
        env = dict(os.environ)
        env.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix=f"inductor-{fmt}-"))
        subprocess.run([sys.executable, __file__, "--one", fmt, "--preset", a.preset, "--new", str(a.new),
                        "--rounds", str(a.rounds)],
                       env=env, check=True)


if __name__ == "__main__":
    main()
