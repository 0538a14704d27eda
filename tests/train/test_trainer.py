"""The training loop: losses, balancing, exact resume, checkpoints the engine can load."""

from __future__ import annotations

import json
import os

import pytest
import torch

import sparseek
from sparseek.model.common import Gate
from sparseek.train.trainer import TrainConfig, Trainer, balance_loss, max_violation, update_bias





def _cfg(tmp, corpus, **kw):
    base = dict(preset="debug", data=[corpus], out=str(tmp), seq_len=64, batch_size=4, max_steps=6, warmup=2,
                lr=3e-3, eval_every=3, eval_batches=2, ckpt_every=3, log_load_every=1, val_fraction=0.1,
                samples=["def "])
    base.update(kw)
    return TrainConfig(**base)


def test_resume_equals_uninterrupted(tmp_path, corpus):
    full = Trainer(_cfg(tmp_path / "a", corpus))
    full.fit(progress=False)
    ref = [json.loads(l) for l in open(full.log_path)]

    half = Trainer(_cfg(tmp_path / "b", corpus, max_steps=6))
    for _ in range(3):
        half._log(half.train_step())
    half.save()
    del half
    resumed = Trainer(_cfg(tmp_path / "b", corpus, resume=True))
    assert resumed.step == 3
    resumed.fit(progress=False)
    got = [json.loads(l) for l in open(resumed.log_path)]
    assert [r["step"] for r in got] == [r["step"] for r in ref]
    for a, b in zip(ref, got):
        assert a["loss"] == b["loss"] and a["max_vio"] == b["max_vio"], (a["step"], a["loss"], b["loss"])


def test_log_and_checkpoint(tmp_path, corpus):
    t = Trainer(_cfg(tmp_path, corpus))
    result = t.fit(progress=False)
    recs = [json.loads(l) for l in open(t.log_path)]
    for key in ("step", "loss", "mtp_loss", "aux_loss", "lr", "tokens_per_s", "max_vio", "mfu", "expert_load"):
        assert key in recs[-1], key
    assert 0.05 < recs[-1]["mem_gb"] < 64  # this process's resident high-water mark on a CPU
    assert recs[-1]["loss"] < recs[0]["loss"]
    assert "val_ppl" in recs[-1] and "unigram_ppl" in recs[-1]
    # keep-last-N, atomic latest pointer, and a checkpoint the engine loads
    steps = sorted(d for d in os.listdir(tmp_path) if d.startswith("step-"))
    assert steps == ["step-000003", "step-000006"] and open(tmp_path / "latest").read().strip() == "step-000006"
    model, tok = sparseek.load(result["checkpoint"], dtype=torch.float32)
    ids = torch.tensor([tok.encode("def add(a, b):", add_bos=True)])
    with torch.no_grad():
        assert torch.allclose(model(ids), t.model.eval()(ids), atol=1e-5)
    assert not any(f.endswith((".pt", ".bin", ".pkl")) for f in os.listdir(result["checkpoint"]))


def test_bias_update_moves_load_toward_uniform():
    """A router whose scores favour a few experts: the aux-loss-free bias update fixes the load."""
    args = sparseek.preset("debug")
    g = Gate(args)
    torch.manual_seed(0)
    with torch.no_grad():
        g.weight.normal_()
        g.weight[:2] += 2.0  # experts 0 and 1 win almost every token
    x = torch.randn(2048, args.hidden_size) + 0.5
    vios = []
    for _ in range(300):
        _, idx, _ = g(x)
        load = torch.bincount(idx.flatten(), minlength=g.n_experts).float()
        vios.append(max_violation(load))
        update_bias([type("M", (), {"gate": g})()], [load], speed=0.01)
    assert vios[0] > 1.5 and vios[-1] < 0.3 * vios[0]


def test_balance_loss_by_hand():
    idx = torch.tensor([[[0, 1], [0, 2]]])  # one sequence, two tokens, top-2 of 4 experts
    scores = torch.tensor([[[1.0, 1.0, 1.0, 1.0], [3.0, 0.0, 1.0, 0.0]]])
    # f_i = E / (K T) * count_i = 4/4 * [2, 1, 1, 0];  P_i = mean_t s_ti / sum_j s_tj = [(.25+.75)/2, .125, .25, .125]
    expected = 2 * 0.5 + 1 * 0.125 + 1 * 0.25 + 0
    assert abs(float(balance_loss(idx, scores, 4, per_sequence=True)) - expected) < 1e-6


def test_balance_modes_run(tmp_path, corpus):
    for mode in ("aux_loss", "none"):
        t = Trainer(_cfg(tmp_path / mode, corpus, balance=mode, max_steps=2, eval_every=0, ckpt_every=0))
        bias0 = [m.gate.bias.clone() for m in t.moes if m.gate.bias is not None]
        rec = t.train_step()
        bias1 = [m.gate.bias for m in t.moes if m.gate.bias is not None]
        assert all(torch.equal(a, b) for a, b in zip(bias0, bias1))  # only aux_free moves the bias
        assert (rec["aux_loss"] > 0) == (mode == "aux_loss")


def test_indexer_loss_trains_the_indexers(tmp_path, corpus):
    """--indexer-loss: the step logs the indexers' KL loss and moves their weights (without it they
    get no gradient at all), while the logged main loss is the same as without it."""
    runs = {}
    for on in (False, True):
        t = Trainer(_cfg(tmp_path / str(on), corpus, indexer_loss=on, max_steps=2, eval_every=0, ckpt_every=0))
        assert t.indexed  # the debug preset has CSA layers
        w0 = [p.clone() for a in t.indexed for p in a.indexer.parameters()]
        rec = t.train_step()
        moved = any(not torch.equal(p, q) for p, q in zip(w0, (p for a in t.indexed for p in a.indexer.parameters())))
        runs[on] = rec
        assert moved == on
        assert (rec["indexer_loss"] is not None and rec["indexer_loss"] > 0) == on
        assert all(a.indexer_loss is None and not a.learn_indexer for a in t.indexed)
    assert runs[True]["loss"] == runs[False]["loss"]


def test_indexer_loss_leaves_the_model_update_alone(tmp_path, corpus):
    """The indexers' gradients are clipped on their own: with a clip that binds, one step moves
    every other parameter exactly as the same step without the indexer loss."""
    weights = {}
    for on in (False, True):
        t = Trainer(_cfg(tmp_path / str(on), corpus, indexer_loss=on, grad_clip=0.05, max_steps=2, eval_every=0,
                         ckpt_every=0))
        indexer = {id(p) for a in t.indexed for p in a.indexer.parameters()}
        t.train_step()
        weights[on] = [p.detach().clone() for p in t.model.parameters() if id(p) not in indexer]
    assert all(torch.equal(a, b) for a, b in zip(weights[False], weights[True]))


def test_indexer_warmup_attends_every_entry(tmp_path, corpus):
    """--indexer-warmup N: the first N steps attend to every visible compressed entry (the same
    step as a model whose top-k covers them all), later steps to the indexer's picks."""
    def first_steps(name, **kw):
        t = Trainer(_cfg(tmp_path / name, corpus, indexer_loss=True, max_steps=3, eval_every=0, ckpt_every=0, **kw))
        recs = [t.train_step() for _ in range(2)]
        assert not any(a.attend_all for a in t.indexed)
        return recs

    warm = first_steps("warm", indexer_warmup=1)
    dense = first_steps("dense", overrides={"index_topk": 1 << 20})
    sparse = first_steps("sparse")
    assert warm[0]["loss"] == dense[0]["loss"] != sparse[0]["loss"]
    assert warm[0]["indexer_loss"] == dense[0]["indexer_loss"]
    assert warm[1]["loss"] != dense[1]["loss"]
    with pytest.raises(ValueError, match="indexer_loss"):
        Trainer(_cfg(tmp_path / "bad", corpus, indexer_loss=False, indexer_warmup=2))


def test_activation_checkpointing_keeps_the_losses(tmp_path, corpus):
    """Blocks recomputed in backward (the indexer's KL and the balance loss are computed inside
    them): the same losses, indexer losses and updated weights as storing the activations."""
    runs = {}
    for ckpt in (False, True):
        t = Trainer(_cfg(tmp_path / str(ckpt), corpus, activation_checkpointing=ckpt, max_steps=3, eval_every=0,
                         ckpt_every=0))
        recs = [t.train_step() for _ in range(2)]
        runs[ckpt] = recs, [p.detach().clone() for p in t.model.parameters()]
    for a, b in zip(runs[False][0], runs[True][0]):
        assert a["indexer_loss"] > 0
        for k in ("loss", "mtp_loss", "aux_loss", "indexer_loss"):
            assert abs(a[k] - b[k]) <= 1e-5 * abs(a[k]), k
    assert all(torch.allclose(p, q, atol=1e-5) for p, q in zip(runs[False][1], runs[True][1]))


def test_v3_trains_its_mtp_layer(tmp_path, corpus):
    """A V3-layout model trains its MTP layer (the one DeepSeek-V3 / R1 ship) with the MTP loss."""
    t = Trainer(_cfg(tmp_path, corpus, preset="debug-v3", max_steps=3, eval_every=0, ckpt_every=0))
    before = {k: v.detach().clone() for k, v in t.model.named_parameters() if k.startswith("mtp.")}
    t.fit(progress=False)
    recs = [json.loads(l) for l in open(t.log_path)]
    assert all(r["mtp_loss"] > 0 for r in recs if "mtp_loss" in r) and "mtp_loss" in recs[-1]
    moved = [k for k, v in t.model.named_parameters() if k in before and not torch.equal(v, before[k])]
    assert "mtp.0.eh_proj.weight" in moved and "mtp.0.attn.wkv_b.weight" in moved
