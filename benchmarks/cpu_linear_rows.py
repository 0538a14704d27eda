"""Dense products of 128-512 rows: the AMX kernel (``cpu_kernels.linear``) whole or in 128-row blocks
against oneDNN (``F.linear``), for the `small` preset's projection shapes, bf16, 2 threads.

    python benchmarks/cpu_linear_rows.py

What ``cpu_kernels.LINEAR_MAX_ROWS`` (128) rests on: past 128 rows the kernel, which does not block
over rows, is no longer reliably faster, and splitting into 128-row calls is slower still.
"""

from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F

import sparseek
from sparseek.model import build_model, cpu_kernels


def timed_us(fn, n: int = 200) -> float:
    for _ in range(10):
        fn()
    runs = []
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(n):
            fn()
        runs.append((time.perf_counter() - t) / n * 1e6)
    return statistics.median(runs)


def main() -> None:
    if not cpu_kernels.available():
        raise SystemExit("the AMX kernels do not run on this CPU")
    model = build_model(sparseek.preset("small"), dtype=torch.bfloat16)
    shapes = sorted({tuple(m.weight.shape) for m in model.layers[1].modules()
                     if isinstance(m, torch.nn.Linear) and m.weight.shape[0] % 32 == 0 and m.weight.shape[1] % 32 == 0})
    op = torch.ops.sparseek_cpu.linear
    print(f"# {torch.get_num_threads()} threads; us per product (median of 5 x 200)")
    with torch.inference_mode():
        for rows in (128, 256, 512):
            for N, K in shapes:
                w, x = torch.randn(N, K, dtype=torch.bfloat16), torch.randn(rows, K, dtype=torch.bfloat16)
                lib = timed_us(lambda: F.linear(x, w))
                whole = timed_us(lambda: op(x, w))
                blocks = timed_us(lambda: torch.cat([op(x[i:i + 128], w) for i in range(0, rows, 128)]))
                print(f"rows {rows:4d} N {N:5d} K {K:5d}: oneDNN {lib:7.1f}  kernel {whole:7.1f} ({lib / whole:.2f}x)  "
                      f"128-row blocks {blocks:7.1f} ({lib / blocks:.2f}x)", flush=True)


if __name__ == "__main__":
    main()
