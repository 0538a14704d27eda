"""A compile-time switch of the CPU kernels (``sparseek/model/csrc``) timed on and off in one process.

    python benchmarks/cpu_kernel_ab.py --out benchmarks/results/cpu-grouped-mm-prefetch.txt

The kernels' sources are built a second time with ``-D<SWITCH>=0`` (their op namespace renamed, so
both builds load side by side) and the two run the routed experts of the ``small`` preset (8
layers of 32 experts, gate/up 512 -> 512 and down 256 -> 512, each layer's weights its own, 200 MB
in all: a prompt streams them from memory as a prefill does), rows per expert from a random top-4
routing of 128 / 256 / 512 tokens, in alternating rounds (this VM drifts +-20% within minutes).
Prints the median milliseconds of each side, the weights' GB/s and B/A; checks both give the same
bits. Switches: SPARSEEK_GMM_PREFETCH (the grouped GEMM fetching its next weight rows into L2).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sparseek.model import cpu_kernels  # noqa: E402


def build_variant(define: str) -> object:
    """The kernels built with ``-D<define>=0``, their ops under torch.ops.sparseek_cpu_ab."""
    from torch.utils import cpp_extension

    tmp = Path(tempfile.mkdtemp(prefix="sparseek_ab_"))
    sources = []
    for src in cpu_kernels._SOURCES:
        dst = tmp / src.name
        dst.write_text(src.read_text().replace("sparseek_cpu,", "sparseek_cpu_ab,"))
        sources.append(str(dst))
    for header in cpu_kernels._HEADERS:
        shutil.copy(header, tmp / header.name)
    cpp_extension.load(f"sparseek_ab_{define.lower()}", sources, extra_cflags=cpu_kernels._FLAGS
                       + cpu_kernels._OPENMP + [f"-D{define}=0"], extra_ldflags=cpu_kernels._OPENMP,
                       is_python_module=False, build_directory=str(tmp))
    shutil.rmtree(tmp, ignore_errors=True)
    return torch.ops.sparseek_cpu_ab


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--switch", default="SPARSEEK_GMM_PREFETCH", choices=["SPARSEEK_GMM_PREFETCH"])
    ap.add_argument("--tokens", type=int, nargs="*", default=[128, 256, 512])
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    if not cpu_kernels.available():
        sys.exit("the CPU kernels do not run here (no AMX bf16, or no compiler)")
    torch.manual_seed(0)
    ops = {"A (switch off)": build_variant(a.switch).grouped_mm, "B (as built)": torch.ops.sparseek_cpu.grouped_mm}
    E, D, inter, layers, k = 32, 512, 256, 8, 4
    w13 = [torch.randn(E, 2 * inter, D, dtype=torch.bfloat16) for _ in range(layers)]
    w2 = [torch.randn(E, D, inter, dtype=torch.bfloat16) for _ in range(layers)]
    gb = layers * (w13[0].numel() + w2[0].numel()) * 2 / 1e9
    lines = [f"# {a.switch} off (A) and on (B): `small`'s routed experts, {layers} layers, {gb * 1e3:.0f} MB of "
             f"weights, torch {torch.__version__}, {torch.get_num_threads()} threads",
             f"Command: `python benchmarks/cpu_kernel_ab.py {' '.join(sys.argv[1:])}`", "",
             "| tokens | rows per expert (min-max) | A ms | A GB/s | B ms | B GB/s | B/A |", "|---|---|---|---|---|---|---|"]
    for T in a.tokens:
        counts = torch.bincount(torch.rand(T, E).topk(k, -1).indices.flatten(), minlength=E)
        offs = counts.cumsum(0).to(torch.int32)
        x = torch.randn(int(offs[-1]), D, dtype=torch.bfloat16)
        h = torch.randn(int(offs[-1]), inter, dtype=torch.bfloat16)

        def run(op):
            for layer in range(layers):
                op(x, w13[layer], offs)
                op(h, w2[layer], offs)
        a_op, b_op = ops.values()
        assert torch.equal(a_op(x, w13[0], offs), b_op(x, w13[0], offs))
        times = {name: [] for name in ops}
        for _ in range(2):
            for op in ops.values():
                run(op)
        for _ in range(a.rounds):
            for name, op in ops.items():
                t0 = time.perf_counter()
                run(op)
                times[name].append(time.perf_counter() - t0)
        ta, tb = (statistics.median(v) for v in times.values())
        lines.append(f"| {T} | {int(counts.min())}-{int(counts.max())} | {ta * 1e3:.2f} | {gb / ta:.1f} | "
                     f"{tb * 1e3:.2f} | {gb / tb:.1f} | {tb / ta:.3f} |")
        print(lines[-1], flush=True)
    text = "\n".join(lines) + "\n"
    print(text)
    if a.out:
        os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
        Path(a.out).write_text(text)


if __name__ == "__main__":
    main()
