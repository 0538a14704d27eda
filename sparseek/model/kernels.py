"""Optional Triton kernels for the hot spots plain PyTorch does badly; each has a PyTorch reference
in the model code and is tested against it (on a CPU through Triton's interpreter,
``TRITON_INTERPRET=1``).

* ``indexer_scores``: the lightning indexer's score(t, s) = sum_h w[t, h] * relu(q[t, h] . k[s]).
  PyTorch materializes the per-head products [Q, H, N] in fp32 before the weighted sum (64x the
  bytes of the result for V4's 64 indexer heads); the kernel keeps them in registers, one tile of
  queries x keys at a time, and writes only the [Q, N] scores, masked past each query's visible
  entries.

Used on CUDA tensors outside ``torch.compile`` when Triton is importable; ``enabled = False``
turns them off (the suite times both).
"""

from __future__ import annotations

import functools
import os

import torch

enabled = True


@functools.cache
def available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def usable(t: torch.Tensor) -> bool:
    """Whether to run the kernel for tensors like ``t`` (the interpreter runs it on any device)."""
    if not enabled or torch.compiler.is_compiling() or not available():
        return False
    return t.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"


@functools.cache
def _indexer_kernel(interpret: bool):
    # built on first use (not at import) so that TRITON_INTERPRET set by a test takes effect;
    # ``interpret`` keys the cache
    import triton
    import triton.language as tl

    @triton.jit
    def kernel(q_ptr, w_ptr, k_ptr, nvis_ptr, out_ptr, Q, N, H, C,
               sq_b, sq_q, sq_h, sw_b, sw_q, sk_b, sk_n, sv_b, so_b, so_q,
               BQ: tl.constexpr, BN: tl.constexpr, BC: tl.constexpr, IEEE: tl.constexpr):
        pn, pq, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        rq = pq * BQ + tl.arange(0, BQ)
        rn = pn * BN + tl.arange(0, BN)
        rc = tl.arange(0, BC)
        k = tl.load(k_ptr + b * sk_b + rn[:, None] * sk_n + rc[None, :],
                    mask=(rn[:, None] < N) & (rc[None, :] < C), other=0.0)
        acc = tl.full((BQ, BN), 0.0, tl.float32)  # core builtins only: the interpreter can start late
        for h in range(0, H):
            q = tl.load(q_ptr + b * sq_b + rq[:, None] * sq_q + h * sq_h + rc[None, :],
                        mask=(rq[:, None] < Q) & (rc[None, :] < C), other=0.0)
            if IEEE:
                s = tl.dot(q, tl.trans(k), input_precision="ieee")
            else:
                s = tl.dot(q, tl.trans(k))
            w = tl.load(w_ptr + b * sw_b + rq * sw_q + h, mask=rq < Q, other=0.0)
            acc += w[:, None] * tl.maximum(s, 0.0)
        nvis = tl.load(nvis_ptr + b * sv_b + rq, mask=rq < Q, other=0)
        acc = tl.where(rn[None, :] < nvis[:, None], acc, float("-inf"))
        tl.store(out_ptr + b * so_b + rq[:, None] * so_q + rn[None, :], acc,
                 mask=(rq[:, None] < Q) & (rn[None, :] < N))

    return kernel


def indexer_scores(q_BQHC: torch.Tensor, w_BQH: torch.Tensor, keys_BNC: torch.Tensor,
                   n_visible_BQ: torch.Tensor) -> torch.Tensor:
    """[B, Q, N] fp32 scores, -inf where n >= n_visible (the reference: ``Indexer.select``'s
    einsums). fp32 inputs multiply in full fp32 (no TF32); bf16 ones accumulate in fp32."""
    import triton

    B, Q, H, C = q_BQHC.shape
    N = keys_BNC.shape[1]
    keys_BNC = keys_BNC.to(q_BQHC.dtype)
    q, k = q_BQHC.contiguous(), keys_BNC.contiguous()
    w = w_BQH.float().contiguous()
    nvis = n_visible_BQ.to(torch.int32).contiguous()
    out = torch.empty(B, Q, N, dtype=torch.float32, device=q.device)
    BQ, BN = 32, 64
    BC = max(16, triton.next_power_of_2(C))
    grid = (triton.cdiv(N, BN), triton.cdiv(Q, BQ), B)
    _indexer_kernel(os.environ.get("TRITON_INTERPRET") == "1")[grid](
        q, w, k, nvis, out, Q, N, H, C,
        q.stride(0), q.stride(1), q.stride(2), w.stride(0), w.stride(1), k.stride(0), k.stride(1),
        nvis.stride(0), out.stride(0), out.stride(1),
        BQ=BQ, BN=BN, BC=BC, IEEE=q.dtype == torch.float32)
    return out
