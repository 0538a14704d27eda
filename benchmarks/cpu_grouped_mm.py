"""The AMX grouped GEMM for the routed experts (``sparseek/model/cpu_kernels.py``) against
``torch._grouped_mm`` (one oneDNN GEMM per expert), then its effect on a compiled prefill.

    python benchmarks/cpu_grouped_mm.py --out benchmarks/results/cpu-grouped-mm.txt

Part 1, one grouped product: the ``small`` preset's expert matrices (gate/up 512 -> 512, down
256 -> 512, 32 experts) and V4-Flash's (4096 -> 4096, 2048 -> 4096, 8 of its experts), rows per
expert drawn from a routing as skewed as a random-init model's (expert popularity lognormal);
weights hot (one stack, reused: in cache) and cold (stacks cycled through 256 MB+, as a model's
layers follow each other) and two sizes between them (16 experts of 1024 x 1024 and 2048 x 2048).
Columns: microseconds, GFLOP/s, the weights' GB/s against the measured read bandwidth
(their bytes / bandwidth is the floor), the kernel's speed-up.
Part 2, dense layers (``cpu_kernels.linear``, the kernel with one group): ``F.linear`` (oneDNN)
against the kernel by rows, for ``small``'s projections, its LM head and V4-Flash's attention
projections, weights hot; where ``LINEAR_MAX_ROWS`` comes from.
Part 3: ``small`` bf16 prefill with the hot paths compiled, kernel on and off
(``SPARSEEK_CPU_KERNELS=0``), each in its own process, alternating rounds (this VM drifts
+-20% within minutes); median ms per prefill of each side's rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

from bench_engine import emit


def read_bandwidth_gbs() -> float:
    x = torch.ones(64 << 20)  # 256 MB
    x.sum()
    t0 = time.perf_counter()
    for _ in range(5):
        x.sum()
    return 5 * x.numel() * 4 / (time.perf_counter() - t0) / 1e9


def product_rows(bw: float) -> list[str]:
    from sparseek.model import cpu_kernels

    lines = [f"read bandwidth {bw:.1f} GB/s ({torch.get_num_threads()} threads)", "",
             f"{'shape':<26}{'tokens':>7}{'rows/expert':>13}{'weights':>9} | {'torch us':>9}{'GF/s':>6} | "
             f"{'kernel us':>9}{'GF/s':>6}{'GB/s':>6} | {'speed-up':>8}"]
    g = torch.Generator().manual_seed(0)
    for name, E, N, K, k in [("small gate/up 512->512", 32, 512, 512, 4), ("small down 256->512", 32, 512, 256, 4),
                             ("1024->1024", 16, 1024, 1024, 2), ("2048->2048", 16, 2048, 2048, 2),
                             ("V4-Flash gate/up 4096->4096", 8, 4096, 4096, 1), ("V4-Flash down 2048->4096", 8, 4096, 2048, 1)]:
        stack_mb = E * N * K * 2 / 2**20
        for T in ([32, 128, 512] if E == 32 else [32, 256] if E == 16 else [16, 64, 256]):
            p = torch.randn(E, generator=g).exp()
            e = torch.multinomial(p / p.sum(), T * k, replacement=True, generator=g).sort().values
            counts = torch.bincount(e, minlength=E)
            offs = counts.cumsum(0).to(torch.int32)
            x = torch.randn(T * k, K, dtype=torch.bfloat16, generator=g)
            for temp, L in (("hot", 1), ("cold", max(2, int(320 // stack_mb) + 1))):
                ws = [torch.randn(E, N, K, dtype=torch.bfloat16, generator=g) for _ in range(L)]

                def per_call(f, ws=ws):
                    for w in ws:
                        f(w)
                    reps = max(2, int(2e8 // (E * N * K * 2 * L)))
                    t0 = time.perf_counter()
                    for _ in range(reps):
                        for w in ws:
                            f(w)
                    return (time.perf_counter() - t0) / reps / len(ws) * 1e6

                ref = per_call(lambda w: torch._grouped_mm(x, w.transpose(-2, -1), offs=offs))
                got = per_call(lambda w: cpu_kernels.grouped_mm(x, w, offs))
                flop = 2 * T * k * N * K
                used = int((counts > 0).sum())
                lines.append(f"{name:<26}{T:>7}{f'{counts.min()}-{counts.max()}':>13}{temp:>9} | {ref:>9.0f}"
                             f"{flop / ref / 1e3:>6.0f} | {got:>9.0f}{flop / got / 1e3:>6.0f}"
                             f"{used * N * K * 2 / got / 1e3:>6.1f} | {ref / got:>7.2f}x")
                del ws
    return lines


def linear_rows() -> list[str]:
    from sparseek.model import cpu_kernels

    lines = ["", "dense layers, us per call (weights hot)",
             f"{'shape (N x K)':<30}" + "".join(f"{f'M={m}':>19}" for m in LINEAR_M)]
    g = torch.Generator().manual_seed(1)
    for name, N, K in [("small wq_a / shared w1", 256, 512), ("small wq_b / shared w2", 512, 256),
                       ("small wo_b", 512, 1024), ("small LM head", 32768, 512),
                       ("V4-Flash wq_a", 1024, 4096), ("V4-Flash wo_b", 4096, 8192)]:
        w = torch.randn(N, K, dtype=torch.bfloat16, generator=g)
        cells = []
        for M in LINEAR_M:
            x = torch.randn(M, K, dtype=torch.bfloat16, generator=g)
            ref = timed(lambda: torch.nn.functional.linear(x, w))
            got = timed(lambda: torch.ops.sparseek_cpu.linear(x, w))
            cells.append(f"{ref:.0f}/{got:.0f} {ref / got:.1f}x")
        lines.append(f"{name + f' {N}x{K}':<30}" + "".join(f"{c:>19}" for c in cells))
    lines.append("(each cell: oneDNN us / kernel us, speed-up)")
    return lines


LINEAR_M = [1, 16, 64, 128, 256, 512, 1024]


def timed(f) -> float:
    f(), f()
    n, t0 = 0, time.perf_counter()
    while n < 3 or time.perf_counter() - t0 < 0.3:
        f()
        n += 1
    return (time.perf_counter() - t0) / n * 1e6


def child(lengths: list[int]) -> None:
    import sparseek
    from sparseek.model.v4 import compile_hot_paths

    torch.manual_seed(0)
    model, _ = sparseek.load("small", dtype=torch.bfloat16, tokenizer=False)
    compile_hot_paths()
    out = {}
    with torch.inference_mode():
        for T in lengths:
            ids = torch.randint(10, model.args.vocab_size, (1, T))

            def run():
                return model(ids, model.new_cache(1, T + 1), last_n=1)

            run(), run()
            times = []
            for _ in range(5):
                t0, n = time.perf_counter(), 0
                while n < 2 or time.perf_counter() - t0 < 1.0:
                    run()
                    n += 1
                times.append((time.perf_counter() - t0) / n * 1e3)
            out[T] = statistics.median(times)
    print(json.dumps(out))


def prefill_rows(lengths: list[int], rounds: int) -> list[str]:
    ms: dict[str, list[dict]] = {"1": [], "0": []}
    for _ in range(rounds):
        for flag in ("1", "0"):
            env = {**os.environ, "SPARSEEK_CPU_KERNELS": flag}
            r = subprocess.run([sys.executable, __file__, "--child", *map(str, lengths)], env=env,
                               capture_output=True, text=True, check=True)
            ms[flag].append(json.loads(r.stdout.strip().splitlines()[-1]))
    lines = ["", f"small bf16 prefill, hot paths compiled, ms (median of {rounds} alternating processes)",
             f"{'tokens':>7} | {'library GEMMs':>13} | {'AMX kernel':>10} | speed-up"]
    for T in lengths:
        off = statistics.median(r[str(T)] for r in ms["0"])
        on = statistics.median(r[str(T)] for r in ms["1"])
        lines.append(f"{T:>7} | {off:>13.1f} | {on:>10.1f} | {off / on:.2f}x")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prefill", type=int, nargs="*", default=[128, 256, 512, 2048])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--child", type=int, nargs="*", default=None)
    ap.add_argument("--parts", nargs="*", default=["experts", "linear", "prefill"], choices=["experts", "linear", "prefill"])
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    if a.child is not None:
        return child(a.child)
    from sparseek.model import cpu_kernels

    if not cpu_kernels.available():
        sys.exit("the AMX kernel does not run here (no amx_bf16 / avx512_bf16 CPU flags, or the build failed)")
    lines = [f"$ python {' '.join(sys.argv)}", f"torch {torch.__version__}, CPU: {torch.cpu.get_capabilities().get('cpu_name', 'unknown')}", ""]
    if "experts" in a.parts:
        lines += product_rows(read_bandwidth_gbs())
    if "linear" in a.parts:
        lines += linear_rows()
    if a.prefill and "prefill" in a.parts:
        lines += prefill_rows(a.prefill, a.rounds)
    emit("\n".join(lines), a.out)


if __name__ == "__main__":
    main()
