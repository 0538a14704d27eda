"""What decoding FP8 / FP4 weights costs per weight on this machine, next to streaming an fp32
weight through a matrix-vector product (what a dense decode step pays per weight).

    python benchmarks/quant_decode.py > benchmarks/results/cpu-quant-decode.txt

Shapes: one layer's routed experts of the `small` preset (32 x 256 x 512, w1) and an attention
projection-sized matrix (4096 x 1024). Decoders are sparseek.quant.formats.dequantize (eager), as
QuantLinear / QuantExperts run them; best of 3 rounds of 10 calls each.
"""

from __future__ import annotations

import platform
import time

import torch

from sparseek.checkpoint.quant import quant_fp4, quant_fp8
from sparseek.quant.formats import dequantize


def best_ns_per_weight(f, n_weights: int, calls: int = 10, rounds: int = 3) -> float:
    f()
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(calls):
            f()
        best = min(best, (time.perf_counter() - t0) / calls)
    return best * 1e9 / n_weights


def main():
    print(f"# torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}, "
          f"{torch.backends.cpu.get_cpu_capability()}")
    g = torch.Generator().manual_seed(0)
    for shape in [(32, 256, 512), (1, 4096, 1024)]:
        w = torch.randn(shape, generator=g) / 20
        n = w.numel()
        q8 = [quant_fp8(w[e]) for e in range(shape[0])]
        q4 = [quant_fp4(w[e]) for e in range(shape[0])]
        raw8 = torch.stack([q.view(torch.uint8) for q, _ in q8]); s8 = torch.stack([s.view(torch.uint8) for _, s in q8])
        raw4 = torch.stack([q.view(torch.uint8) for q, _ in q4]); s4 = torch.stack([s.view(torch.uint8) for _, s in q4])
        x = torch.randn(shape[-1], generator=g)
        rows = {
            "fp32 matrix-vector product (reads each weight once)": lambda: w @ x,
            "fp32 copy (read + write)": lambda: w.clone(),
            "FP8 e4m3 -> fp32 decode (128x128 e8m0 scales)":
                lambda: dequantize(raw8, s8, "fp8", "e8m0", shape[-1], torch.float32),
            "FP4 e2m1 -> fp32 decode (1x32 e8m0 scales)":
                lambda: dequantize(raw4, s4, "fp4", "e8m0", shape[-1], torch.float32),
        }
        print(f"\n## {list(shape)} ({n / 1e6:.1f}M weights)")
        for name, f in rows.items():
            print(f"{name:55s} {best_ns_per_weight(f, n):6.2f} ns/weight")


if __name__ == "__main__":
    main()
