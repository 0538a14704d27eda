"""Reduced precision: a bfloat16 model (what a GPU runs) computes what the float32 one does, to
bfloat16 accuracy, on every path (full forward, cached decode, static decode step)."""

from __future__ import annotations

import pytest
import torch

import sparseek
from sparseek.model import build_model
from tests.conftest import randomize_

FP32_KEEP = ("norm", "hc_", "attn_sink", "compressor", "gate.", "ape")  # stay fp32 by design


def _pair(preset: str, seed: int = 0):
    m32 = randomize_(build_model(sparseek.preset(preset)), seed).eval()
    m16 = build_model(sparseek.preset(preset), dtype=torch.bfloat16).eval()
    m16.load_state_dict(m32.state_dict())
    return m32, m16


def _position_err(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Relative max error per (row, position): robust to the rare routing flip bf16 may cause."""
    a, b = a.float(), b.float()
    return (a - b).abs().amax(-1) / b.abs().amax(-1).clamp(min=1e-12)


@pytest.mark.parametrize("preset", ["debug", "debug-v3", "debug-v2"])
def test_bfloat16_model_is_bfloat16_and_close_to_float32(preset):
    m32, m16 = _pair(preset)
    for name, p in m16.named_parameters():
        if p.dim() == 2 and not any(k in name for k in FP32_KEEP):
            assert p.dtype == torch.bfloat16, name  # nothing silently left in fp32 (it would not run)
    ids = torch.randint(0, m32.args.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref, got = m32(ids), m16(ids)
    assert got.dtype == torch.float32 and got.shape == ref.shape
    err = _position_err(got, ref)
    assert err.median() < 0.05, err
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() > 0.8


@pytest.mark.parametrize("preset", ["debug", "debug-v3"])
def test_bfloat16_cached_decode_is_as_accurate_as_the_full_forward(preset):
    """Against the fp32 model, bf16 chunked prefill + decode (eager and static step) are as close
    as the bf16 full forward: tiny random models are touchy (a routing flip moves a position by
    tens of percent), so compare medians over many positions."""
    m32, m16 = _pair(preset, seed=1)
    T = 150  # past an HCA window of 128 and many CSA windows
    ids = torch.randint(0, m16.args.vocab_size, (2, T), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref, full = m32(ids), m16(ids)
        cache = m16.new_cache(2, T + 8)
        eager = torch.cat([m16(ids[:, :100], cache)] + [m16(ids[:, t:t + 1], cache) for t in range(100, T)], 1)
        static = None
        if hasattr(m16, "decode_step"):
            cache = m16.new_cache(2, T + 8)
            m16(ids[:, :100], cache)
            static = torch.stack([m16.decode_step(ids[:, t:t + 1], cache) for t in range(100, T)], 1)
    base = _position_err(full, ref)[:, 100:].median()
    assert base < 0.1
    assert _position_err(eager, ref)[:, 100:].median() < 2 * base
    if static is not None:
        assert _position_err(static, ref[:, 100:]).median() < 2 * base


def test_blanket_cast_to_bfloat16_still_runs():
    """``model.to(torch.bfloat16)`` (what users do) also casts the fp32 islands (mHC mixing, the
    compressor); they compute in fp32 regardless, so forward, decode and backward still work."""
    m32, _ = _pair("debug")
    m16 = build_model(sparseek.preset("debug")).eval()
    m16.load_state_dict(m32.state_dict())
    m16 = m16.to(torch.bfloat16)
    assert m16.layers[0].hc_attn_fn.dtype == torch.bfloat16
    ids = torch.randint(0, m16.args.vocab_size, (2, 40), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = m32(ids)
        got = m16(ids)
        cache = m16.new_cache(2, 48)
        m16(ids[:, :39], cache)
        last = m16(ids[:, 39:], cache)
    assert _position_err(got, ref).median() < 0.1
    assert _position_err(last[:, -1], got[:, -1]).max() < 0.1
    logits, h = m16(ids, return_hidden=True)
    (logits.float().sum() + m16.forward_mtp(h[:, :-1], ids[:, 1:]).float().sum()).backward()
    assert m16.layers[1].attn.compressor.wkv.weight.grad is not None
