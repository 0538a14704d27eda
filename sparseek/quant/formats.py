"""DeepSeek's weight formats as raw storage, decoded inside the forward.

A quantized tensor is kept as its checkpoint bytes (``uint8``: e4m3 codes, packed e2m1 pairs, e8m0
exponents, or the four bytes of each fp32 scale), so that ``model.to(dtype)``, which casts every
floating-point buffer, cannot widen it, and so that a compiler sees byte loads and 256-entry table
lookups it can fuse into the product that consumes them (gpt-fast's weight-only quantization). The
checkpoint codecs (``sparseek.checkpoint.quant``) stay the reference these decoders are tested
against.

Formats (``fmt``): ``"fp8"`` = e4m3 with one scale per 128 x 128 block; ``"fp4"`` = e2m1 (MXFP4),
two codes per byte (low nibble first) with one scale per 1 x 32 block along the input dim.
Scale formats: ``"e8m0"`` (V4's ``.scale``: a power of two as a biased exponent byte) or
``"f32"`` (V3's ``weight_scale_inv``).
"""

from __future__ import annotations

import torch

from sparseek.checkpoint.quant import E2M1_VALUES, FP4_BLOCK, FP8_BLOCK, quant_fp4, quant_fp8

FORMATS = ("fp8", "fp4")
SCALE_FORMATS = ("e8m0", "f32")


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def packed_shape(fmt: str, out: int, inp: int) -> tuple[int, int]:
    return (out, inp) if fmt == "fp8" else (out, inp // 2)


def scale_shape(fmt: str, scale_fmt: str, out: int, inp: int) -> tuple[int, int]:
    rows, cols = (_cdiv(out, FP8_BLOCK), _cdiv(inp, FP8_BLOCK)) if fmt == "fp8" else (out, inp // FP4_BLOCK)
    return rows, cols * (4 if scale_fmt == "f32" else 1)


def check_shape(fmt: str, out: int, inp: int) -> str | None:
    """Why a [out, inp] matrix cannot be stored in ``fmt`` (None: it can)."""
    if fmt == "fp4" and inp % FP4_BLOCK:
        return f"FP4 needs the input dim to be a multiple of {FP4_BLOCK}, got {inp}"
    return None


# Byte -> value tables (one gather per byte: ~3x faster on a CPU than decoding the bit fields
# with arithmetic, measured eager). e2m1: each byte holds two codes, the low nibble first.
_E2M1 = E2M1_VALUES.tolist()
_FP4_PAIRS = torch.tensor([[_E2M1[b & 15], _E2M1[b >> 4]] for b in range(256)])
_E8M0 = torch.exp2(torch.arange(256, dtype=torch.float64) - 127).float()  # 2^(e - 127); 255 is NaN in e8m0, never written
_TABLES: dict[tuple[str, torch.device], torch.Tensor] = {}


def _table(name: str, device: torch.device) -> torch.Tensor:
    key = (name, device)
    if key not in _TABLES:
        _TABLES[key] = {"fp4": _FP4_PAIRS, "e8m0": _E8M0}[name].to(device)
    return _TABLES[key]


def scales(raw: torch.Tensor, scale_fmt: str) -> torch.Tensor:
    """fp32 scales from their raw bytes."""
    if scale_fmt == "e8m0":
        return _table("e8m0", raw.device)[raw.int()]
    return raw.view(torch.float32)


def values(raw: torch.Tensor, fmt: str) -> torch.Tensor:
    """fp32 element values (before scaling) from raw bytes [..., out, stored]."""
    if fmt == "fp8":
        return raw.view(torch.float8_e4m3fn).float()
    return _table("fp4", raw.device)[raw.int()].flatten(-2)


def dequantize(raw: torch.Tensor, raw_scale: torch.Tensor, fmt: str, scale_fmt: str, inp: int,
               dtype: torch.dtype) -> torch.Tensor:
    """[..., out, inp] weights in ``dtype`` from raw storage (leading dims: a stack of experts)."""
    v = values(raw, fmt)
    s = scales(raw_scale, scale_fmt)
    *lead, out, _ = v.shape
    if fmt == "fp4":
        return (v.view(*lead, out, inp // FP4_BLOCK, FP4_BLOCK) * s.unsqueeze(-1)).view(*lead, out, inp).to(dtype)
    b = FP8_BLOCK
    if out % b == 0 and inp % b == 0:
        w = v.view(*lead, out // b, b, inp // b, b) * s[..., :, None, :, None]
        return w.view(*lead, out, inp).to(dtype)
    s = s.repeat_interleave(b, dim=-2)[..., :out, :].repeat_interleave(b, dim=-1)[..., :inp]
    return (v * s).to(dtype)


def quantize(w: torch.Tensor, fmt: str, scale_fmt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A [out, inp] weight as raw (codes, scale) bytes, rounded as DeepSeek's converter rounds."""
    if fmt == "fp8":
        q, s = quant_fp8(w, scale_dtype=torch.float8_e8m0fnu if scale_fmt == "e8m0" else torch.float32)
    else:
        why = check_shape(fmt, *w.shape)
        if why:
            raise ValueError(why)
        q, s = quant_fp4(w)
        if scale_fmt == "f32":
            s = s.float()
    return raw_bytes(q), raw_bytes(s)


def raw_bytes(t: torch.Tensor) -> torch.Tensor:
    """A checkpoint tensor (e4m3, int8-packed e2m1, e8m0, fp32) as its raw bytes."""
    return t.contiguous().view(torch.uint8)


def published(raw: torch.Tensor, kind: str) -> torch.Tensor:
    """Raw bytes back in the checkpoint's dtype: kind is a format or a scale format."""
    dtype = {"fp8": torch.float8_e4m3fn, "fp4": torch.int8, "e8m0": torch.float8_e8m0fnu, "f32": torch.float32}[kind]
    return raw.view(dtype)
