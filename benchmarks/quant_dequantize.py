"""Whole-matrix decoding of FP8 / FP4 weights on a CPU (what a forward over many tokens, prefill,
runs before each quantized GEMM), and the prefill speed it gives.

    python benchmarks/quant_dequantize.py > benchmarks/results/cpu-quant-dequantize.txt

Part 1, ns per weight: ``eager`` ``formats.dequantize`` (a table gather or conversion, then a
pass over memory per op); ``kernel`` ``formats.decode`` after ``compile_decoders()`` (one
compiled kernel per call: ``packed_decode``), into bf16 and fp32, next to the time the output's
bytes take at the measured copy bandwidth (a decode cannot beat writing its output); ``kept``
(one matrix) the kernel writing into a buffer kept between calls (``decode(..., scratch=...)``,
what a prefill's ``QuantLinear`` does without autograd for fp32 outputs from 32 MB up): a fresh output above
glibc's mmap threshold is new pages on every call. The ratio is eager / kernel. Shapes: the
``small`` preset's routed experts (all 32, w1 and w3 in one call as ``QuantExperts.dense`` asks)
and a 4096 x 4096 linear layer.

Part 2, prefill tokens/s of the ``small`` preset (random weights, bf16 compute, 512 tokens,
batch 1) with its weights dense / FP8 / FP4 (FP4: routed experts, the other linears FP8):
``eager`` the plain forward; ``decoders`` the same after ``compile_decoders()``, decoding into
kept buffers where they apply (``formats._scratch``: none of ``small``'s matrices is 32 MB),
``fresh`` into a new output per call as before them (the three alternating, three rounds, best of
each); ``hot`` after ``compile_hot_paths()`` as well
(what ``LLM(compile=True)`` runs). Each format in its own process; this VM drifts ~15%: compare rows of
one run. To compare with another commit (``hot`` there
compiles its own in-graph decoding):
``PYTHONPATH=<checkout> python benchmarks/quant_dequantize.py --one fp8``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile

import torch
from quant_gemv import best_s, copy_bandwidth  # benchmarks/ is this script's folder


def kernels() -> None:
    import sparseek
    from sparseek.quant import formats

    bw = copy_bandwidth()
    print(f"# torch {torch.__version__}, {torch.get_num_threads()} threads, copy bandwidth {bw / 1e9:.1f} GB/s")
    print("# ns per decoded weight; 'out at bw': the output's bytes / copy bandwidth")
    a = sparseek.preset("small")
    E, inter, dim = a.n_routed_experts, a.moe_intermediate_size, a.hidden_size
    cases = {f"small experts w1+w3 [{E}, 2 x {inter}, {dim}]": (2, (E, inter, dim)),
             "linear [4096, 4096]": (1, (4096, 4096))}
    formats.compile_decoders()
    for label, (k, shape) in cases.items():
        g = torch.Generator().manual_seed(0)
        print(f"\n## {label}")
        for fmt in ("fp8", "fp4"):
            for sf in ("e8m0", "f32"):
                mats = []
                for _ in range(k):  # quantize() takes one matrix: a stack is quantized expert by expert
                    w = torch.randn(*shape, generator=g).view(-1, *shape[-2:]) * 0.02
                    qs = [formats.quantize(m, fmt, sf) for m in w]
                    mats.append(tuple(torch.stack(t).view(*shape[:-2], *t[0].shape) for t in zip(*qs)))
                n = k * shape[-2] * shape[-1] * (shape[0] if len(shape) == 3 else 1)
                row = []
                for dtype in (torch.bfloat16, torch.float32):
                    def eager(mats=mats, dtype=dtype):
                        ws = [formats.dequantize(r, s, fmt, sf, shape[-1], dtype) for r, s in mats]
                        return ws[0] if k == 1 else torch.cat(ws, dim=-2)

                    def kernel(mats=mats, dtype=dtype, scratch=None):
                        with torch.no_grad():
                            return formats.decode(mats, fmt, sf, shape[-1], dtype, scratch=scratch)

                    assert torch.equal(eager(), kernel()) and torch.equal(eager(), kernel(scratch="kept"))
                    te, tk = best_s(eager, calls=5), best_s(kernel, calls=5)
                    size = torch.finfo(dtype).bits // 8
                    kept = ""
                    if k == 1 and dtype == torch.float32:  # what QuantLinear does (not into bf16; not the experts)
                        kept = f"kept {best_s(lambda: kernel(scratch='kept'), calls=5) / n * 1e9:5.2f} "
                    row.append(f"{str(dtype)[6:]:8s} eager {te / n * 1e9:5.2f}  kernel {tk / n * 1e9:5.2f} "
                               f"{kept}({te / tk:4.1f}x; out at bw {size / bw * 1e9:.2f})")
                print(f"{fmt} {sf:4s}  " + "   ".join(row), flush=True)


def prefill(fmt: str, T: int) -> None:
    import sparseek
    from sparseek.model import build_model
    from sparseek.model.v4 import compile_hot_paths
    from sparseek.quant import formats, quantize_model_

    a = sparseek.preset("small")
    torch.manual_seed(0)
    m = build_model(a, dtype=torch.bfloat16).eval()
    if fmt != "bf16":
        quantize_model_(m, experts=fmt, linears="fp8")
    ids = torch.randint(10, a.vocab_size, (1, T))

    def run():
        return m(ids, m.new_cache(1, T + 1), last_n=1)

    compile_decoders = getattr(formats, "compile_decoders", None)  # absent before this benchmark's commit
    if compile_decoders:
        compile_decoders()
    kernel, best = formats._decoder if compile_decoders else None, {}
    keep = getattr(formats, "SCRATCH_MIN_BYTES", None)  # absent before the kept decode buffers
    modes = ("eager", "fresh", "decoders") if keep is not None else ("eager", "decoders")
    with torch.inference_mode():
        for _ in range(3):  # the modes alternating (this VM drifts), best of each
            for mode in modes:
                formats._decoder = kernel if mode != "eager" else None
                if keep is not None:  # "fresh": a new output per decode, as before the kept buffers
                    formats.SCRATCH_MIN_BYTES = 1 << 62 if mode == "fresh" else keep
                best[mode] = max(best.get(mode, 0), T / best_s(run, calls=2, rounds=2))
        compile_hot_paths()
        best["hot"] = T / best_s(run, calls=2)
    rates = [f"{mode} {r:7.0f}" for mode, r in best.items()]
    print(f"{fmt:5s} " + "   ".join(rates), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--formats", nargs="+", default=["bf16", "fp8", "fp4"])
    ap.add_argument("--one", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.one:
        return prefill(a.one, a.tokens)
    kernels()
    print(f"\n## prefill tokens/s, small preset, {a.tokens} tokens, batch 1, bf16 compute")
    for fmt in a.formats:  # each in its own process and inductor cache
        env = dict(os.environ)
        env.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix=f"inductor-{fmt}-"))
        subprocess.run([sys.executable, __file__, "--one", fmt, "--tokens", str(a.tokens)], env=env, check=True)


if __name__ == "__main__":
    main()
