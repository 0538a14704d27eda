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

import math
import sys
import threading

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


# Byte -> e2m1 value pair table (one gather per byte: ~3x faster in eager code on a CPU than
# decoding the bit fields with arithmetic); each byte holds two codes, the low nibble first.
_E2M1 = E2M1_VALUES.tolist()
_FP4_PAIRS = torch.tensor([[_E2M1[b & 15], _E2M1[b >> 4]] for b in range(256)])
_TABLES: dict[torch.device, torch.Tensor] = {}


def _fp4_pairs(device: torch.device) -> torch.Tensor:
    if device not in _TABLES:
        _TABLES[device] = _FP4_PAIRS.to(device)
    return _TABLES[device]


def scales(raw: torch.Tensor, scale_fmt: str) -> torch.Tensor:
    """fp32 scales from their raw bytes. e8m0 (2^(e - 127)) by its bits, not a table (a lookup
    inside a compiled loop is a bounds-checked gather per vector): e << 23, and e = 0 (2^-127,
    subnormal in fp32) as mantissa bit 22; 255 (NaN in e8m0, never written) reads as inf."""
    if scale_fmt == "e8m0":
        e = raw.int()
        return ((e << 23) | ((e == 0).int() << 22)).view(torch.float32)
    return raw.view(torch.float32)


def values(raw: torch.Tensor, fmt: str) -> torch.Tensor:
    """fp32 element values (before scaling) from raw bytes [..., out, stored]."""
    if fmt == "fp8":
        return raw.view(torch.float8_e4m3fn).float()
    return _fp4_pairs(raw.device)[raw.int()].flatten(-2)


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
# or 2^-125 (e2m1), exact, subnormal codes included (e4m3's land in fp32's subnormal range, which
# inductor's kernels keep: no flush-to-zero; e2m1's are moved out of it, see ``plane_values``,
# because they are common and an Intel core multiplies a denormal ~100x slower). The power of two comes back split so that no
# product under- or overflows (``word_product``), and each weight times activation is one
# rounding of the exact product, as with the decoded weight. Plane j of word i holds
# input k = P*i + j, so the activation row is split into its P strided parts first (copies of x,
# not of the weight). The e4m3 NaN code (0x7F) reads as 480 here: DeepSeek's converter never
# writes it (it clamps to +-448).

def _planes(fmt: str) -> tuple[int, int, int]:
    """(codes per 32-bit word, bits per code, log2 of the power of two a plane's float lacks)."""
    return (4, 8, 120) if fmt == "fp8" else (8, 4, 125)


def word_planes_ok(fmt: str, raw: torch.Tensor) -> bool:
    """Whether ``raw`` [..., out, stored] can be read a word at a time."""
    out, stored = raw.shape[-2:]
    if fmt == "fp8":  # whole 128 x 128 scale blocks
        return sys.byteorder == "little" and out % FP8_BLOCK == 0 and stored % FP8_BLOCK == 0
    return sys.byteorder == "little" and stored % 4 == 0


def plane_values(words: torch.Tensor, fmt: str, j: int) -> torch.Tensor:
    """Code ``j`` of each int32 word as fp32: its value times 2^-120 (fp8) / 2^-125 (fp4)."""
    P, bits, _ = _planes(fmt)
    top = words << (32 - bits * (j + 1))  # the code in the word's top bits, its sign in bit 31
    # an arithmetic shift right moves the exponent and mantissa fields to the top of fp32's (e4m3
    # s eeee mmm -> bits 23-30, 20-22; e2m1 s ee m -> 23-24, 22) and copies the sign into the bits
    # above them, which the mask clears but for bit 31: three integer ops per code
    if fmt == "fp8":
        return ((top >> 4) & _signed(0x87F00000)).view(torch.float32)
    f = (top >> 6) & _signed(0x81C00000)
    # So placed, e2m1's subnormal code (0.5, common in an MXFP4 block) would be an fp32 denormal,
    # and an Intel core multiplies a denormal in a microcode assist (the word products ran at 1.7
    # ns per weight on an AMX Xeon, ~0.06 with denormals flushed in a scratch timing, which would
    # read 0.5 as 0). Instead the normal codes' exponent goes up by one and a subnormal
    # code's mantissa bit moves into the exponent's lowest bit (0.5 -> 2^-126): every code is a
    # normal fp32 or zero, worth its value times 2^-125. Four more integer ops per code.
    subnormal = (f & _signed(0x01800000)) == 0
    return (f + torch.where(subnormal, f & 0x00400000, 0x00800000)).view(torch.float32)


def _signed(u32: int) -> int:
    """A 32-bit pattern as the int32 it is (a mask with bit 31 set)."""
    return u32 - (1 << 32) if u32 >> 31 else u32


def word_product(x: torch.Tensor, raw: torch.Tensor, raw_scale: torch.Tensor, fmt: str, scale_fmt: str,
                 out: int, inp: int) -> torch.Tensor:
    """fp32 ``x @ W^T`` for a few rows: x [..., N, inp] against the weights [..., out, stored]
    (uint8 codes or the same bytes as int32 words; the same leading dims as x, or none), W decoded
    a word at a time. Gather a stack's experts from its int32 view (``stack.view(torch.int32)[idx]``):
    a compiled step then reads the chosen words in place, where gathering the bytes and viewing
    the copy makes it write that copy first."""
    P, _, shift = _planes(fmt)
    words = raw if raw.dtype == torch.int32 else raw.view(torch.int32)  # [..., out, inp / P]
    n = words.shape[-1]
    s = scales(raw_scale, scale_fmt)
    xf = x.float()
    if fmt == "fp8":
        # one scale per 128 x 128 block (word i of row o -> [o // 128, i // 32]): scale the few
        # activation rows per block of output rows instead of every weight. 2^90 of the planes'
        # missing 2^120 ride on x * s (no overflow below |x * s| = 2^38), the other 2^30 on the
        # sum; with e8m0 scales (powers of two) each product is x * s * code with one rounding,
        # as with the decoded weight (fp32 scales round x * s first)
        G, q, x_scale, sum_scale = out // FP8_BLOCK, FP8_BLOCK // P, 2.0 ** 90, 2.0 ** (shift - 90)
        s = s[..., None, :, None, :, None]  # [..., 1 (N), G, 1 (P), blocks, 1 (q)]: on x
    else:
        # FP4: one scale per 32 inputs of a row (word i -> i // 4), on the weights; the power of
        # two split between x and the scales (2^62 and 2^63), so no product under- or overflows
        G, q, x_scale, sum_scale = 1, FP4_BLOCK // P, 2.0 ** (shift // 2), 1.0
        s = (s * 2.0 ** (shift - shift // 2))[..., None]  # [..., out, blocks, 1 (q)]: on the weights
    xs = torch.stack([xf[..., j::P] for j in range(P)], -2) * x_scale  # [..., N, P, n]
    *xlead, N, _, _ = xs.shape
    if fmt == "fp8":
        xs = xs.reshape(*xlead, N, 1, P, n // q, q) * s
    xs = xs.reshape(*xlead, N, G, P, n)
    lead = words.shape[:-2]
    # one row of x per leading index (the decode step's (token, slot) pairs): leading dims and
    # output rows as one loop, so the compiler cannot pick the few pairs as the dim to vectorise
    # (it did for hash-routed FP4 layers in an uncommitted version: a parallel region per output row)
    merged = len(lead) > 0 and N == 1
    acc = 0
    for j in range(P):
        w = plane_values(words, fmt, j)  # [..., out, n]
        if fmt == "fp4":
            w = (w.view(*lead, out, n // q, q) * s).view(*lead, out, n)
        x_j = xs[..., j, :]  # [..., N, G, n]
        if merged:
            acc = acc + (_rows(x_j[..., 0, :, None, :], (*lead, G, out // G, n)) * w.reshape(-1, n)).sum(-1)
        else:
            acc = acc + (x_j[..., None, :] * w.view(*lead, 1, G, out // G, n)).sum(-1)
    return (acc * sum_scale).reshape(*xlead, N, out)


def _rows(x: torch.Tensor, shape) -> torch.Tensor:
    """x broadcast to ``shape`` as rows [prod(shape[:-1]), shape[-1]] (an index map in a compiled
    graph, no copy)."""
    return x.expand(shape).reshape(-1, shape[-1])


# ---------------------------------------------------------------------------------------------
# Whole matrices decoded by one compiled CPU kernel (the forwards over many tokens: prefill).
#
# Eager decoding costs ~3 ns per weight (a conversion or table gather, then a pass over memory
# per op); a fused kernel can do it at memory speed, but only with the conversions inductor's CPU
# code vectorises: uint8 -> float32 does (~0.06 ns per element), uint8 -> int32, int16 -> int32
# and 32-lane bf16 kernels take a generic per-element path (0.25-0.7). So a code byte is read as a
# float (0..255, exact) and converted to int32, its fields are moved into fp32's bits as
# ``plane_values`` does, and where one byte or word decodes to several outputs they are packed
# into one wide integer instead of interleaved (an interleaving store is scalar): an e2m1 pair as
# an int64 of two fp32s or an int32 of two bf16s, an e4m3 word's four codes as an int64 of four
# bf16s. bf16 rounds to nearest even on the bits, as ``Tensor.to`` does. Each weight is
# ``code value * scale`` in fp32 as in ``dequantize``: the same bits.

def _code_values(c: torch.Tensor, fmt: str, j: int = 0) -> torch.Tensor:
    """fp32 values of code ``j`` of int32 words (bytes read as int32: their code 0, or 0 and 1 for
    an FP4 byte), exact (subnormal codes too)."""
    return plane_values(c, fmt, j) * 2.0 ** _planes(fmt)[2]


def _bf16_bits(w: torch.Tensor) -> torch.Tensor:
    """fp32 -> bf16 bits in the low half of an int32, rounded to nearest even (finite values)."""
    b = w.view(torch.int32)
    return ((b + 0x7FFF + ((b >> 16) & 1)) >> 16) & 0xFFFF


def _scaled(v: torch.Tensor, s: torch.Tensor, fmt: str, per: int) -> torch.Tensor:
    """fp32 values [..., rows, n] of stored units covering ``per`` inputs each, times their
    block's scale (views, no expanded copy of ``s``)."""
    *lead, rows, n = v.shape
    if fmt == "fp8":  # a scale per 128 x 128 block
        b, k = FP8_BLOCK, FP8_BLOCK // per
        return (v.view(*lead, rows // b, b, n // k, k) * s[..., :, None, :, None]).view(v.shape)
    k = FP4_BLOCK // per  # a scale per 32 inputs of a row
    return (v.view(*lead, rows, n // k, k) * s[..., None]).view(v.shape)


def _packed(raw: torch.Tensor, s: torch.Tensor, fmt: str, bf16: bool) -> torch.Tensor:
    """The decoded weights [..., out, inp] as a wide-integer view (see above) from raw codes and
    fp32 scales."""
    if fmt == "fp8" and not bf16:  # one byte -> one fp32
        return _scaled(_code_values(raw.float().int(), fmt), s, fmt, 1)
    if fmt == "fp8":  # one int32 word -> four bf16s in an int64
        words = raw.view(torch.int32)
        out = 0
        for j in range(4):
            out = out | (_bf16_bits(_scaled(_code_values(words, fmt, j), s, fmt, 4)).long() << 16 * j)
        return out
    c = raw.float().int()  # one byte -> two e2m1 codes, the low nibble first
    lo, hi = (_scaled(_code_values(c, fmt, j), s, fmt, 2) for j in (0, 1))
    if bf16:
        return _bf16_bits(lo) | (_bf16_bits(hi) << 16)
    return (lo.view(torch.int32).long() & 0xFFFFFFFF) | (hi.view(torch.int32).long() << 32)


def packed_decode(raws: list[torch.Tensor], ss: list[torch.Tensor], idx: torch.Tensor | None, fmt: str,
                  bf16: bool, scale_fmt: str | None = None) -> torch.Tensor:
    """Raw codes [..., rows, stored] (with their fp32 block scales ``ss``, or their raw bytes in
    ``scale_fmt``; experts ``idx`` of each stack, or all) decoded and concatenated along the rows,
    as wide integers that a ``.view(bf16 / fp32)`` reads back (fp8 into fp32: the floats): what
    ``compile_decoders`` compiles. Raw scales are read in the kernel, only the experts' ``idx``
    (converting a whole stack's first, per call, cost more than decoding a few of its experts)."""
    if idx is not None:
        raws, ss = [r[idx] for r in raws], [s[idx] for s in ss]
    if scale_fmt is not None:
        ss = [scales(s, scale_fmt) for s in ss]
    parts = [_packed(r, s, fmt, bf16) for r, s in zip(raws, ss)]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-2)


def packed_decode_into(raws: list[torch.Tensor], ss: list[torch.Tensor], idx: torch.Tensor | None, fmt: str,
                       bf16: bool, scale_fmt: str | None, out: torch.Tensor) -> torch.Tensor:
    """``packed_decode`` written into ``out`` (its wide-integer view, the result's shape: viewed
    by the caller, since a dtype view of a different width inside the compiled graph made the
    FP4 kernel ~7x slower, scratch timing)."""
    out.copy_(packed_decode(raws, ss, idx, fmt, bf16, scale_fmt))
    return out


def _packed_dtype(fmt: str, bf16: bool) -> torch.dtype:
    """The dtype ``packed_decode`` returns (see ``_packed``)."""
    if fmt == "fp8":
        return torch.int64 if bf16 else torch.float32
    return torch.int32 if bf16 else torch.int64


# A decoded fp32 matrix that its caller uses at once and drops (a prefill's linear layer) lands
# in a buffer kept between calls, one per (thread, slot), from 32 MB up: an output that large is
# above glibc's largest mmap threshold, so a fresh one is new pages on every call, and faulting
# them in costs 1.3-2.5 ns per weight against 0.22-0.27 for the decoding into the kept buffer
# (`benchmarks/quant_dequantize.py`, a 4096 x 4096 layer, "kernel" vs "kept"). Not into bf16
# (half the bytes): there the compiled copy into a given buffer went through a temporary as
# large for some formats (loops whose sizes the compiler cannot prove equal), no faster than a
# fresh output. Only without autograd (a backward would read weights overwritten since). Below
# 32 MB the allocator can keep freed blocks itself (``sparseek.utils.tune_malloc``, which the
# trainer runs); above it glibc always maps fresh pages, which is what this buffer is for.
_SCRATCH = threading.local()
SCRATCH_MIN_BYTES = 32 << 20


def _scratch(slot: str, nbytes: int, device: torch.device) -> torch.Tensor:
    """``nbytes`` of this thread's buffer ``slot`` (uint8), grown as needed, never shrunk."""
    pool = _SCRATCH.__dict__.setdefault("pool", {})
    if (slot, device) not in pool or pool[(slot, device)].numel() < nbytes:
        pool.pop((slot, device), None)  # the old buffer goes before the new one comes
        pool[(slot, device)] = torch.empty(nbytes, dtype=torch.uint8, device=device)
    return pool[(slot, device)][:nbytes]


def release_scratch() -> None:
    """Free this thread's decode buffers (they are kept for the next forward otherwise)."""
    _SCRATCH.__dict__.pop("pool", None)


_decoder = None  # packed_decode compiled, once compile_decoders() ran
_decoder_into = None  # packed_decode_into compiled


def compile_decoders() -> None:
    """Decode whole matrices on a CPU with one compiled kernel per call (``decode``): FP8 and FP4
    into bf16 at 0.17-0.28 ns per weight for ``small``'s experts instead of 2.2-4.4 eager
    (``benchmarks/quant_dequantize.py``). Process-wide, like ``compile_hot_paths``, which
    ``LLM(compile=True)`` runs beside it."""
    global _decoder, _decoder_into
    if _decoder is None:
        from sparseek.model.fuse import vectorize_bitcasts
        from sparseek.model.v4 import _recompile_limit

        vectorize_bitcasts()  # the codes become floats by bit reinterpretation
        # a graph per (format, dtype, one matrix or two, all experts or some, a stack or not)
        _decoder = torch.compile(packed_decode, dynamic=True, **_recompile_limit())
        _decoder_into = torch.compile(packed_decode_into, dynamic=True, **_recompile_limit())


def decode(mats: list[tuple[torch.Tensor, torch.Tensor]], fmt: str, scale_fmt: str, inp: int, dtype: torch.dtype,
           idx: torch.Tensor | None = None, scratch: str | None = None) -> torch.Tensor:
    """Matrices ``[(raw, raw_scale), ...]`` (stacks: their experts ``idx``, or all) decoded into
    ``dtype`` and concatenated along the rows: on a CPU into bf16 / fp32 with whole words and
    scale blocks, by ``packed_decode`` inside a graph being compiled and by its compiled kernel
    once ``compile_decoders`` ran; else (eager code, GPUs) by ``dequantize``.

    ``scratch``: the caller uses the result at once and drops it, so the compiled kernel may
    write it into this thread's kept buffer of that name (overwritten by the next decode into
    it; see ``_scratch``)."""
    raws = [r for r, _ in mats]
    compiling = torch.compiler.is_compiling()
    if ((compiling or _decoder is not None) and dtype in (torch.bfloat16, torch.float32)
            and raws[0].device.type == "cpu" and all(word_planes_ok(fmt, r) for r in raws)):
        ss, bf16 = [s for _, s in mats], dtype == torch.bfloat16
        if compiling:
            return packed_decode(raws, ss, idx, fmt, bf16, scale_fmt).view(dtype)
        lead = raws[0].shape[:-2] if idx is None else idx.shape
        shape = (*lead, sum(r.shape[-2] for r in raws), inp)
        nbytes = math.prod(shape) * dtype.itemsize
        if (scratch is not None and nbytes >= SCRATCH_MIN_BYTES and dtype == torch.float32
                and not torch.is_grad_enabled()):
            out = _scratch(scratch, nbytes, raws[0].device).view(dtype).view(shape)
            _decoder_into(raws, ss, idx, fmt, bf16, scale_fmt, out.view(_packed_dtype(fmt, bf16)))
            return out
        return _decoder(raws, ss, idx, fmt, bf16, scale_fmt).view(dtype)
    if idx is not None:
        mats = [(r[idx], s[idx]) for r, s in mats]
    ws = [dequantize(r, s, fmt, scale_fmt, inp, dtype) for r, s in mats]
    return ws[0] if len(ws) == 1 else torch.cat(ws, dim=-2)
