"""What training keeps for backward. Pointwise chains that keep only their inputs
(``common.recompute_pointwise``: SwiGLU, RMSNorm, mHC's two sides, on half-precision
activations) and the experts' weighted sum keeping only its index: the gradients of plain
autograd, and less kept."""

from __future__ import annotations

import pytest
import torch

import sparseek
from sparseek.model import build_model, common
from tests.conftest import randomize_, rel_err, saved_bytes


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("limit", [None, 1.5])
@pytest.mark.parametrize("scaled", [False, True])
def test_swiglu_gradients_equal_autograd(dtype, limit, scaled):
    g = torch.Generator().manual_seed(0)
    gate = (torch.randn(64, 32, generator=g) * 2).to(dtype)
    up = (torch.randn(64, 32, generator=g) * 2).to(dtype)
    gate[0, :4], up[1, :4], up[2, :4] = 1.5, -1.5, 1.5  # on the clamps' bounds: torch passes the gradient there
    scale = torch.rand(64, 1, generator=g) if scaled else None
    leaves = [t.clone().requires_grad_() for t in (gate, up) + ((scale,) if scaled else ())]
    sc = leaves[2] if scaled else None
    do = torch.randn(64, 32, generator=g).to(dtype)
    out = {}
    for recompute in (False, True):
        common.recompute_pointwise = recompute
        try:
            y = common.swiglu(leaves[0], leaves[1], limit, sc, dtype)
        finally:
            common.recompute_pointwise = True
        # the recomputing function serves half-precision chains; fp32 ones keep nothing extra
        assert (type(y.grad_fn).__name__ == "_SwiGLUBackward") == (recompute and dtype != torch.float32)
        out[recompute] = (y.detach(), torch.autograd.grad(y, leaves, do))
    y = common._SwiGLU.apply(leaves[0], leaves[1], sc, limit, dtype)  # the function itself, in both dtypes
    out["function"] = (y.detach(), torch.autograd.grad(y, leaves, do))
    for k in (True, "function"):
        assert torch.equal(out[k][0], out[False][0])
        for a, b in zip(out[k][1], out[False][1]):
            assert b.abs().max() > 0 and rel_err(a, b) < 1e-6


@pytest.mark.parametrize("weighted", [True, False])
def test_rmsnorm_gradients_equal_autograd(weighted):
    g = torch.Generator().manual_seed(1)
    m = common.RMSNorm(64, 1e-6)
    m.weight.data = torch.rand(64, generator=g) + 0.5
    x = (torch.randn(3, 40, 64, generator=g) * 3).requires_grad_()
    do = torch.randn(3, 40, 64, generator=g)
    wrt = [x, m.weight] if weighted else [x]
    common.recompute_pointwise = False
    try:
        y = m(x) if weighted else common.rms_unweighted(x, 1e-6)
    finally:
        common.recompute_pointwise = True
    ref = (y.detach(), torch.autograd.grad(y, wrt, do))
    y = common._RMSNorm.apply(x, m.weight if weighted else None, 1e-6)
    got = (y.detach(), torch.autograd.grad(y, wrt, do))
    assert torch.equal(got[0], ref[0])
    for a, b in zip(got[1], ref[1]):
        assert rel_err(a, b) < 1e-6
    xb = x.detach().bfloat16().requires_grad_()
    assert type((m(xb) if weighted else common.rms_unweighted(xb, 1e-6)).grad_fn).__name__ == "_RMSNormBackward"


def test_rmsnorm_bf16_gradient_as_accurate_as_autograds():
    """In bf16 the recomputing backward works in fp32 and rounds once: no further from the fp64
    gradient than plain autograd's bf16 chain."""
    g = torch.Generator().manual_seed(2)
    x64 = torch.randn(8, 50, 128, generator=g, dtype=torch.float64) * 2
    do64 = torch.randn(8, 50, 128, generator=g, dtype=torch.float64)
    x = x64.to(torch.bfloat16).requires_grad_()
    xr = x.detach().double().requires_grad_()
    exact, = torch.autograd.grad(xr * torch.rsqrt(xr.square().mean(-1, keepdim=True) + 1e-6), xr, do64)
    errs = {}
    for recompute in (False, True):
        common.recompute_pointwise = recompute
        try:
            dx, = torch.autograd.grad(common.rms_unweighted(x, 1e-6), x, do64.to(torch.bfloat16))
        finally:
            common.recompute_pointwise = True
        errs[recompute] = rel_err(dx, exact)
    assert errs[True] <= errs[False] * 1.01 + 1e-6 and errs[True] < 1e-2


def _train_step(model, recompute: bool):
    """Loss, bytes kept for backward (weights excluded) and gradients of one training forward of
    every V4 layer type and the MTP block."""
    ids = torch.randint(0, model.args.vocab_size, (2, 65), generator=torch.Generator().manual_seed(3))
    x, y = ids[:, :-1], ids[:, 1:]
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def losses():
        loss, h = model(x, return_hidden=True, targets=y)
        return loss + 0.3 * model.forward_mtp(h[:, :-1], x[:, 1:], targets=y[:, 1:])

    common.recompute_pointwise = recompute
    try:
        model.zero_grad()
        loss, kept = saved_bytes(losses, weights)
        loss.backward()
    finally:
        common.recompute_pointwise = True
    grads = torch.cat([p.grad.float().flatten() for _, p in sorted(model.named_parameters()) if p.grad is not None])
    return float(loss.detach()), kept, grads


def test_fp32_training_unchanged():
    """fp32 activations have no fp32 copies to drop: the switch changes nothing there."""
    model = randomize_(build_model(sparseek.preset("debug")), 5).train()
    (l0, kept0, g0), (l1, kept1, g1) = _train_step(model, False), _train_step(model, True)
    assert l0 == l1 and torch.equal(g0, g1)
    # storages are told apart by data pointer, so in a long test process a small one may land on
    # a pointer seen before: allow a few KiB of that noise, far below any chain's intermediates
    assert abs(kept1 - kept0) <= 4096, (kept0, kept1)


def test_model_bf16_gradients_as_accurate_and_far_less_kept():
    """bf16 weights and streams: the recomputing chains round differently from plain autograd's
    bf16 ones, so both are compared with the fp32 gradient of the same weights; and mHC's input
    side no longer keeps an fp32 copy of the streams."""
    model = randomize_(build_model(sparseek.preset("debug")), 5).to(torch.bfloat16).train()
    (l0, kept0, g0), (l1, kept1, g1) = _train_step(model, False), _train_step(model, True)
    assert l0 == l1
    _, _, exact = _train_step(model.float(), False)
    err0, err1 = (float((g - exact).norm() / exact.norm()) for g in (g0, g1))
    assert err1 < 1.2 * err0 + 1e-3, (err1, err0)
    assert float((g1 - g0).norm() / g0.norm()) < 0.02  # measured ~0.012: bf16 rounding, far below err0
    assert kept1 < 0.7 * kept0, (kept1, kept0)


def test_expert_sum_keeps_only_its_index():
    """The experts' outputs summed into their tokens: torch's index_add keeps the [pairs, hidden]
    outputs for backward, the experts' own sum only the index; same values and gradients."""
    g = torch.Generator().manual_seed(4)
    index = torch.randint(0, 10, (30,), generator=g)
    src = torch.randn(30, 16, generator=g, requires_grad=True)
    do = torch.randn(10, 16, generator=g)
    ref, kept_ref = saved_bytes(lambda: torch.zeros(10, 16).index_add_(0, index, src))
    got, kept = saved_bytes(lambda: common._SumRows.apply(index, src, 10))
    assert torch.equal(got, ref)
    assert torch.equal(torch.autograd.grad(got, src, do)[0], torch.autograd.grad(ref, src, do)[0])
    assert kept_ref >= src.numel() * 4 and kept == index.numel() * 8


def test_mhc_mixing_stays_fp32_under_autocast():
    """mHC's residual mixing is an fp32 island: a training loop's bf16 autocast (here a CPU's,
    which ``fp32_region`` holds off as a GPU's) must not round the streams it mixes."""
    from sparseek.model import v4

    g = torch.Generator().manual_seed(5)
    f, res = torch.randn(2, 7, 32, generator=g), torch.randn(2, 7, 4, 32, generator=g)
    post, comb = torch.rand(2, 7, 4, generator=g), torch.rand(2, 7, 4, 4, generator=g)
    ref = v4.hc_post(f, res, post, comb)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = v4.hc_post(f, res, post, comb)
    assert got.dtype == torch.float32 and torch.equal(got, ref)
