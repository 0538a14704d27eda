"""Compiled single-row products on weights kept FP8 / FP4 (what a compiled CPU decode step runs for
every quantized linear layer and gathered expert), per weight, next to the bf16 GEMV a dense step
runs and the time the weight's bytes take at the measured copy bandwidth.

    python benchmarks/quant_gemv.py > benchmarks/results/cpu-quant-gemv.txt

Rows: ``bf16`` the dense weight through the engine's fusing backend (a reduction inductor
vectorises); ``bytes`` the quantized weight decoded by ``formats.dequantize`` inside the same
product (the compiled step's path before word decoding: uint8 loads); ``words``
``formats.word_product`` (what ``QuantLinear`` / ``QuantExperts`` run in a compiled CPU step
now). Shapes: an attention-projection-sized matrix that stays in this host's 32 MB L3 and one
that does not (64 MB in bf16). Best of 3 rounds; this VM drifts, compare rows of one run.
"""

from __future__ import annotations

import argparse
import platform
import time

import torch
import torch.nn.functional as F

from sparseek.model.fuse import fusing_backend
from sparseek.quant.formats import dequantize, quantize, word_product


def best_s(f, *args, calls: int = 50, rounds: int = 3) -> float:
    for _ in range(3):
        f(*args)
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(calls):
            f(*args)
        best = min(best, (time.perf_counter() - t0) / calls)
    return best


def copy_bandwidth() -> float:
    a = torch.empty(64 << 20, dtype=torch.uint8)
    b = torch.empty_like(a)
    return 2 * a.numel() / best_s(lambda: b.copy_(a), calls=10)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", nargs="*", default=["4096x1024", "8192x4096"])
    args = ap.parse_args()
    torch._dynamo.config.recompile_limit = 64
    bw = copy_bandwidth()
    print(f"# torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.machine()}, "
          f"copy bandwidth {bw / 1e9:.1f} GB/s")
    print("# ns per weight, batch-1 product compiled (inductor, CPU); 'bytes at bw': the weight's "
          "bytes / copy bandwidth")
    be = fusing_backend(False, 1)
    for shape in args.shapes:
        out, inp = map(int, shape.split("x"))
        g = torch.Generator().manual_seed(0)
        w = torch.randn(out, inp, generator=g) * 0.02
        x = torch.randn(1, inp, generator=g).bfloat16()
        n = out * inp
        print(f"\n## [{out}, {inp}] ({n / 1e6:.1f}M weights)")
        dense = torch.compile(lambda x, w: F.linear(x, w), backend=be, dynamic=False)
        t = best_s(dense, x, w.bfloat16())
        print(f"bf16                     {t / n * 1e9:6.3f}   (bytes at bw {2 / bw * 1e9:.3f})")
        for fmt in ("fp8", "fp4"):
            for sf in ("e8m0", "f32"):
                raw, sc = quantize(w, fmt, sf)
                per = (raw.numel() + sc.numel()) / n

                def by_bytes(x, raw, sc, fmt=fmt, sf=sf):
                    return F.linear(x, dequantize(raw, sc, fmt, sf, inp, x.dtype))

                def by_words(x, raw, sc, fmt=fmt, sf=sf):
                    return word_product(x, raw, sc, fmt, sf, out, inp).to(x.dtype)

                tb = best_s(torch.compile(by_bytes, backend=be, dynamic=False), x, raw, sc)
                tw = best_s(torch.compile(by_words, backend=be, dynamic=False), x, raw, sc)
                print(f"{fmt} {sf:4s} bytes {tb / n * 1e9:6.3f}  words {tw / n * 1e9:6.3f}  "
                      f"({tb / tw:.1f}x; bytes at bw {per / bw * 1e9:.3f}; bf16 / words {t / tw:.2f})")


if __name__ == "__main__":
    main()
