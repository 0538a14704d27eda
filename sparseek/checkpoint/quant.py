"""DeepSeek's weight formats: FP8 e4m3 with 128x128 block scales, FP4 e2m1 (MXFP4) routed experts.

* FP8: ``weight`` float8_e4m3fn [out, in]; ``scale`` (V4: float8_e8m0fnu, V3: f32
  ``weight_scale_inv``) [ceil(out/128), ceil(in/128)]; W = w * scale[i // 128, j // 128].
* FP4: ``weight`` int8 [out, in/2], two e2m1 codes per byte, the *low* nibble is element 2j;
  ``scale`` float8_e8m0fnu [out, in/32], one power of two per 1x32 block along the input dim.

The quantizers exist for tests and for writing quantized checkpoints; both round to the nearest
representable value with power-of-two (ue8m0) scales, as DeepSeek's converter does.
"""

from __future__ import annotations

import torch

FP8_BLOCK = 128
FP4_BLOCK = 32
FP8_MAX = 448.0
FP4_MAX = 6.0
E2M1_VALUES = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0])


def _expand_blocks(scale: torch.Tensor, rows: int, cols: int, br: int, bc: int) -> torch.Tensor:
    return scale.float().repeat_interleave(br, dim=0)[:rows].repeat_interleave(bc, dim=1)[:, :cols]


def dequant_fp8(weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.bfloat16,
                block: int = FP8_BLOCK) -> torch.Tensor:
    out, inp = weight.shape
    want = (-(-out // block), -(-inp // block))
    if tuple(scale.shape) != want:
        raise ValueError(f"FP8 scale has shape {tuple(scale.shape)}, expected {want} for weight {tuple(weight.shape)}")
    return (weight.float() * _expand_blocks(scale, out, inp, block, block)).to(dtype)


def unpack_fp4(packed: torch.Tensor) -> torch.Tensor:
    """int8 [out, in/2] -> float32 [out, in] of e2m1 values (low nibble first)."""
    b = packed.view(torch.uint8)
    codes = torch.stack((b & 0x0F, b >> 4), dim=-1).flatten(-2).long()
    return E2M1_VALUES.to(packed.device)[codes]


def dequant_fp4(packed: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.bfloat16,
                block: int = FP4_BLOCK) -> torch.Tensor:
    out, half = packed.shape
    want = (out, 2 * half // block)
    if tuple(scale.shape) != want:
        raise ValueError(f"FP4 scale has shape {tuple(scale.shape)}, expected {want} for packed weight {tuple(packed.shape)}")
    values = unpack_fp4(packed)
    return (values * scale.float().repeat_interleave(block, dim=1)).to(dtype)


def _pow2_scale(amax: torch.Tensor, qmax: float) -> torch.Tensor:
    # smallest power of two s with amax / s <= qmax (ue8m0: the scale is an exponent only)
    return torch.exp2(torch.ceil(torch.log2(amax.clamp(min=1e-30) / qmax)))


def quant_fp8(w: torch.Tensor, block: int = FP8_BLOCK, scale_dtype: torch.dtype = torch.float8_e8m0fnu):
    out, inp = w.shape
    R, C = -(-out // block), -(-inp // block)
    padded = torch.zeros(R * block, C * block, dtype=torch.float32, device=w.device)
    padded[:out, :inp] = w.float()
    amax = padded.view(R, block, C, block).abs().amax(dim=(1, 3))
    scale = _pow2_scale(amax, FP8_MAX)
    q = (w.float() / _expand_blocks(scale, out, inp, block, block)).clamp(-FP8_MAX, FP8_MAX)
    return q.to(torch.float8_e4m3fn), scale.to(scale_dtype)


def quant_fp4(w: torch.Tensor, block: int = FP4_BLOCK):
    out, inp = w.shape
    if inp % block:
        raise ValueError(f"FP4 needs the input dim to be a multiple of {block}, got {inp}")
    wb = w.float().view(out, inp // block, block)
    scale = _pow2_scale(wb.abs().amax(dim=-1), FP4_MAX)
    x = (wb / scale.unsqueeze(-1)).view(out, inp)
    table = E2M1_VALUES.to(w.device)
    codes = (x.unsqueeze(-1) - table).abs().argmin(dim=-1)  # nearest representable value
    codes = codes.to(torch.uint8).view(out, inp // 2, 2)
    packed = (codes[..., 0] | (codes[..., 1] << 4)).view(torch.int8)
    return packed, scale.to(torch.float8_e8m0fnu)
