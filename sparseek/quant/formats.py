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

import sys

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


# ---------------------------------------------------------------------------------------------
# Products of a few rows, decoded a 32-bit word at a time (compiled CPU decode steps).
#
# Inductor's CPU code converts uint8 vectors to int32 or float through a slow generic path
# (0.41-0.70 ns per weight on an AVX-512 host, 7-12x a bf16 GEMV), while int32 arithmetic and
# bitcasts vectorise well. So a word of codes (4 e4m3 or 8 e2m1) is loaded as one int32 and each
# of its codes, its "plane", becomes fp32 bits by moving its sign bit to bit 31 and its exponent
# and mantissa fields to the top of fp32's: that float is the code's value times 2^-120 (e4m3)
# or 2^-126 (e2m1), exact, subnormal codes included (they land in fp32's subnormal range, which
# inductor's kernels keep: no flush-to-zero). The power of two comes back split between the
# activations and the scales (2^60 / 2^63 each), so no product under- or overflows and each
# weight times activation is the same float as with the decoded weight. Plane j of word i holds
# input k = P*i + j, so the activation row is split into its P strided parts first (copies of x,
# not of the weight). The e4m3 NaN code (0x7F) reads as 480 here: DeepSeek's converter never
# writes it (it clamps to +-448).

def _planes(fmt: str) -> tuple[int, int, int]:
    """(codes per 32-bit word, bits per code, log2 of the power of two a plane's float lacks)."""
    return (4, 8, 120) if fmt == "fp8" else (8, 4, 126)


def word_planes_ok(fmt: str, raw: torch.Tensor) -> bool:
    """Whether ``raw`` [..., out, stored] can be read a word at a time."""
    out, stored = raw.shape[-2:]
    if fmt == "fp8":  # whole 128 x 128 scale blocks
        return sys.byteorder == "little" and out % FP8_BLOCK == 0 and stored % FP8_BLOCK == 0
    return sys.byteorder == "little" and stored % 4 == 0


def plane_values(words: torch.Tensor, fmt: str, j: int) -> torch.Tensor:
    """Code ``j`` of each int32 word as fp32: its value times 2^-120 (fp8) / 2^-126 (fp4)."""
    P, bits, _ = _planes(fmt)
    top = words << (32 - bits * (j + 1))  # the code in the word's top bits, its sign in bit 31
    if fmt == "fp8":  # e4m3: s eeee mmm -> fp32 s eeeeeeee m(23): fields to bits 23-30, 20-22
        return ((top & -0x80000000) | ((top >> 4) & 0x07F00000)).view(torch.float32)
    return ((top & -0x80000000) | ((top >> 6) & 0x01C00000)).view(torch.float32)  # e2m1: s ee m


def word_product(x: torch.Tensor, raw: torch.Tensor, raw_scale: torch.Tensor, fmt: str, scale_fmt: str,
                 out: int, inp: int) -> torch.Tensor:
    """fp32 ``x @ W^T`` for a few rows: x [..., N, inp] against the weights [..., out, stored]
    (the same leading dims, or none on the weights), W decoded a word at a time."""
    P, _, shift = _planes(fmt)
    half = 2.0 ** (shift // 2)
    words = raw.view(torch.int32)  # [..., out, inp / P]
    n = words.shape[-1]
    xf = x.float() * half
    xs = torch.stack([xf[..., j::P] for j in range(P)], -2)  # [..., N, P, inp / P], fp32
    # e8m0 by its bits, not the table (a table lookup inside the loop costs a bounds-checked
    # gather per vector; exponent byte 0, 2^-127, reads as 0: a block that small is all zeros)
    s = (raw_scale.int() << 23).view(torch.float32) if scale_fmt == "e8m0" else scales(raw_scale, scale_fmt)
    s = s * (2.0 ** shift / half)
    if fmt == "fp8":  # one scale per 128 x 128 block: word i of row o -> [o // 128, i // 32]
        b = FP8_BLOCK
        blocks, s = (out // b, b, n // (b // P), b // P), s[..., :, None, :, None]
    else:  # one per 32 inputs along the row: word i -> i // 4
        blocks, s = (out, n // (FP4_BLOCK // P), FP4_BLOCK // P), s[..., None]
    lead = words.shape[:-2]
    acc = 0
    for j in range(P):
        w_OI = (plane_values(words, fmt, j).view(*lead, *blocks) * s).view(*lead, 1, out, n)
        acc = acc + (xs[..., j, None, :] * w_OI).sum(-1)
    return acc
