"""DeepSeek's runtime rounding: the lightning indexer's FP4 (``index_fp4``) and the FP8 inputs of
its quantized matrix products (``act_fp8``).

DeepSeek's inference code rotates the indexer's queries and keys by a Hadamard matrix and rounds
them to FP4 before scoring: the indexer then runs in FP4 (the tech report's "FP4 indexer
attention"), and its keys are cached at 68 bytes instead of 256. The rotation is orthonormal, so
without the rounding it would change nothing (transformers' port skips both); with it, the scores
-- and so, near ties, the picked entries -- are DeepSeek's own. ``index_fp4=True`` emulates the
round trip, and the cache stores the rounded keys as FP4 bytes (``FP4Keys``).

* ``hadamard``: the normalized Walsh-Hadamard transform in Sylvester (natural) order over the last
  dim (a power of two), scale d^-1/2 -- what ``fast_hadamard_transform`` computes.
* ``fp4_round``: e2m1 values {0, 0.5, 1, 1.5, 2, 3, 4, 6} in blocks of 32 with one power-of-two
  scale each (ue8m0: the smallest 2^e with amax / 2^e <= 6), values rounded to the nearest code,
  ties to the even code (as a hardware cast rounds). In training the gradient passes straight
  through the rounding (quantization-aware training's estimator).
* ``fp8_act_round``: DeepSeek's runtime feeds every FP8 / FP4 weight's GEMM FP8 activations, each
  token's row quantized in blocks of 128 along the contracted dim with one scale per block (amax /
  448, amax floored at 1e-4; a power of two for V4's and V3.1's ``ue8m0`` scales, exact for V3's).
  ``act_fp8=True`` rounds those inputs the same way (the GEMM's own arithmetic is then the
  checkpoint's weights times the rounded activations, accumulated in the compute dtype instead of
  per-block fp32 partial sums). transformers' port, which dequantizes the weights, rounds nothing.
"""

from __future__ import annotations

import torch

FP4_BLOCK = 32
FP4_MAX = 6.0
_E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)  # codes 0-7; 8-15 the same negated (checkpoint.quant's table)
_MIDPOINTS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)


def hadamard(x: torch.Tensor) -> torch.Tensor:
    """x @ H / sqrt(d) over the last dim, H the Sylvester Hadamard matrix; computed in fp32 (or x's
    wider dtype) with
    log2(d) butterfly passes, returned in x's dtype."""
    d = x.shape[-1]
    if d & (d - 1):
        raise ValueError(f"the Hadamard rotation needs a power-of-two dim, got {d}")
    y = x.to(torch.promote_types(x.dtype, torch.float32))
    h = 1
    while h < d:
        y = y.unflatten(-1, (d // (2 * h), 2, h))
        a, b = y.unbind(-2)
        y = torch.stack((a + b, a - b), dim=-2).flatten(-3)
        h *= 2
    return (y * d ** -0.5).to(x.dtype)


def _pow2_ceil(x: torch.Tensor) -> torch.Tensor:
    """The smallest power of two >= x (x > 0), exactly (frexp: x = m * 2^e with m in [0.5, 1))."""
    m, e = torch.frexp(x)
    return torch.ldexp(torch.ones_like(x), torch.where(m == 0.5, e - 1, e))


def fp4_round(x: torch.Tensor, block: int = FP4_BLOCK) -> torch.Tensor:
    """``x`` rounded to FP4 (e2m1) with one power-of-two scale per ``block`` values along the last
    dim (fewer dims than a block: one block), returned in x's dtype."""
    n = x.shape[-1]
    block = min(block, n)
    if n % block:
        raise ValueError(f"FP4 rounds in blocks of {block} values, got a last dim of {n}")
    xb = x.float().unflatten(-1, (n // block, block))
    amax = xb.abs().amax(-1, keepdim=True).clamp(min=FP4_MAX * 2.0 ** -126)
    scale = _pow2_ceil(amax * torch.tensor(1.0 / FP4_MAX))  # times the fp32 reciprocal, as the kernel does
    q = (xb / scale).clamp(-FP4_MAX, FP4_MAX)
    mid = torch.tensor(_MIDPOINTS, device=x.device)
    lo, hi = torch.bucketize(q.abs(), mid), torch.bucketize(q.abs(), mid, right=True)
    code = torch.where(lo % 2 == 0, lo, hi)  # equal unless |q| is a midpoint: then the even code
    value = torch.tensor(_E2M1, device=x.device)[code].copysign(q)
    y = (value * scale).flatten(-2)
    if x.requires_grad and torch.is_grad_enabled():  # training: the straight-through estimator of QAT
        y = x.float() + (y - x.float()).detach()
    return y.to(x.dtype)


FP8_MAX = 448.0
ACT_BLOCK = 128
ACT_SCALE_FORMATS = ("e8m0", "f32")


def e4m3_round(q: torch.Tensor) -> torch.Tensor:
    """fp32 values in [-448, 448] rounded to the nearest e4m3 value (ties to even), still fp32: what
    ``q.to(torch.float8_e4m3fn).float()`` gives, in integer and float operations a compiler
    vectorizes (inductor's CPU code converts to FP8 one element at a time: with the cast, a compiled
    decode step that rounds every GEMM input ran ~5x slower). Normal values keep 3 mantissa bits
    (round half to even on the bits below them); below 2^-6 e4m3 is subnormal, a grid of 2^-9."""
    b = q.contiguous().view(torch.int32)
    kept = ((b + 0x7FFFF + ((b >> 20) & 1)) & ~0xFFFFF).view(torch.float32)
    return torch.where(q.abs() < 2.0 ** -6, torch.round(q * 512) / 512, kept)


def _fp8_blocks(x: torch.Tensor, block: int, pow2: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """x's values rounded to e4m3 after dividing by their block's scale (fp32, [..., n / block,
    block]), and the scales ([..., n / block, 1])."""
    xb = x.float().unflatten(-1, (-1, block))
    amax = xb.abs().amax(-1, keepdim=True).clamp(min=1e-4)
    scale = amax / FP8_MAX
    if pow2:
        scale = _pow2_ceil(scale)
    return e4m3_round((xb / scale).clamp(-FP8_MAX, FP8_MAX)), scale


def fp8_quant(x: torch.Tensor, block: int, pow2: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` (last dim a multiple of ``block``) as e4m3 codes and one fp32 scale per ``block`` values:
    amax / 448 (amax floored at 1e-4), rounded up to a power of two with ``pow2``, as DeepSeek's
    ``act_quant`` computes it; the codes are x / scale clamped to +-448, rounded to nearest even."""
    q, scale = _fp8_blocks(x, block, pow2)
    return q.to(torch.float8_e4m3fn).flatten(-2), scale.squeeze(-1)


def fp8_dequant(codes: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    x = codes.float().unflatten(-1, (scale.shape[-1], -1)) * scale.unsqueeze(-1)
    return x.flatten(-2).to(dtype)


def fp8_rounded(x: torch.Tensor, block: int, pow2: bool = True) -> torch.Tensor:
    """``fp8_dequant(*fp8_quant(x, block, pow2))`` in fp32 without the FP8 tensor in between."""
    q, scale = _fp8_blocks(x, block, pow2)
    return (q * scale).flatten(-2)


def fp8_act_round(x: torch.Tensor, scale_fmt: str = "e8m0", block: int = ACT_BLOCK) -> torch.Tensor:
    """``x`` as DeepSeek's runtime hands it to an FP8 / FP4 GEMM: each row's blocks of ``block``
    values along the last dim rounded to e4m3 with their own scale (``scale_fmt`` "e8m0": a power of
    two; "f32": amax / 448 exactly), returned in x's dtype. A last dim not a multiple of ``block``
    (small presets) ends in a shorter block. Straight-through in training, like ``fp4_round``."""
    if scale_fmt not in ACT_SCALE_FORMATS:
        raise ValueError(f"unknown activation scale format {scale_fmt!r}; use one of {ACT_SCALE_FORMATS}")
    n = x.shape[-1]
    pad = -n % block
    xp = torch.nn.functional.pad(x, (0, pad)) if pad else x  # zeros change no block's amax
    y = fp8_rounded(xp, block, scale_fmt == "e8m0")[..., :n]
    if x.requires_grad and torch.is_grad_enabled():
        y = x.float() + (y - x.float()).detach()
    return y.to(x.dtype)


def act_round(x: torch.Tensor, scale_fmt: str | None) -> torch.Tensor:
    """``fp8_act_round`` where the model rounds activations (``scale_fmt`` set), else ``x``."""
    return x if scale_fmt is None else fp8_act_round(x, scale_fmt)


def set_act_fp8_(model: torch.nn.Module, scale_fmt: str | None) -> torch.nn.Module:
    """Switch the FP8 activation rounding of a built model's layers (``scale_fmt``: "e8m0", "f32" or
    None: off) without touching its config, e.g. to measure a quantized model as DeepSeek's runtime
    runs it; a model built with ``act_fp8=True`` has it on from the start."""
    if scale_fmt is not None and scale_fmt not in ACT_SCALE_FORMATS:
        raise ValueError(f"unknown activation scale format {scale_fmt!r}; use one of {ACT_SCALE_FORMATS}")
    for m in model.modules():
        if hasattr(m, "act_fp8"):
            m.act_fp8 = scale_fmt
    return model


class FP4Keys:
    """Indexer keys already rounded by ``fp4_round`` as bytes, as DeepSeek's runtime caches them:
    two e2m1 codes per byte (low nibble first, sign in bit 3) and one e8m0 exponent byte per block
    -- 68 bytes per 128-dim key instead of 256 in bf16. Lossless on rounded values: each block is
    stored with the smallest power-of-two scale that holds its largest value, under which every
    value of the block is again a grid value (a grid value times a power of two up to 6 is one)."""

    def __init__(self, dim: int):
        # the checkpoints' FP4 / e8m0 byte decoders (one table gather per byte); imported here, as
        # sparseek.quant imports the model
        from sparseek.quant.formats import scales, values

        self._values, self._scales = values, scales
        self.dim, self.block = dim, min(FP4_BLOCK, dim)
        if dim % 2 or dim % self.block:
            raise ValueError(f"FP4 keys need an even dim in whole blocks of {self.block}, got {dim}")
        self.width = dim // 2 + dim // self.block

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        xb = x.float().unflatten(-1, (-1, self.block))
        amax = xb.abs().amax(-1, keepdim=True).clamp(min=FP4_MAX * 2.0 ** -126)
        scale = _pow2_ceil(amax / FP4_MAX)  # exact here: amax is a grid value times a power of two
        q = xb / scale
        code = torch.bucketize(q.abs(), torch.tensor(_MIDPOINTS, device=x.device)) | (q < 0).to(torch.long) << 3
        code = code.flatten(-2).to(torch.uint8).unflatten(-1, (-1, 2))
        exps = torch.frexp(scale)[1].squeeze(-1) - 1 + 127  # scale = 2^(e - 1) for frexp's e
        return torch.cat([code[..., 0] | code[..., 1] << 4, exps.to(torch.uint8)], dim=-1)

    def decode(self, packed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        n = self.dim // 2
        v = self._values(packed[..., :n], "fp4").unflatten(-1, (-1, self.block))
        return (v * self._scales(packed[..., n:], "e8m0")[..., None]).flatten(-2).to(dtype)


__all__ = ["hadamard", "fp4_round", "FP4Keys", "FP4_BLOCK", "fp8_quant", "fp8_dequant", "fp8_rounded", "e4m3_round", "fp8_act_round", "act_round", "set_act_fp8_"]
