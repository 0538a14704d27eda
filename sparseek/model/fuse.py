"""Compiler backends that fuse small matrix products into the code around them.

Inductor hands every ``mm``/``bmm`` to a library GEMM. For the products a decode step and the mHC
streams make, that is the wrong call on a CPU:

* a **single-row** ``mm`` (batch-1 decode: every projection, the experts, the LM head) goes to
  oneDNN, which streams a bf16 weight at ~12 GB/s and spends tens of microseconds on a small
  one. As ``(x * W).sum(-1)`` it is a reduction along the contiguous weight rows that inductor
  vectorises and fuses with the norms and activations around it (~2x the rate on the LM head: `benchmarks/profile_decode.py`).
  A product of a few rows (``rows``: a batch of up to 8, a speculative step's k + 1 tokens) fuses as
  well, measured faster than oneDNN's small-M GEMM (`benchmarks/fused_rows.py`);
* a **tiny contraction** (the 4 x 4 mHC stream mixing over [T, 4, D], attention over a short
  window) costs more as a batched library call than the elementwise pass it is.

Products with many rows keep the library GEMM: a reduction would re-read the weight once per row.
The rewrite accumulates in fp32 and rounds once, as the library kernels do.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = ["fusing_decompositions", "fusing_backend", "FUSED_ROWS", "SMALL_BMM_MACS", "TINY_CONTRACTION"]

# the most rows a product may have to run as a fused reduction on a CPU in the engine's compiled
# steps (measured: `benchmarks/fused_rows.py`); where the AMX kernel runs, bf16 dense layers of 2+
# rows take it instead (`cpu_kernels.COMPILED_MIN_ROWS`)
FUSED_ROWS = 8
# a batched product this small (multiply-adds), or with a contraction this short, fuses
SMALL_BMM_MACS = 1 << 20
TINY_CONTRACTION = 8


def _is(cond) -> bool:
    from torch.fx.experimental.symbolic_shapes import statically_known_true

    return statically_known_true(cond)


def fusing_decompositions(gpu: bool = False, rows: int = 1) -> dict:
    """Inductor's decomposition table with ``mm``/``addmm`` of up to ``rows`` rows and small or
    short ``bmm`` rewritten as multiply + sum. Only on CPU tensors unless ``gpu`` (where Triton's
    reductions need coordinate-descent tuning to compete with cuBLAS)."""
    from torch._inductor.decomposition import select_decomp_table

    aten = torch.ops.aten
    table = dict(select_decomp_table())
    fallback = {op: table.get(op) for op in (aten.mm.default, aten.addmm.default, aten.bmm.default)}

    def defer(op, *args, **kwargs):
        f = fallback[op]
        return NotImplemented if f is None else f(*args, **kwargs)

    def here(t):
        return gpu or t.device.type == "cpu"

    def row_times(a_MK, b_KN):
        return (a_MK.float().unsqueeze(2) * b_KN.float().unsqueeze(0)).sum(1)

    def mm(a, b, *args, **kwargs):
        if not args and not kwargs and here(a) and _is(a.shape[0] <= rows):
            return row_times(a, b).to(a.dtype)
        return defer(aten.mm.default, a, b, *args, **kwargs)

    def addmm(c, a, b, *args, beta=1, alpha=1, **kwargs):
        if not args and not kwargs and beta == 1 and alpha == 1 and here(a) and _is(a.shape[0] <= rows):
            return (c.float() + row_times(a, b)).to(a.dtype)
        return defer(aten.addmm.default, c, a, b, *args, beta=beta, alpha=alpha, **kwargs)

    def bmm(a, b, *args, **kwargs):
        if not args and not kwargs and here(a):
            (n, m, k), cols = a.shape, b.shape[2]
            if _is(k <= TINY_CONTRACTION) or _is(n * m * k * cols <= SMALL_BMM_MACS):
                return (a.float().unsqueeze(3) * b.float().unsqueeze(1)).sum(2).to(a.dtype)
        return defer(aten.bmm.default, a, b, *args, **kwargs)

    table.update({aten.mm.default: mm, aten.addmm.default: addmm, aten.bmm.default: bmm})
    return table


def vectorize_bitcasts() -> None:
    """Make inductor's CPU code reinterpret a vector of int32 as float32 (and back) in a register
    (``at::vec::cast``, one no-op instruction) instead of through a stack buffer and a scalar loop,
    its generic form for an op without a vector override. The FP8 / FP4 word products
    (``sparseek.quant.formats.word_product``) build every weight with such a bitcast: with the
    scalar loop they ran at 0.36-0.38 (FP8) / 1.66-1.72 (FP4) ns per weight on an AMX Xeon host
    (8-16x slower than on an AMD one), with this and ``plane_values``' normal FP4 planes at
    0.049-0.098 / 0.093-0.188 (``benchmarks/results/cpu-quant-gemv.txt``). Process-wide and
    idempotent: the same bits either way."""
    from torch._inductor.codegen import cpp
    from torch._inductor.codegen.cpp_utils import DTYPE_TO_CPP, CppCSEVariable
    from torch._inductor.virtualized import V

    vec = cpp.CppVecOverrides
    if getattr(vec.to_dtype_bitcast, "sparseek", False):
        return
    generic = vec.to_dtype_bitcast
    same = {torch.int32, torch.float32}

    def to_dtype_bitcast(x, dtype, src_dtype):
        if not (isinstance(x, CppCSEVariable) and x.is_vec):
            return cpp.CppOverrides.to_dtype_bitcast(x, dtype, src_dtype)
        k = V.kernel
        if {dtype, src_dtype} == same and dtype != src_dtype and k._get_num_vectors(dtype) == 1 \
                and k._get_num_vectors(src_dtype) == 1:
            return f"at::vec::cast<{DTYPE_TO_CPP[dtype]}, {DTYPE_TO_CPP[src_dtype]}>({x})"
        return generic(x, dtype, src_dtype)

    to_dtype_bitcast.sparseek = True
    vec.to_dtype_bitcast = staticmethod(to_dtype_bitcast)


def fusing_backend(gpu: bool = False, rows: int = 1, **config_patches) -> Callable:
    """A ``torch.compile`` backend: inductor with ``fusing_decompositions(gpu, rows)`` (and, for
    CPU code, ``vectorize_bitcasts``). A backend callable takes no ``mode``: CUDA graphs come as
    ``**{"triton.cudagraphs": True}``."""
    from torch._inductor.compile_fx import compile_fx

    vectorize_bitcasts()

    def backend(gm, example_inputs):
        return compile_fx(gm, example_inputs, decompositions=fusing_decompositions(gpu, rows),
                          config_patches=config_patches or None)
    return backend
