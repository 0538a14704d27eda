"""Training attention keeps only (inputs, output, log-denominator) for backward and recomputes the
probabilities (``v4.recompute_attention``): its gradients equal plain autograd's, for every kind
of attention call, and it keeps far less for backward."""

from __future__ import annotations

import pytest
import torch

import sparseek
from sparseek.model import build_model, v4
from tests.conftest import randomize_, rel_err, saved_bytes

B, G, Q, H, C, L, N, K = 2, 3, 5, 4, 16, 9, 7, 3


def _call(kind: str, seed: int):
    """Random inputs of one attention call: the window band only (SWA layers), plus every visible
    compressed entry under a mask (HCA, or CSA picks as a mask), or plus gathered picks (CSA)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, G, Q, H, C, generator=g).requires_grad_()
    win = torch.randn(B, G, L, C, generator=g).requires_grad_()
    win_mask = torch.rand(1, G, Q, L, generator=g) > 0.4  # shared by the rows, as the model's
    win_mask[0, 0, 0] = False  # a query with no window key
    sink = torch.randn(H, generator=g).requires_grad_()
    comp = comp_mask = idx = None
    if kind != "window":
        comp = torch.randn(B, N, C, generator=g).requires_grad_()
    if kind == "masked":
        comp_mask = torch.rand(B, G, Q, N, generator=g) > 0.5
        comp_mask[:, 0, 0] = False  # with the window row above: only the sink is left
    if kind == "gathered":
        idx = torch.randint(-1, N, (B, G, Q, K), generator=g)  # -1 = no pick
        idx[:, 0, 0] = -1
    return q, win, win_mask, comp, comp_mask, idx, sink


@pytest.mark.parametrize("kind", ["window", "masked", "gathered"])
def test_recomputed_backward_equals_autograd(kind, monkeypatch):
    args = _call(kind, seed=1)
    wrt = [t for t in (args[0], args[1], args[3], args[6]) if t is not None]
    got = {}
    for recompute in (False, True):
        monkeypatch.setattr(v4, "recompute_attention", recompute)
        o = v4.attend(*args, 0.3)
        assert o.grad_fn is not None and (type(o.grad_fn).__name__ == "_AttendRecomputeBackward") == recompute
        do = torch.randn(o.shape, generator=torch.Generator().manual_seed(2))
        got[recompute] = (o.detach(), torch.autograd.grad(o, wrt, do))
    (o_ref, g_ref), (o_new, g_new) = got[False], got[True]
    assert torch.equal(o_new, o_ref)
    assert o_ref[:, 0, 0].abs().max() == 0  # the sink-only query attends to nothing
    for name, a, b in zip(("q", "win", "comp", "sink"), g_new, g_ref):
        assert b.abs().max() > 0, name
        assert rel_err(a, b) < 1e-5, name


def test_model_gradients_equal_autograd(monkeypatch):
    """A training forward of every layer type (CSA picks gathered and as a mask, HCA, sliding
    window, MTP): the same loss gradients for every parameter with and without recomputation."""
    model = randomize_(build_model(sparseek.preset("debug")), 5).train()
    ids = torch.randint(0, model.args.vocab_size, (2, 120), generator=torch.Generator().manual_seed(3))

    def grads(recompute: bool, as_mask: bool):
        monkeypatch.setattr(v4, "recompute_attention", recompute)
        monkeypatch.setattr(v4.Attention, "_picks_as_mask", staticmethod(lambda *a: as_mask))
        model.zero_grad()
        logits, h = model(ids, return_hidden=True)
        loss = logits.float().square().mean() + model.forward_mtp(h[:, :-1], ids[:, 1:]).float().square().mean()
        loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    for as_mask in (True, False):
        ref, new = grads(False, as_mask), grads(True, as_mask)
        assert ref.keys() == new.keys() and any("attn_sink" in n for n in ref)
        worst = max(rel_err(new[n], ref[n]) for n in ref)
        assert worst < 1e-4, worst


def _saved_bytes(fn) -> int:
    return saved_bytes(fn)[1]


def test_keeps_no_scores_for_backward(monkeypatch):
    """With 64 keys per query the plain path keeps several [.., H, keys] fp32 tensors per call;
    the recomputing one keeps its inputs, output and one float per (query, head)."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 2, 32, 8, 16, generator=g).requires_grad_()
    win = torch.randn(1, 2, 64, 16, generator=g).requires_grad_()
    mask = torch.ones(1, 2, 32, 64, dtype=torch.bool)
    sink = torch.zeros(8, requires_grad=True)
    inputs = sum(t.numel() * t.element_size() for t in (q, win, mask, sink))
    sizes = {}
    for recompute in (False, True):
        monkeypatch.setattr(v4, "recompute_attention", recompute)
        sizes[recompute] = _saved_bytes(lambda: v4.attend(q, win, mask, None, None, None, sink, 0.25))
    scores = q.shape[:4].numel() * win.shape[2] * 4  # one fp32 score tensor
    out = q.numel() * 4
    assert sizes[True] <= inputs + out + q.shape[:4].numel() * 4
    assert sizes[False] >= inputs + 2 * scores


def test_indexer_builds_no_autograd_graph(monkeypatch):
    """The indexer only picks indices, which carry no gradient: in training its queries, keys and
    scores are computed without autograd (they used to keep [T, heads, N] products per layer)."""
    model = randomize_(build_model(sparseek.preset("debug")), 5).train()
    seen = []
    select = v4.Indexer.select

    def spy(ix, q, w, keys, n_vis):
        seen.append((q.requires_grad, w.requires_grad, keys.requires_grad))
        return select(ix, q, w, keys, n_vis)

    monkeypatch.setattr(v4.Indexer, "select", spy)
    ids = torch.randint(0, model.args.vocab_size, (1, 120), generator=torch.Generator().manual_seed(4))
    model(ids).float().square().mean().backward()
    assert seen and not any(any(flags) for flags in seen)
    assert all(p.grad is None for n, p in model.named_parameters() if ".indexer." in n)
    assert any(p.grad is not None for n, p in model.named_parameters() if ".compressor." in n and "indexer" not in n)


@pytest.mark.parametrize("T, gathered", [(24, False), (120, False), (120, True)])
def test_indexer_loss_trains_only_the_indexer(T, gathered, monkeypatch):
    """The KL loss of the lightning indexer to the main attention (over every visible entry while
    T <= 4 x top-k, over the picks after, gathered or as a mask): finite, its gradient reaches the
    indexer's parameters only, and the model's own gradients are those without it."""
    model = randomize_(build_model(sparseek.preset("debug")), 5).train()
    monkeypatch.setattr(v4.Attention, "_picks_as_mask", staticmethod(lambda *a: not gathered))
    attns = [b.attn for b in model.layers if b.attn.indexer is not None]
    ids = torch.randint(0, model.args.vocab_size, (2, T), generator=torch.Generator().manual_seed(3))

    def grads(learn: bool):
        model.zero_grad()
        for a in attns:
            a.learn_indexer, a.indexer_loss = learn, None
        loss = model(ids).float().square().mean()
        if learn:
            kl = sum(a.indexer_loss for a in attns)
            assert torch.isfinite(kl) and kl > 0
            loss = loss + kl
        loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain, learned = grads(False), grads(True)
    indexer = {n for n in learned if ".indexer." in n}
    assert indexer and not any(".indexer." in n for n in plain)
    assert set(learned) - indexer == set(plain)
    assert all(torch.equal(learned[n], plain[n]) for n in plain)


def test_indexer_loss_falls_when_optimized():
    """A few optimizer steps on the indexers alone bring their picks' distribution toward the main
    attention's (the model itself fixed): the KL falls."""
    model = randomize_(build_model(sparseek.preset("debug")), 5).train()
    attns = [b.attn for b in model.layers if b.attn.indexer is not None]
    params = [p for a in attns for p in a.indexer.parameters()]
    opt = torch.optim.Adam(params, lr=3e-3)
    ids = torch.randint(0, model.args.vocab_size, (2, 120), generator=torch.Generator().manual_seed(3))
    losses = []
    for _ in range(30):
        for a in attns:
            a.learn_indexer = True
        model(ids)
        kl = sum(a.indexer_loss for a in attns)
        losses.append(float(kl.detach()))
        opt.zero_grad()
        kl.backward()
        opt.step()
    assert losses[-1] < 0.7 * losses[0], losses


@pytest.mark.parametrize("gathered", [False, True])
def test_indexer_loss_keeps_no_products_for_backward(gathered, monkeypatch):
    """The indexer's KL recomputes its logits in backward: a training forward with the loss keeps
    less extra than one [B, T, indexer heads, entries] product per CSA layer when the picks are
    scored as a mask over every entry (plain autograd keeps two: the products and their ReLU; the
    gathered picks' products are only top-k wide), and its gradients are unchanged."""
    model = randomize_(build_model(sparseek.preset("debug")), 5).train()
    monkeypatch.setattr(v4.Attention, "_picks_as_mask", staticmethod(lambda *a: not gathered))
    attns = [b.attn for b in model.layers if b.attn.indexer is not None]
    Bs, T = 2, 480  # 120 entries: the products outweigh the indexer's queries and the target
    ids = torch.randint(0, model.args.vocab_size, (Bs, T), generator=torch.Generator().manual_seed(3))

    def run(learn: bool):
        for a in attns:
            a.learn_indexer, a.indexer_loss = learn, None
        out = model(ids)
        return out, (sum(a.indexer_loss for a in attns) if learn else None)

    extra = _saved_bytes(lambda: run(True)) - _saved_bytes(lambda: run(False))
    ix = attns[0].indexer
    products = Bs * T * ix.n_heads * (T // 4) * 4
    assert 0 < extra and (gathered or extra < len(attns) * products)

    grads = {}
    for ckpt in (True, False):
        if not ckpt:  # the reference: plain autograd through the same function
            monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", lambda fn, *a, **k: fn(*a))
        model.zero_grad()
        run(True)[1].backward()
        grads[ckpt] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert grads[True].keys() == grads[False].keys() and grads[True]
    assert all(torch.allclose(grads[True][n], grads[False][n], rtol=1e-5, atol=1e-7) for n in grads[True])


def test_indexer_loss_same_for_picks_gathered_or_masked(monkeypatch):
    """The main attention over the picks is the same softmax gathered or as a mask, so the KL
    and its gradients are too (with a mask the indexer still scores only its picks)."""
    model = randomize_(build_model(sparseek.preset("debug")), 5).train()
    attns = [b.attn for b in model.layers if b.attn.indexer is not None]
    ids = torch.randint(0, model.args.vocab_size, (2, 120), generator=torch.Generator().manual_seed(3))
    got = {}
    for gathered in (False, True):
        monkeypatch.setattr(v4.Attention, "_picks_as_mask", staticmethod(lambda *a: not gathered))
        model.zero_grad()
        for a in attns:
            a.learn_indexer = True
        model(ids)
        kl = sum(a.indexer_loss for a in attns)
        kl.backward()
        got[gathered] = kl.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert torch.allclose(got[True][0], got[False][0], rtol=1e-5)
    assert got[True][1].keys() == got[False][1].keys()
    assert all(torch.allclose(got[True][1][n], got[False][1][n], rtol=1e-4, atol=1e-7) for n in got[True][1])
