"""FP8 (128x128 block scales) and FP4 (e2m1, 1x32 e8m0 scales) formats, checked by hand."""

from __future__ import annotations

import torch

from sparseek.checkpoint.quant import dequant_fp4, dequant_fp8, quant_fp4, quant_fp8, unpack_fp4


def test_fp8_dequant_uses_the_block_of_each_element():
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(130, 260, generator=g) * 10).to(torch.float8_e4m3fn)  # partial edge blocks
    exps = torch.tensor([[0, -3, 5], [2, -1, 7]], dtype=torch.float32)
    scale = torch.exp2(exps).to(torch.float8_e8m0fnu)
    out = dequant_fp8(w, scale, torch.float32)
    for i, j in [(0, 0), (127, 127), (128, 0), (5, 200), (129, 259), (64, 130)]:
        assert out[i, j] == w[i, j].float() * 2.0 ** exps[i // 128, j // 128]
    # the f32 `weight_scale_inv` of V3 checkpoints multiplies the same way
    inv = torch.tensor([[0.5, 3.0, 1.0], [2.0, 0.25, 4.0]])
    out = dequant_fp8(w, inv, torch.float32)
    assert out[129, 130] == w[129, 130].float() * 0.25


def test_fp4_nibble_order_and_scale():
    # 0x21: low nibble 1 -> 0.5 (element 0), high nibble 2 -> 1.0 (element 1)
    # 0xF8: low nibble 8 -> -0.0, high nibble 15 -> -6.0
    row = [0x21, 0xF8] + [0x77] * 14 + [0x3A] * 16  # 32 bytes = 64 values = two 32-blocks
    packed = torch.tensor([row], dtype=torch.uint8).view(torch.int8)
    vals = unpack_fp4(packed)[0]
    assert vals[:4].tolist() == [0.5, 1.0, -0.0, -6.0]
    assert vals[4:32].tolist() == [6.0] * 28
    assert vals[32:34].tolist() == [-1.0, 1.5]  # 0x3A: low 10 -> -1.0, high 3 -> 1.5
    scale = torch.tensor([[2.0 ** -2, 2.0 ** 3]]).to(torch.float8_e8m0fnu)
    w = dequant_fp4(packed, scale, torch.float32)[0]
    assert w[:4].tolist() == [0.125, 0.25, -0.0, -1.5]
    assert w[32:34].tolist() == [-8.0, 12.0]


def test_quantizers_round_trip():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(256, 384, generator=g)
    q, s = quant_fp8(w)
    assert q.dtype == torch.float8_e4m3fn and s.shape == (2, 3) and s.dtype == torch.float8_e8m0fnu
    back = dequant_fp8(q, s, torch.float32)
    assert ((back - w).abs() / w.abs().clamp(min=1e-2)).median() < 0.05
    p, s4 = quant_fp4(w)
    assert p.shape == (256, 192) and s4.shape == (256, 12)
    back4 = dequant_fp4(p, s4, torch.float32)
    assert (back4 - w).abs().mean() < 0.15 * w.abs().mean()
    # values already on the FP4 grid come back exactly
    grid = dequant_fp4(p, s4, torch.float32)
    p2, s2 = quant_fp4(grid)
    assert torch.equal(dequant_fp4(p2, s2, torch.float32), grid)
