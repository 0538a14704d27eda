"""Hand-written CPU kernels, built from ``csrc/`` at first use where the CPU can run them.

``grouped_mm``, the routed experts' grouped bf16 GEMM on CPUs with AMX tiles (Intel
Sapphire Rapids and later). torch runs ``torch._grouped_mm`` on the CPU as one oneDNN GEMM per
expert, and each call packs its weight matrix anew (~25-35 us), which is most of an expert's time
at the 4-30 rows a short prompt or a batched decode step gives it. The kernel reads the weights as
they lie (see the .cpp file): 2.2-4.3x faster than the per-expert calls for the ``small`` preset's
experts, 1.3-1.9x for V4-Flash's (``benchmarks/cpu_grouped_mm.py``). ``linear``, the same kernel
for a dense layer's product of a few rows (a short prompt, a batched decode step), where oneDNN's
per-call packing costs as much. ``sinkhorn``, mHC's Sinkhorn projection (``csrc/cpu_mhc.cpp``):
each token's 4 x 4 matrix on one thread through all its iterations (~20 us for a 128-token
prompt, ``benchmarks/prefill_hot_paths_ab.py``), where inductor runs ~40 parallel loops with a
barrier each. ``hc_pre`` / ``hc_post``, a block's whole mHC passes over bf16 streams (the
sublayer's RMSNorm included), 16 tokens at a time in L1/L2 (same file). ``attn_softmax``, the
sparse attention's softmax over [window ; compressed ; sink] from bf16 score products
(``csrc/cpu_attention.cpp``). All run only where autograd does not (inference).

The build (torch.utils.cpp_extension, ninja, the system's C++ compiler, ~25 s once, cached under
``TORCH_EXTENSIONS_DIR`` or ~/.cache/torch_extensions) is tried once per process, only on Linux
x86-64 CPUs listing ``amx_bf16`` and ``avx512_bf16``; if it fails, a warning says why and the
library GEMMs serve as before. ``SPARSEEK_CPU_KERNELS=0`` turns the kernels off.
"""

from __future__ import annotations

import os
import sys
import threading
import time
import warnings
from pathlib import Path

import torch

_NAME = "sparseek_cpu_kernels"
_SOURCES = [Path(__file__).with_name("csrc") / f for f in ("cpu_grouped_mm.cpp", "cpu_mhc.cpp",
                                                                  "cpu_attention.cpp")]
_HEADERS = [Path(__file__).with_name("csrc") / "bf16_vec.h"]
_STALE_LOCK_S = 300  # a build takes ~10-25 s
# -ffp-contract=off: a product and a sum written apart round apart, as torch's do (csrc/cpu_mhc.cpp)
_FLAGS = ["-O3", "-ffp-contract=off", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512bf16",
          "-mamx-tile", "-mamx-bf16"]
# at::parallel_for is a header template over `#pragma omp parallel`: compiled without -fopenmp it
# runs on the calling thread alone (the thirty-first session's kernel did: half the speed on 2
# cores). Linked with -fopenmp the library asks for libgomp.so.1, which resolves to the copy torch
# has already loaded, so both share one thread pool.
_OPENMP = ["-fopenmp"]
# A dense layer's product goes through the kernel for up to LINEAR_MAX_ROWS rows: 1.2-3x oneDNN's
# GEMM up to 128 rows for `small`'s and V4-Flash's projections, 0.8-1.4x at 256 (oneDNN blocks over
# rows, the kernel does not; split into 128-row calls it is slower still: `cpu-linear-rows.txt`). Eager single rows (the LM head after a prefill: 32 MB for `small`)
# take the kernel: 1.6x oneDNN's GEMV (`benchmarks/results/cpu-grouped-mm.txt`).
LINEAR_MAX_ROWS = 128
# In a compiled graph a single row stays torch's: the compiled decode step fuses it into a
# streaming reduction, a little faster there. From 2 rows the kernel beats those reductions (which
# the fusing backend makes of products up to fuse.FUSED_ROWS rows, for every dtype): the `small`
# bf16 decode step at batch 2 / 4 / 8 (`profile_decode.py --ab-fused-rows`,
# `benchmarks/results/cpu-small-bf16-fused-rows-amx.txt`).
COMPILED_MIN_ROWS = 2
_state: bool | None = None  # None: not tried yet
_lock = threading.Lock()


def _supported_cpu() -> bool:
    # torch's own CPU feature detection (cpuinfo), the same that picks its kernels
    caps = torch.cpu.get_capabilities()
    return (sys.platform.startswith("linux") and caps.get("architecture") == "x86_64"
            and all(caps.get(f) for f in ("amx_bf16", "amx_tile", "avx512_bf16", "avx512_bw", "avx512_vl")))


def _headers_flag() -> str:
    # torch rebuilds a cached extension when its sources or flags change, not its headers: their
    # digest as a define makes an edited header a changed flag
    import hashlib

    digest = hashlib.sha256(b"".join(h.read_bytes() for h in _HEADERS)).hexdigest()[:16]
    return f"-DSPARSEEK_HEADERS={digest}"


def _build() -> bool:
    from torch.utils import cpp_extension

    try:  # the ninja wheel's binary, where the venv's bin/ is not on PATH
        import ninja

        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
    except ImportError:
        pass
    # torch waits forever on the build folder's lock file: one left by a build that was killed
    # (Ctrl-C during the ~20 s of a first build) would hang every later start
    lock = Path(cpp_extension._get_build_directory(_NAME, verbose=False)) / "lock"
    try:
        if time.time() - lock.stat().st_mtime > _STALE_LOCK_S:
            lock.unlink()
    except OSError:
        pass
    cpp_extension.load(_NAME, [str(f) for f in _SOURCES], extra_cflags=_FLAGS + _OPENMP + [_headers_flag()],
                       extra_ldflags=_OPENMP, is_python_module=False, verbose=False)
    _register_fake()
    return True


def available() -> bool:
    """Whether the AMX grouped GEMM runs in this process (builds it on the first call). Under
    torch.compile it never builds, only reports an earlier build: call it once before compiling
    (``compile_hot_paths`` does)."""
    global _state
    if _state is not None or torch.compiler.is_compiling():
        return bool(_state)
    with _lock:
        if _state is None:
            _state = False
            if os.environ.get("SPARSEEK_CPU_KERNELS", "1") != "0" and _supported_cpu():
                try:
                    _state = _build()
                except Exception as e:  # no compiler, no ninja, an old gcc without -mamx-tile ...
                    warnings.warn(f"sparseek: the AMX expert kernel could not be built ({type(e).__name__}: "
                                  f"{str(e).strip().splitlines()[-1] if str(e).strip() else e}); the library "
                                  "GEMMs serve instead (SPARSEEK_CPU_KERNELS=0 skips the attempt)", stacklevel=2)
    return _state


def grouped_mm_fits(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether ``grouped_mm(x, w, offs)`` takes these operands and is the faster way: CPU bf16, no
    autograd, x [M, K] and w [E, N, K] with K and N multiples of 32, their last dimension
    contiguous. It is the faster way at every size measured, from ``small``'s 512 x 256 experts to
    V4-Flash's 4096 x 4096 (``benchmarks/results/cpu-grouped-mm.txt``)."""
    return (x.device.type == "cpu" and x.dtype == w.dtype == torch.bfloat16 and x.dim() == 2 and w.dim() == 3
            and w.shape[-1] == x.shape[-1] and x.shape[-1] % 32 == 0 and w.shape[1] % 32 == 0
            and x.stride(-1) == 1 and w.stride(-1) == 1 and x.stride(0) % 2 == 0 and w.stride(1) % 2 == 0
            and not (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad)) and not _sharded(x, w)
            and available())


def _sharded(*ts: torch.Tensor) -> bool:
    # DTensors (FSDP / tensor-parallel shards): the op has no sharding rule, torch's GEMMs do
    return _DTensor is not None and any(isinstance(t, _DTensor) for t in ts)


try:  # imported once, not per call: this check runs on every dense layer's forward
    from torch.distributed.tensor import DTensor as _DTensor
except ImportError:
    _DTensor = None


def linear_fits(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether ``linear(x, w)`` takes a dense layer's input x [..., K] and weight w [N, K] and is the
    faster way: as ``grouped_mm_fits``, for the rows ``rows_fit`` admits."""
    if x.dtype != torch.bfloat16 or x.device.type != "cpu" or x.dim() < 2 or w.dim() != 2 or not x.shape[-1]:
        return False
    rows = x.numel() // x.shape[-1]
    return rows_fit(rows) and x.is_contiguous() and grouped_mm_fits(x.view(rows, x.shape[-1]), w.unsqueeze(0))


def rows_fit(rows: int) -> bool:
    """Whether a dense product of this many rows goes to the kernel (see ``LINEAR_MAX_ROWS``)."""
    return (COMPILED_MIN_ROWS if torch.compiler.is_compiling() else 1) <= rows <= LINEAR_MAX_ROWS


def linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``F.linear(x, w)`` (no bias) with one rounding of fp32 products; see ``linear_fits``."""
    return torch.ops.sparseek_cpu.linear(x.view(-1, x.shape[-1]), w).view(*x.shape[:-1], w.shape[0])


def grouped_mm(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """y[r] = x[r] @ w[e]^T for the rows r of group e (``offs``: cumulative row ends), as
    ``torch._grouped_mm(x, w.transpose(-2, -1), offs=offs)``; see ``grouped_mm_fits``."""
    return torch.ops.sparseek_cpu.grouped_mm(x, w, offs)


def sinkhorn_fits(logits: torch.Tensor) -> bool:
    """Whether ``sinkhorn(logits, ...)`` takes mHC's mixing logits [..., S, S]: CPU fp32, no autograd
    (the op has no backward)."""
    return (logits.device.type == "cpu" and logits.dtype == torch.float32 and logits.dim() >= 2
            and logits.shape[-1] == logits.shape[-2] <= 16
            and not (torch.is_grad_enabled() and logits.requires_grad) and not _sharded(logits) and available())


def sinkhorn(logits: torch.Tensor, iters: int, eps: float) -> torch.Tensor:
    """``sparseek.model.v4.sinkhorn`` of fp32 logits, each token's matrix on one thread start to
    finish (``csrc/cpu_mhc.cpp``); see ``sinkhorn_fits``."""
    return torch.ops.sparseek_cpu.sinkhorn(logits, iters, eps)


def mhc_fits(x_BTSD: torch.Tensor, fn: torch.Tensor) -> bool:
    """Whether ``hc_pre`` / ``hc_post`` take these mHC streams: bf16 [..., S, D] on the CPU with
    S <= 16 and D % 16 == 0, no autograd (the ops have no backward), outside
    torch.compile (a compiled graph keeps inductor's fused form: the decode step, whose one-token
    passes it fuses well)."""
    return (x_BTSD.device.type == "cpu" and x_BTSD.dtype == torch.bfloat16 and x_BTSD.dim() >= 2 and x_BTSD.shape[-2] <= 16 and x_BTSD.shape[-1] % 16 == 0
            and not torch.compiler.is_compiling()
            and not (torch.is_grad_enabled() and (x_BTSD.requires_grad or fn.requires_grad))
            and not _sharded(x_BTSD, fn) and available())


def hc_pre(x_BTSD, fn, scale, base, norm_weight, iters: int, norm_eps: float, hc_eps: float, rms_eps: float):
    """``v4.hc_pre`` followed by the sublayer's RMSNorm (weight ``norm_weight``, eps ``rms_eps``)
    in one pass per token: (normalized input [..., D] bf16, post [..., S], comb [..., S, S]); see
    ``mhc_fits``."""
    # .float(): no-ops for the fp32 parameters a loaded model keeps, a copy after a blanket .to(bf16)
    return torch.ops.sparseek_cpu.mhc_pre(x_BTSD.contiguous(), fn.float(), scale.float(), base.float(),
                                          norm_weight.float(), iters, norm_eps, hc_eps, rms_eps)


def hc_post(f_BTD, x_BTSD, post_BTS, comb_BTSS):
    """``v4.hc_post`` for bf16 streams (one pass per token, one rounding); see ``mhc_fits``."""
    S, D = x_BTSD.shape[-2:]
    return torch.ops.sparseek_cpu.mhc_post(f_BTD.contiguous(), x_BTSD.contiguous(), post_BTS.reshape(-1, S),
                                           comb_BTSS.reshape(-1, S, S))


# Below this many (query, head) rows the op's fixed costs (its call, the masks' copies) outweigh
# what it saves: the compiled batch-1 decode step (8 rows a layer in `small`) ran 1.04x slower
# with it, batch 32 0.98x (`profile_decode.py --ab-softmax`).
SOFTMAX_MIN_ROWS = 64


def attn_softmax_fits(q_BGQHC: torch.Tensor, *keys: torch.Tensor | None) -> bool:
    """Whether ``attn_softmax`` takes the sparse attention's softmax for these queries (and keys):
    bf16 on the CPU, at least ``SOFTMAX_MIN_ROWS`` (query, head) rows, no autograd (training keeps
    torch's code and its backward); in compiled graphs too (one op between the score and value
    products)."""
    ts = [t for t in (q_BGQHC, *keys) if t is not None]
    return (q_BGQHC.device.type == "cpu" and q_BGQHC.dtype == torch.bfloat16
            and q_BGQHC[..., 0].numel() >= SOFTMAX_MIN_ROWS
            and not (torch.is_grad_enabled() and any(t.requires_grad for t in ts)) and not _sharded(*ts)
            and available())


def attn_softmax(prod_BGQHL, keep_BGQL, prod_BGQHN, keep_BGQN, sink_H, scale: float):
    """``v4.attend_lse``'s softmax over [window keys ; compressed keys ; sink] from the bf16 q.k
    products (masks: the keys a query may see, broadcast over heads; the compressed part may be
    None) -> (p_win, p_comp or None, lse [B, G, Q, H]); see ``attn_softmax_fits``."""
    B, G, Q, H, L = prod_BGQHL.shape
    R = B * G * Q
    comp = prod_BGQHN is not None
    p_win, p_comp, lse = torch.ops.sparseek_cpu.attn_softmax(
        prod_BGQHL.reshape(R, H, L).contiguous(), keep_BGQL.expand(B, G, Q, L).reshape(R, L).contiguous(),
        prod_BGQHN.reshape(R, H, -1).contiguous() if comp else None,
        keep_BGQN.expand(B, G, Q, -1).reshape(R, -1).contiguous() if comp else None,
        sink_H.float().contiguous(), scale)
    return (p_win.view(B, G, Q, H, L), p_comp.view(B, G, Q, H, -1) if comp else None, lse.view(B, G, Q, H))


def _register_fake() -> None:
    # the op's shape for torch.compile, registered once the library defines it
    @torch.library.register_fake("sparseek_cpu::grouped_mm")
    def _(x, w, offs):
        return x.new_empty(x.shape[0], w.shape[1])

    @torch.library.register_fake("sparseek_cpu::linear")
    def _(x, w):
        return x.new_empty(x.shape[0], w.shape[0])

    @torch.library.register_fake("sparseek_cpu::sinkhorn")
    def _(logits, iters, eps):
        return torch.empty_like(logits, memory_format=torch.contiguous_format)

    @torch.library.register_fake("sparseek_cpu::mhc_pre")
    def _(x, fn, scale, base, norm_w, iters, norm_eps, hc_eps, rms_eps):
        lead, S = x.shape[:-2], x.shape[-2]
        return (x.new_empty(*lead, x.shape[-1]), x.new_empty(*lead, S, dtype=torch.float32),
                x.new_empty(*lead, S, S, dtype=torch.float32))

    @torch.library.register_fake("sparseek_cpu::attn_softmax")
    def _(s_win, keep_win, s_comp, keep_comp, sink, scale):
        R, H = s_win.shape[:2]
        return (torch.empty_like(s_win), torch.empty_like(s_comp) if s_comp is not None else s_win.new_empty(R, H, 0),
                s_win.new_empty(R, H, dtype=torch.float32))

    @torch.library.register_fake("sparseek_cpu::mhc_post")
    def _(f, x, post, comb):
        return torch.empty_like(x, memory_format=torch.contiguous_format)
