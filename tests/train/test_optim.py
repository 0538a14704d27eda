"""DeepSeek-V4's optimizer setup: Muon (hybrid Newton-Schulz), parameter assignment, AdamW, schedules."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
import torch.nn.functional as F

import sparseek
from sparseek.model import build_model
from sparseek.train.optim import (
    HYBRID_NS_STEPS,
    Combined,
    Muon,
    apply_lr,
    build_optimizer,
    describe_groups,
    hybrid_newton_schulz,
    lr_schedule,
    param_groups,
)
from tests.conftest import randomize_


# ---------------------------------------------------------------------------- a hand-written reference
def _mm(A, B):
    return [[sum(A[i][k] * B[k][j] for k in range(len(B))) for j in range(len(B[0]))] for i in range(len(A))]


def _t(A):
    return [list(col) for col in zip(*A)]


def _hand_ns(U, eps=1e-7):
    """The report's HybridNS on a list-of-lists matrix, in Python floats (float64)."""
    n, m = len(U), len(U[0])
    fro = math.sqrt(sum(u * u for row in U for u in row))
    X = [[u / (fro + eps) for u in row] for row in U]
    tall = n > m
    if tall:
        X = _t(X)
    for k in range(10):
        a, b, c = (3.4445, -4.7750, 2.0315) if k < 8 else (2.0, -1.5, 0.5)
        A = _mm(X, _t(X))       # X X^T
        AX = _mm(A, X)          # (X X^T) X
        AAX = _mm(A, AX)        # (X X^T)^2 X
        X = [[a * X[i][j] + b * AX[i][j] + c * AAX[i][j] for j in range(len(X[0]))] for i in range(len(X))]
    return _t(X) if tall else X


def _hand_muon_step(W, G, M_prev, lr, mu=0.95, wd=0.1, gamma=0.18):
    """One step of the report's Alg. 1 for one matrix: returns (new W, new momentum)."""
    n, m = len(W), len(W[0])
    M = [[mu * M_prev[i][j] + G[i][j] for j in range(m)] for i in range(n)]         # M_t = mu M + G
    U = [[G[i][j] + mu * M[i][j] for j in range(m)] for i in range(n)]              # Nesterov blend
    O = _hand_ns(U)
    scale = math.sqrt(max(n, m)) * gamma                                             # RMS -> 0.18
    W_new = [[W[i][j] * (1 - lr * wd) - lr * scale * O[i][j] for j in range(m)] for i in range(n)]
    return W_new, M


@pytest.mark.parametrize("shape", [(3, 5), (5, 3), (4, 4)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_muon_step_matches_hand_computation(shape, dtype):
    g = torch.Generator().manual_seed(0)
    W0 = torch.randn(shape, generator=g, dtype=torch.float64)
    grads = [torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(3)]
    lrs = [0.02, 0.05, 0.01]

    p = torch.nn.Parameter(W0.clone().to(dtype))
    opt = Muon([p], lr=lrs[0], ns_dtype=dtype)  # momentum 0.95, nesterov, wd 0.1, rms 0.18 by default
    W, M = W0.tolist(), [[0.0] * shape[1] for _ in range(shape[0])]
    for G, lr in zip(grads, lrs):  # three steps: the momentum buffer carries over
        apply_lr(opt, lr)
        p.grad = G.to(dtype)
        opt.step()
        W, M = _hand_muon_step(W, G.tolist(), M, lr)
        tol = 1e-10 if dtype == torch.float64 else 2e-6
        torch.testing.assert_close(p.detach().double(), torch.tensor(W, dtype=torch.float64), atol=tol, rtol=0)
        torch.testing.assert_close(opt.state[p]["momentum_buffer"].double(), torch.tensor(M, dtype=torch.float64), atol=tol, rtol=0)


def test_hybrid_ns_schedule_and_orthogonality():
    assert len(HYBRID_NS_STEPS) == 10
    assert HYBRID_NS_STEPS[:8] == ((3.4445, -4.7750, 2.0315),) * 8
    assert HYBRID_NS_STEPS[8:] == ((2.0, -1.5, 0.5),) * 2
    g = torch.Generator().manual_seed(1)
    for n, m in [(64, 32), (32, 64), (48, 48), (256, 24)]:
        # singular values spread over two decades: the quintic still lifts the small ones
        u, _ = torch.linalg.qr(torch.randn(n, n, generator=g))
        v, _ = torch.linalg.qr(torch.randn(m, m, generator=g))
        k = min(n, m)
        s = torch.logspace(0, -2, k)
        x = u[:, :k] @ torch.diag(s) @ v[:, :k].T
        for dtype in (torch.float32, torch.bfloat16):
            o = hybrid_newton_schulz(x, dtype=dtype)
            assert o.shape == x.shape and o.dtype == dtype
            sv = torch.linalg.svdvals(o.float())
            assert sv.min() > 0.7 and sv.max() < 1.2, (n, m, dtype, sv.min(), sv.max())
            # the singular vectors are kept: O ~ U V^T
            assert F.cosine_similarity(o.float().flatten(), (u[:, :k] @ v[:, :k].T).flatten(), dim=0) > 0.99


def test_tall_and_wide_give_the_explicit_formula():
    g = torch.Generator().manual_seed(2)
    tall = torch.randn(9, 4, generator=g, dtype=torch.float64)
    # the explicit formula straight on the tall matrix (big n x n Gram matrix, no transpose)
    x = tall / (torch.linalg.matrix_norm(tall) + 1e-7)
    for a, b, c in HYBRID_NS_STEPS:
        A = x @ x.T
        x = a * x + b * A @ x + c * A @ A @ x
    ours = hybrid_newton_schulz(tall, dtype=torch.float64)
    torch.testing.assert_close(ours, x, atol=1e-10, rtol=0)
    torch.testing.assert_close(hybrid_newton_schulz(tall.T.contiguous(), dtype=torch.float64), x.T,
                               atol=1e-10, rtol=0)
    # and a Muon step on W^T with G^T is the transpose of the step on W (scale uses max(n, m))
    p1 = torch.nn.Parameter(torch.randn(9, 4, generator=g, dtype=torch.float64))
    p2 = torch.nn.Parameter(p1.detach().T.clone())
    o1 = Muon([p1], lr=0.03, ns_dtype=torch.float64)
    o2 = Muon([p2], lr=0.03, ns_dtype="float64")
    for _ in range(2):
        G = torch.randn(9, 4, generator=g, dtype=torch.float64)
        p1.grad, p2.grad = G, G.T.clone()
        o1.step()
        o2.step()
    torch.testing.assert_close(p1.detach(), p2.detach().T, atol=1e-12, rtol=0)


@pytest.mark.parametrize("shape", [(6, 8, 5), (6, 5, 8)])
def test_stacked_experts_equal_per_slice_updates(shape):
    g = torch.Generator().manual_seed(3)
    W = torch.randn(shape, generator=g)
    stacked = torch.nn.Parameter(W.clone())
    slices = [torch.nn.Parameter(W[e].clone()) for e in range(shape[0])]
    o_stacked = Muon([stacked], lr=0.02)
    o_slices = Muon(slices, lr=0.02)
    for step in range(3):
        G = torch.randn(shape, generator=g) * (1 + torch.arange(shape[0]).view(-1, 1, 1))  # per-expert scale
        if step == 1:
            G[2] = 0  # an expert that got no tokens this step still decays and rides its momentum
        stacked.grad = G.clone()
        for e, p in enumerate(slices):
            p.grad = G[e].clone()
        o_stacked.step()
        o_slices.step()
        torch.testing.assert_close(stacked.detach(), torch.stack([p.detach() for p in slices]), atol=1e-6, rtol=0)


def test_muon_update_rms_is_rms_scale():
    p = torch.nn.Parameter(torch.zeros(64, 16))
    opt = Muon([p], lr=1.0, weight_decay=0.0)
    p.grad = torch.randn(64, 16)
    opt.step()
    assert abs(p.detach().square().mean().sqrt().item() - 0.18) < 0.005


def test_ns_dtype_defaults_and_bf16_params():
    from sparseek.train.optim import _ns_dtype

    assert _ns_dtype(None, torch.device("cuda")) == torch.bfloat16
    assert _ns_dtype(None, torch.device("cpu")) == torch.float32
    assert _ns_dtype("bfloat16", torch.device("cpu")) == torch.bfloat16
    g = torch.Generator().manual_seed(4)
    W, G = torch.randn(4, 16, 24, generator=g), torch.randn(4, 16, 24, generator=g)
    p32, p16 = torch.nn.Parameter(W.clone()), torch.nn.Parameter(W.to(torch.bfloat16))
    o32, o16 = Muon([p32], lr=0.05), Muon([p16], lr=0.05, ns_dtype=torch.bfloat16)
    p32.grad, p16.grad = G.clone(), G.to(torch.bfloat16)
    o32.step()
    o16.step()
    assert p16.dtype == torch.bfloat16 and o16.state[p16]["momentum_buffer"].dtype == torch.float32
    delta32, delta16 = p32.detach() - W, p16.detach().float() - W.to(torch.bfloat16).float()
    assert F.cosine_similarity(delta32.flatten(), delta16.flatten(), dim=0) > 0.95


def test_muon_rejects_vectors():
    with pytest.raises(ValueError, match="AdamW"):
        Muon([torch.nn.Parameter(torch.zeros(4))])


# ---------------------------------------------------------------------------- who goes where
def _debug_model(seed=0):
    return randomize_(build_model(sparseek.preset("debug")), seed)


def test_every_trainable_param_assigned_exactly_once():
    model = _debug_model()
    model.layers[0].attn.wkv.weight.requires_grad_(False)  # frozen: goes nowhere
    desc = describe_groups(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(desc) == trainable
    assert set(desc.values()) == {"muon", "adamw", "adamw_no_decay"}
    buffers = {n for n, _ in model.named_buffers()}
    assert any(n.endswith("gate.bias") for n in buffers) and any("tid2eid" in n for n in buffers)
    assert not buffers & set(desc)

    expected = {
        "embed.weight": "adamw",
        "head.weight": "adamw",
        "norm.weight": "adamw_no_decay",
        "hc_head_fn": "muon",
        "hc_head_base": "adamw_no_decay",
        "hc_head_scale": "adamw_no_decay",
        "layers.0.hc_attn_fn": "muon",
        "layers.0.hc_attn_base": "adamw_no_decay",
        "layers.0.hc_ffn_scale": "adamw_no_decay",
        "layers.0.attn_norm.weight": "adamw_no_decay",
        "layers.0.attn.q_norm.weight": "adamw_no_decay",
        "layers.0.attn.attn_sink": "adamw_no_decay",
        "layers.0.attn.wq_a.weight": "muon",
        "layers.0.attn.wo_b.weight": "muon",
        "layers.1.attn.compressor.ape": "adamw_no_decay",
        "layers.1.attn.compressor.wkv.weight": "muon",
        "layers.1.attn.compressor.norm.weight": "adamw_no_decay",
        "layers.1.attn.indexer.wq_b.weight": "muon",
        "layers.1.attn.indexer.weights_proj.weight": "muon",
        "layers.3.ffn.gate.weight": "muon",
        "layers.3.ffn.experts.w1": "muon",
        "layers.3.ffn.experts.w2": "muon",
        "layers.3.ffn.shared_experts.w3.weight": "muon",
        "mtp.0.e_proj.weight": "muon",
        "mtp.0.h_proj.weight": "muon",
        "mtp.0.enorm.weight": "adamw_no_decay",
        "mtp.0.hc_head_fn": "muon",
        "mtp.0.hc_head_scale": "adamw_no_decay",
    }
    assert {n: desc[n] for n in expected} == expected
    assert "layers.0.attn.wkv.weight" not in desc

    # the optimizer objects agree with describe_groups and hold every parameter once
    muon, adamw_groups = param_groups(model, lr=1e-3, weight_decay=0.1)
    by_id = {id(p): n for n, p in model.named_parameters()}
    seen = [by_id[id(p)] for p in muon] + [by_id[id(p)] for g in adamw_groups for p in g["params"]]
    assert sorted(seen) == sorted(desc)
    assert all(desc[by_id[id(p)]] == "muon" for p in muon)
    for g in adamw_groups:
        assert all(desc[by_id[id(p)]] == g["kind"] for p in g["params"])
        assert g["weight_decay"] == (0.1 if g["kind"] == "adamw" else 0.0)
    for name in ("muon", "adamw"):
        opt = build_optimizer(model, name=name, lr=1e-3)
        in_opt = [by_id[id(p)] for g in opt.param_groups for p in g["params"]]
        assert sorted(in_opt) == sorted(desc)


@pytest.mark.parametrize("preset", ["debug-v3", "debug-v2"])
def test_assignment_other_families(preset):
    desc = describe_groups(build_model(sparseek.preset(preset)))
    assert desc["embed.weight"] == desc["head.weight"] == "adamw"
    assert desc["norm.weight"] == "adamw_no_decay"
    assert desc["layers.0.attn.wkv_a.weight"] == "muon"
    assert all(k == "muon" for n, k in desc.items() if "experts" in n)


# ---------------------------------------------------------------------------- AdamW, resume, schedules
def _fake_grads(model, seed):
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=g, dtype=p.dtype) if p.requires_grad else None


def test_adamw_groups_match_torch_adamw():
    model = _debug_model()
    ref_model = copy.deepcopy(model)
    opt = build_optimizer(model, lr=3e-3, weight_decay=0.1)
    assert isinstance(opt, Combined) and isinstance(opt, torch.optim.Optimizer)
    desc = describe_groups(ref_model)
    params = dict(ref_model.named_parameters())
    ref = torch.optim.AdamW(
        [{"params": [params[n] for n, k in desc.items() if k == "adamw"], "weight_decay": 0.1},
         {"params": [params[n] for n, k in desc.items() if k == "adamw_no_decay"], "weight_decay": 0.0}],
        lr=3e-3, betas=(0.9, 0.95), eps=1e-20)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for step in range(3):
        _fake_grads(model, step)
        _fake_grads(ref_model, step)
        opt.step()
        ref.step()
    for n, p in model.named_parameters():
        if desc[n] == "muon":
            assert not torch.equal(p, before[n]), n
        else:
            assert torch.equal(p, params[n]), n


def _train_steps(model, opt, steps, start):
    for step in range(start, start + steps):
        apply_lr(opt, lr_schedule(step, warmup=2, total=6, peak=3e-3, final=3e-4))
        _fake_grads(model, 100 + step)
        opt.step()
        opt.zero_grad()


def test_state_dict_round_trip_resumes_exactly():
    model = _debug_model()
    opt = build_optimizer(model, lr=3e-3)
    _train_steps(model, opt, 2, start=0)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "optim": opt.state_dict()}, buf)

    _train_steps(model, opt, 3, start=2)  # the uninterrupted run

    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    resumed = build_model(sparseek.preset("debug"))
    resumed.load_state_dict(ckpt["model"])
    opt2 = build_optimizer(resumed, lr=1.0)  # hyperparameters come back from the state dict
    opt2.load_state_dict(ckpt["optim"])
    assert len(opt2.state) == len(list(resumed.parameters()))
    _train_steps(resumed, opt2, 3, start=2)
    for (n, a), b in zip(model.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), n
    sd1, sd2 = opt.state_dict()["optimizers"], opt2.state_dict()["optimizers"]
    for name in sd1:
        for k, s in sd1[name]["state"].items():
            for key, v in s.items():
                assert torch.equal(torch.as_tensor(v), torch.as_tensor(sd2[name]["state"][k][key])), (name, k, key)


def test_combined_param_groups_drive_both_and_torch_schedulers_work():
    model = _debug_model()
    opt = build_optimizer(model, lr=1e-3)
    kinds = [g["kind"] for g in opt.param_groups]
    assert kinds == ["muon", "adamw", "adamw_no_decay"]
    opt.param_groups[-1]["lr_scale"] = 0.5
    apply_lr(opt, 2e-3)
    assert [g["lr"] for g in opt.optimizers["muon"].param_groups] == [2e-3]
    assert [g["lr"] for g in opt.optimizers["adamw"].param_groups] == [2e-3, 1e-3]
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.1 * (s + 1))
    _fake_grads(model, 0)
    opt.step()
    sched.step()
    assert all(math.isclose(g["lr"], 0.2 * g["initial_lr"]) for g in opt.param_groups)
    assert math.isclose(opt.optimizers["muon"].param_groups[0]["lr"], 0.2 * 2e-3)
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())
    # after a reload the shared groups are the children's new ones
    opt.load_state_dict(opt.state_dict())
    apply_lr(opt, 5e-3)
    assert opt.optimizers["adamw"].param_groups[0]["lr"] == 5e-3
    clone = copy.deepcopy(opt)
    assert clone.param_groups[0] is clone.optimizers["muon"].param_groups[0]


def test_build_optimizer_adamw_only():
    model = _debug_model()
    opt = build_optimizer(model, name="adamw", lr=1e-3, weight_decay=0.05, eps=1e-8)
    assert type(opt) is torch.optim.AdamW
    desc = describe_groups(model)
    by_id = {id(p): n for n, p in model.named_parameters()}
    decayed = {by_id[id(p)] for g in opt.param_groups if g["weight_decay"] == 0.05 for p in g["params"]}
    assert decayed == {n for n, k in desc.items() if k in ("muon", "adamw")}
    with pytest.raises(ValueError):
        build_optimizer(model, name="sgd")


def test_debug_model_trains():
    torch.manual_seed(0)
    model = _debug_model().train()
    ids = torch.randint(0, model.args.vocab_size, (2, 17))
    opt = build_optimizer(model, lr=1e-2)

    def loss_fn():
        logits = model(ids[:, :-1])
        return F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())

    first = None
    for _ in range(4):
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        opt.step()
        first = first if first is not None else loss.item()
    assert loss_fn().item() < first - 0.1


def test_lr_schedule():
    kw = dict(warmup=10, total=110, peak=1.0, final=0.1)
    assert lr_schedule(0, **kw) == pytest.approx(0.1)
    assert lr_schedule(4, **kw) == pytest.approx(0.5)
    assert lr_schedule(9, **kw) == pytest.approx(1.0)
    assert lr_schedule(10, **kw) == pytest.approx(1.0)
    assert lr_schedule(60, **kw) == pytest.approx(0.55)  # half-way down the cosine
    assert lr_schedule(110, **kw) == pytest.approx(0.1)
    assert lr_schedule(500, **kw) == pytest.approx(0.1)
    vals = [lr_schedule(s, **kw) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(vals, vals[1:]))
    # V4 style: hold the peak, then decay over the tail
    assert lr_schedule(50, decay_start=50, **kw) == pytest.approx(1.0)
    assert lr_schedule(80, decay_start=50, **kw) == pytest.approx(0.55)
    assert lr_schedule(0, warmup=0, total=100, peak=2.0, final=0.0) == pytest.approx(2.0)
