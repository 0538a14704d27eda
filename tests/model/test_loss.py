"""The fused head + cross-entropy (``model/loss.py``): the loss and gradients of
``F.cross_entropy`` over the materialized logits, for any chunking, with ignored rows, through
the models' ``targets`` argument, and without keeping a [tokens, vocab] tensor for backward."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import sparseek
from sparseek.model import build_model
from sparseek.model import loss as L
from tests.conftest import randomize_, rel_err, saved_bytes


def _inputs(N=50, D=16, V=97, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, D, generator=g).to(dtype).requires_grad_()
    w = (torch.randn(V, D, generator=g) * 0.3).to(dtype).requires_grad_()
    y = torch.randint(0, V, (N,), generator=g)
    y[::5] = L.IGNORE_INDEX
    return h, w, y


def _loss_and_grads(fn, h, w, upstream=1.7):
    loss = fn()
    return (loss.detach(), *torch.autograd.grad(loss * upstream, [h, w]))


@pytest.mark.parametrize("skip", [True, False], ids=["ignored-rows-dropped", "ignored-rows-masked"])
@pytest.mark.parametrize("rows", [1, 7, 50, 64])
def test_equals_cross_entropy_of_the_logits(rows, skip, monkeypatch):
    monkeypatch.setattr(L, "skip_ignored", lambda device: skip)
    h, w, y = _inputs()
    ref = _loss_and_grads(lambda: F.cross_entropy((h @ w.t()).float(), y), h, w)
    got = _loss_and_grads(lambda: L.linear_cross_entropy(h, w, y, rows=rows), h, w)
    assert torch.allclose(got[0], ref[0], rtol=1e-6)
    for a, b in zip(got[1:], ref[1:]):
        assert b.abs().max() > 0 and rel_err(a, b) < 1e-5
    assert got[1][::5].abs().max() == 0 and got[1][1::5].abs().max() > 0  # ignored rows get no gradient


def test_bf16_rounds_as_the_unfused_path():
    h, w, y = _inputs(N=64, D=32, V=300, dtype=torch.bfloat16)
    ref = _loss_and_grads(lambda: F.cross_entropy((h @ w.t()).float(), y), h, w)
    got = _loss_and_grads(lambda: L.linear_cross_entropy(h, w, y, rows=16), h, w)
    assert got[1].dtype == h.dtype and got[2].dtype == w.dtype
    assert torch.allclose(got[0], ref[0], rtol=1e-5)
    for a, b in zip(got[1:], ref[1:]):
        assert rel_err(a, b) < 2e-2


def test_all_rows_ignored_gives_nan_as_torch_does():
    h, w, y = _inputs(N=6)
    y[:] = L.IGNORE_INDEX
    assert torch.isnan(F.cross_entropy((h @ w.t()).float(), y))
    loss = L.linear_cross_entropy(h, w, y, rows=4)
    assert torch.isnan(loss)


def test_keeps_no_logits_for_backward():
    """Autograd keeps the two gradients (h-sized and w-sized) instead of [N, V] log-probabilities."""
    h, w, y = _inputs(N=256, D=8, V=1000)
    sizes = {name: saved_bytes(fn)[1] for name, fn in (
        ("fused", lambda: L.linear_cross_entropy(h, w, y, rows=32)),
        ("logits", lambda: F.cross_entropy((h @ w.t()).float(), y)))}
    logits_bytes = 256 * 1000 * 4
    assert sizes["logits"] >= logits_bytes
    assert sizes["fused"] <= h.numel() * 4 + w.numel() * 4 + 1024


def test_without_grad_only_the_loss():
    h, w, y = _inputs()
    with torch.no_grad():
        got = L.linear_cross_entropy(h, w, y, rows=8)
        ref = F.cross_entropy((h @ w.t()).float(), y)
    assert got.grad_fn is None and torch.allclose(got, ref, rtol=1e-6)


@pytest.mark.parametrize("preset", ["debug", "debug-v3"])
def test_model_targets_equal_loss_of_logits(preset):
    """``model(ids, targets=y)`` and ``forward_mtp(..., targets=y)``: the losses of the logits
    path and the same gradient for every parameter (V4 and V3, fp32)."""
    model = randomize_(build_model(sparseek.preset(preset)), 3).train()
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(0, model.args.vocab_size, (2, 40), generator=g)
    y = torch.randint(0, model.args.vocab_size, (2, 40), generator=g)
    y[0, :5] = L.IGNORE_INDEX

    def run(fused: bool):
        model.zero_grad()
        if fused:
            loss, h = model(ids, return_hidden=True, targets=y)
            mtp = model.forward_mtp(h[:, :-1], ids[:, 1:], targets=y[:, 1:])
        else:
            logits, h = model(ids, return_hidden=True)
            loss = F.cross_entropy(logits.flatten(0, 1), y.flatten())
            mtp = F.cross_entropy(model.forward_mtp(h[:, :-1], ids[:, 1:]).flatten(0, 1), y[:, 1:].flatten())
        (loss + 0.3 * mtp).backward()
        return loss.detach(), mtp.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                                             if p.grad is not None}

    ref, got = run(False), run(True)
    assert torch.allclose(got[0], ref[0], rtol=1e-5) and torch.allclose(got[1], ref[1], rtol=1e-5)
    assert got[2].keys() == ref[2].keys() and "head.weight" in ref[2]
    worst = max(rel_err(got[2][n], ref[2][n]) for n in ref[2])
    assert worst < 1e-4, worst


def test_head_that_is_not_a_plain_product_goes_through_its_logits():
    """A hook (or an adapter, or fake quantization) on the head changes its output: the loss
    must then come from the module's own output, not its weight."""
    model = randomize_(build_model(sparseek.preset("debug")), 3).eval()
    ids = torch.randint(0, model.args.vocab_size, (1, 12), generator=torch.Generator().manual_seed(0))
    y = ids.roll(-1, 1)
    plain = model(ids, targets=y)
    assert L.fusable(model.head)
    handle = model.head.register_forward_hook(lambda m, i, o: o * 2)
    try:
        assert not L.fusable(model.head)
        doubled = model(ids, targets=y)
        assert torch.allclose(doubled, F.cross_entropy(model(ids).flatten(0, 1), y.flatten()))
    finally:
        handle.remove()
    assert not torch.allclose(doubled, plain)


def test_bad_targets_are_refused_by_name():
    model = randomize_(build_model(sparseek.preset("debug")), 3).eval()
    ids = torch.zeros(2, 8, dtype=torch.long)
    with pytest.raises(ValueError, match="targets have shape"):
        model(ids, targets=torch.zeros(2, 7, dtype=torch.long))
    for bad in (-1, model.args.vocab_size):  # -1 would read as token 0 after the clamp
        y = torch.zeros(2, 8, dtype=torch.long)
        y[1, 3] = bad
        with pytest.raises(ValueError, match=f"got {bad}"):
            model(ids, targets=y)
    y32 = torch.ones(2, 8, dtype=torch.int32)  # any integer dtype
    assert torch.allclose(model(ids, targets=y32), model(ids, targets=y32.long()))
