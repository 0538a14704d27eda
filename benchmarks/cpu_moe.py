"""The host's side of ``--cpu-moe``: what one MoE layer's routed experts cost the CPU per decode
step when they live in host memory beside a GPU (``sparseek.parallel.offload``).

    python benchmarks/cpu_moe.py --out benchmarks/results/cpu-moe-flash-layer.txt

One layer with V4-Flash's expert shapes (hidden 4,096, expert width 2,048, top-6; ``--experts``
of them: the cost of a step depends on the picked ones, not on how many wait in memory), stored
as bf16, FP8 or FP4 (``sparseek.quant``), fed 1 to 8 tokens with random routing. Two ways to run
the picked experts: eager (the split forward's default: decoding the picked experts' matrices
whole, then GEMMs; quantized ones through the compiled decoders ``LLM(compile=True)`` sets up)
and compiled ``forward_static`` (each (token, slot) gathers its expert's matrices into fused
GEMVs, the CPU decode step's form, reading FP8 / FP4 codes in place). The roofline: bytes of the
distinct picked experts / the measured copy bandwidth. Times: median of ``--reps`` calls,
different routing each call (no expert re-read from cache).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))

from bench_engine import bandwidth_gbs, emit  # noqa: E402
from sparseek.model.common import Experts  # noqa: E402
from sparseek.model import common  # noqa: E402
from sparseek.parallel.offload import compile_host_experts  # noqa: E402
from sparseek.quant.formats import compile_decoders  # noqa: E402
from sparseek.quant.modules import QuantExperts  # noqa: E402

DIM, INTER, TOPK = 4096, 2048, 6


def stack(fmt: str, n: int) -> torch.nn.Module:
    torch.manual_seed(0)
    ex = Experts(n, DIM, INTER, limit=10.0, dtype=torch.bfloat16).requires_grad_(False)
    for w in (ex.w1, ex.w2, ex.w3):
        w.normal_(0, 0.02)
    return ex if fmt == "bf16" else QuantExperts.from_experts(ex, fmt=fmt, scale_fmt="e8m0")


def expert_bytes(fmt: str) -> float:
    return 3 * DIM * INTER * {"bf16": 2.0, "fp8": 1 + 1 / 128, "fp4": 0.5 + 1 / 32}[fmt]


def timed(fn, ex, tokens: int, reps: int) -> tuple[float, float]:
    """-> (median seconds per call, mean distinct experts per call)."""
    g = torch.Generator().manual_seed(1)
    calls = []
    for _ in range(reps + 2):
        x = torch.randn(tokens, DIM, generator=g).to(torch.bfloat16)
        idx = torch.stack([torch.randperm(ex.n, generator=g)[:TOPK] for _ in range(tokens)])
        w = torch.rand(tokens, TOPK, generator=g)
        calls.append((x, w, idx))
    times = []
    with torch.inference_mode():
        for i, (x, w, idx) in enumerate(calls):
            t = time.perf_counter()
            fn(x, w, idx)
            if i >= 2:  # two warm-up calls (and compilation)
                times.append(time.perf_counter() - t)
    distinct = statistics.mean(len(set(idx.flatten().tolist())) for _, _, idx in calls[2:])
    return statistics.median(times), distinct


def main():
    global DIM, INTER
    ap = argparse.ArgumentParser()
    ap.add_argument("--experts", type=int, default=32)
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 4, 8])
    ap.add_argument("--formats", nargs="+", default=["bf16", "fp8", "fp4"])
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--dim", type=int, default=4096, help="hidden size (default: V4-Flash's)")
    ap.add_argument("--inter", type=int, default=2048, help="expert width (default: V4-Flash's)")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    DIM, INTER = a.dim, a.inter
    bw = bandwidth_gbs("cpu")
    compile_decoders()
    compile_host_experts()
    lines = [f"# {' '.join(['python', *sys.argv])}", "",
             f"torch {torch.__version__}, {torch.get_num_threads()} threads, copy bandwidth {bw:.1f} GB/s "
             f"(read + write), {a.experts} experts of {DIM} x {INTER}, top-{TOPK}", "",
             "| format | tokens | way | ms per layer | distinct experts | GB/s of experts read | fraction of copy bandwidth |",
             "|---|---|---|---|---|---|---|"]
    for fmt in a.formats:
        ex = stack(fmt, a.experts)
        ways = {"eager": ex, "compiled": lambda x, w, idx: common.host_experts(ex, x, w, idx)}
        for tokens in a.tokens:
            for way, fn in ways.items():
                s, distinct = timed(fn, ex, tokens, a.reps)
                gbs = distinct * expert_bytes(fmt) / s / 1e9
                lines.append(f"| {fmt} | {tokens} | {way} | {s * 1e3:.1f} | {distinct:.1f} | {gbs:.1f} | {gbs / bw:.2f} |")
                print(lines[-1], flush=True)
        del ex, ways
        torch._dynamo.reset()
    lines += ["", "V4-Flash has 43 MoE layers (44 with MTP): a decode step's host part is ~43x a row's time, less what"
              " the GPU's shared expert and attention overlap with it."]
    emit("\n".join(lines), a.out)


if __name__ == "__main__":
    main()
