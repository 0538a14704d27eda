"""DeepSeek's FP8 activation rounding before its FP8 / FP4 GEMMs (``act_fp8``): the rounding
against a brute-force reference, every routed-expert path against a hand-written MoE, the whole
model against the plain model with the rounding hooked onto exactly the linears DeepSeek's
checkpoints store quantized, and the engine's invariants with it on."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

import sparseek
from sparseek.model import build_model
from sparseek.model import common
from sparseek.model.common import MoE
from sparseek.model.qat import fp8_act_round
from sparseek.quant.modules import QuantExperts, quantizable
from tests.conftest import randomize_, rel_err

# every finite e4m3 value, by code 0..126 (increasing; 127 is NaN)
_GRID = torch.arange(127, dtype=torch.uint8).view(torch.float8_e4m3fn).double()


def _brute(x: torch.Tensor, block: int, pow2: bool) -> torch.Tensor:
    """Element by element, in fp32 as the kernel computes: the block's scale (amax floored at 1e-4,
    / 448, with ``pow2`` the smallest power of two at least that), then the nearest e4m3 value to
    x / scale (clamped to 448), ties to the even code, times the scale."""
    out = torch.empty_like(x, dtype=torch.float32)
    f32 = lambda v: torch.tensor(v, dtype=torch.float32)  # noqa: E731
    for r in range(x.shape[0]):
        for b0 in range(0, x.shape[1], block):
            row = x[r, b0:b0 + block].float()
            s = f32(max(float(row.abs().max()), 1e-4)) / 448
            if pow2:
                e = -140
                while 2.0 ** e < float(s):
                    e += 1
                s = f32(2.0 ** e)
            for j, v in enumerate(row.tolist()):
                q = min(abs(float(f32(v) / s)), 448.0)
                d = (_GRID - q).abs()
                best = d.min()
                code = min(k for k in range(127) if d[k] == best and (k % 2 == 0 or (d == best).sum() == 1))
                out[r, b0 + j] = f32(float(_GRID[code]) if v >= 0 else -float(_GRID[code])) * s
    return out


@pytest.mark.parametrize("fmt", ["e8m0", "f32"])
def test_rounding_matches_the_brute_force_reference(fmt):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 200, generator=g) * torch.logspace(-6, 3, 5)[:, None]  # 200: a block of 128 + one of 72
    x[0, 0] = 448.0  # scale 1 in this block (e8m0): exact midpoints between e4m3 values go to the even code
    x[0, 1:6] = torch.tensor([17.0, 19.0, -2.0625, 0.5 + 2 ** -5, 208.0])
    got = fp8_act_round(x, fmt)
    assert torch.equal(got, _brute(x, 128, fmt == "e8m0"))
    if fmt == "e8m0":  # ties: 17 between 16 and 18 -> 16 (even mantissa), 19 -> 20, 208 -> 208
        assert got[0, 1:6].tolist() == [16.0, 20.0, -2.0, 0.5, 208.0]
        assert torch.equal(fp8_act_round(got, fmt), got)  # power-of-two scales: rounding twice changes nothing
    xb = x.to(torch.bfloat16)
    assert fp8_act_round(xb, fmt).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="scale format"):
        fp8_act_round(x, "ue8m0")


def test_e4m3_rounding_in_float_equals_the_cast():
    """The compiler-friendly rounding (bit operations, no FP8 tensor) against torch's own e4m3 cast,
    over the whole range, the subnormals and every midpoint between neighbouring values (ties)."""
    from sparseek.model.qat import e4m3_round

    grid = _GRID.float()
    mid = (grid[1:] + grid[:-1]) / 2
    q = torch.cat([torch.linspace(-448, 448, 400001), torch.linspace(-2 ** -5, 2 ** -5, 100001), mid, -mid,
                   mid + 2 ** -20, mid - 2 ** -20])
    assert torch.equal(e4m3_round(q), q.to(torch.float8_e4m3fn).float())


def test_rounding_passes_gradients_straight_through():
    x = torch.randn(3, 256, requires_grad=True)
    y = fp8_act_round(x)
    assert not torch.equal(y, x)
    y.pow(2).sum().backward()
    assert torch.allclose(x.grad, 2 * y.detach())


def test_scale_format_follows_the_checkpoint():
    assert sparseek.preset("debug").act_scale_fmt is None
    assert sparseek.preset("debug", act_fp8=True).act_scale_fmt == "e8m0"
    v3 = sparseek.preset("debug-v3", act_fp8=True)
    assert v3.act_scale_fmt == "f32"  # V3 / R1: no scale_fmt in quantization_config
    v31 = dataclasses.replace(v3, extra={**v3.extra, "quantization_config": {"quant_method": "fp8",
                                                                             "scale_fmt": "ue8m0"}})
    assert v31.act_scale_fmt == "e8m0"
    assert "act_fp8" not in sparseek.preset("debug").to_dict()  # written back only when on
    assert sparseek.preset("debug", act_fp8=True).to_dict()["act_fp8"] is True


def _moe(seed=0, **kw):
    args = sparseek.preset("debug", act_fp8=True, **kw)
    m = MoE(args, hash_routed=False)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * p.shape[-1] ** -0.5)
    return m.eval()


def _reference(m: MoE, x: torch.Tensor) -> torch.Tensor:
    """The MoE by hand, each GEMM's input rounded once: x for w1 / w3, the routing-weighted SwiGLU
    for w2, per token and expert; the shared expert likewise."""
    r = lambda t: fp8_act_round(t, "e8m0")  # noqa: E731
    w, idx, _ = m.gate(x)
    ex, out = m.experts, torch.zeros_like(x)
    w1, w2, w3 = (getattr(ex, n).detach() if not isinstance(ex, QuantExperts) else ex.decoded(n, x.dtype)
                  for n in ("w1", "w2", "w3"))
    lim = ex.limit
    for t in range(x.shape[0]):
        xr = r(x[t])
        for j in range(idx.shape[1]):
            e = idx[t, j]
            h = torch.nn.functional.silu((w1[e] @ xr).clamp(max=lim)) * (w3[e] @ xr).clamp(-lim, lim) * w[t, j]
            out[t] += w2[e] @ r(h)
    s = m.shared_experts
    xr = r(x)
    h = torch.nn.functional.silu(s.w1(xr)) * s.w3(xr)
    return out + s.w2(r(h))


@pytest.mark.parametrize("path", ["batched-op", "batched-op-transposed", "grouped", "grouped-padded", "loop",
                                  "static", "quantized"])
def test_every_expert_path_rounds_as_the_reference(path, monkeypatch):
    m = _moe()
    x = torch.randn(24, m.gate.weight.shape[1], generator=torch.Generator().manual_seed(1))
    static = path == "static"
    if path == "batched-op-transposed":  # the op's W @ x^T form, its blocks along dim 1
        monkeypatch.setattr(common, "_x_first", lambda L: False)
        monkeypatch.setattr(common, "batched_rows", lambda counts: max(counts))
    elif path == "grouped":
        monkeypatch.setattr(common, "CPU_BATCHED_EXPERTS", False)
    elif path == "grouped-padded":
        real = common.grouped_ffn
        monkeypatch.setattr(common, "grouped_ffn", lambda *a, **k: real(*a, **{**k, "pad": True}))
    elif path == "loop":
        m.experts.grouped = False
    elif path == "quantized":
        m.experts = QuantExperts.from_experts(m.experts, "fp8")
    with torch.no_grad():
        got, want = m(x[None], static=static)[0], _reference(m, x)
        off = m.experts.act_fp8
        m.experts.act_fp8 = m.shared_experts.act_fp8 = None
        plain = m(x[None], static=static)[0]
        m.experts.act_fp8 = m.shared_experts.act_fp8 = off
    assert rel_err(got, want) < 1e-5
    assert rel_err(plain, want) > 1e-3  # the rounding is there to be found


def _rounding_hooks(model):
    """Round the input of every linear layer DeepSeek's checkpoints store quantized except those its
    runtime runs without FP8 activations (V4's wo_a, dequantized by its conversion; V3's absorbed
    wkv_b); the routed experts' products by patching their per-expert projection (the loop path)."""
    fmt = "e8m0" if model.args.is_v4 else "f32"
    hooks = []
    for name, mod in model.named_modules():
        if quantizable(name, mod) and name.rsplit(".", 1)[-1] not in ("wo_a", "wkv_b"):
            hooks.append(mod.register_forward_pre_hook(lambda _m, a: (fp8_act_round(a[0], fmt),)))
        if isinstance(mod, common.Experts):
            mod.grouped = False
            plain = mod.proj
            mod.proj = lambda x, e, n, plain=plain: plain(fp8_act_round(x, fmt), e, n)
    return hooks


@pytest.mark.parametrize("preset", ["debug", "debug-v3"])
def test_model_rounds_exactly_the_quantized_linears(preset):
    on = randomize_(build_model(sparseek.preset(preset, act_fp8=True)), 3).eval()
    ref = build_model(sparseek.preset(preset)).eval()
    ref.load_state_dict(on.state_dict())
    ids = torch.randint(0, on.args.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        plain = ref(ids)
        _rounding_hooks(ref)
        want, got = ref(ids), on(ids)
    err = (got - want).abs().amax(-1) / want.abs().amax(-1)
    # FP8 rounding is discontinuous: summation-order differences between the two expert paths now
    # and then move a value by one FP8 step; exact almost everywhere
    assert err.median() < 1e-5 and err.max() < 2 ** -4
    assert rel_err(plain, want) > 1e-3


def test_mtp_block_rounds_its_projections():
    on = randomize_(build_model(sparseek.preset("debug", act_fp8=True)), 3).eval()
    ref = build_model(sparseek.preset("debug")).eval()
    ref.load_state_dict(on.state_dict())
    ids = torch.randint(0, on.args.vocab_size, (1, 25), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        _rounding_hooks(ref)
        _, hidden = on(ids[:, :-1], return_hidden=True)  # the same streams into both MTP blocks
        got, want = on.forward_mtp(hidden, ids[:, 1:]), ref.forward_mtp(hidden, ids[:, 1:])
    err = (got - want).abs().amax(-1) / want.abs().amax(-1)
    assert err.median() < 1e-5 and err.max() < 2 ** -4


@pytest.mark.parametrize("preset", ["debug", "debug-v3"])
def test_cached_decode_follows_the_full_forward(preset):
    m = randomize_(build_model(sparseek.preset(preset, act_fp8=True)), 5).eval()
    T = 120
    ids = torch.randint(0, m.args.vocab_size, (2, T), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = m(ids)
        c = m.new_cache(2, T + 8)
        got = torch.cat([m(ids[:, :33], c)] + [m(ids[:, t:t + 1], c) for t in range(33, T)], 1)
    err = (got - full).abs().amax(-1) / full.abs().amax(-1)
    # exact to fp32 summation order almost everywhere (a path that missed a rounding would be off by
    # ~1e-2 at every decoded position); where last-bit differences between the chunk and the decode
    # kernels move a rounded value by one FP8 step, every later GEMM of the random model carries it
    assert err.median() < 1e-5 and (err > 1e-3).float().mean() < 0.1 and err.max() < 0.5


def test_engine_and_load_take_the_switch(tmp_path):
    from sparseek.engine import LLM, SamplingParams

    m = build_model(sparseek.preset("debug", act_fp8=True))
    sparseek.save(m, tmp_path)
    loaded, _ = sparseek.load(str(tmp_path), dtype=torch.float32, tokenizer=False)
    assert loaded.args.act_fp8 and loaded.layers[0].ffn.experts.act_fp8 == "e8m0"
    llm = LLM(str(tmp_path), dtype="float32", max_batch_size=2, max_seq_len=128)
    sp = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8]]
    both = [o.token_ids for o in llm.generate(prompts, sp)]
    alone = [LLM(str(tmp_path), dtype="float32", max_batch_size=1, max_seq_len=128, prefix_cache_bytes=0)
             .generate([p], sp)[0].token_ids for p in prompts]
    assert both == alone
    plain = LLM("debug", act_fp8=False)
    assert plain.args.act_fp8 is False
    with pytest.raises(ValueError, match="act_fp8"):
        LLM(build_model(sparseek.preset("debug")).eval(), tokenizer=None, act_fp8=True)


def test_training_through_the_rounding(tmp_path, corpus):
    """Quantization-aware training: the rounding passes gradients straight through, so every weight
    that learns without it learns with it, in a similar direction; the trainer takes the
    switch as a model override (``sparseek train --set act_fp8=true``)."""
    on = randomize_(build_model(sparseek.preset("debug", act_fp8=True)), 3)
    off = build_model(sparseek.preset("debug"))
    off.load_state_dict(on.state_dict())
    ids = torch.randint(0, on.args.vocab_size, (2, 48), generator=torch.Generator().manual_seed(0))
    grads = []
    for m in (on, off):
        logits = m(ids[:, :-1])
        torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten()).backward()
        grads.append({n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    g_on, g_off = (torch.cat([g[n].flatten() for n in sorted(g)]) for g in grads)
    assert torch.isfinite(g_on).all() and not torch.equal(g_on, g_off)
    # the same descent direction, moved by the rounded forward (this random model: cosine ~0.83)
    assert torch.nn.functional.cosine_similarity(g_on, g_off, dim=0) > 0.6
    from sparseek.train.trainer import TrainConfig, Trainer

    cfg = TrainConfig(preset="debug", data=[corpus], out=str(tmp_path / "run"), seq_len=64, batch_size=2,
                      max_steps=2, warmup=1, eval_every=0, samples=[], val_fraction=0.1,
                      overrides={"act_fp8": True})
    trainer = Trainer(cfg)
    assert trainer.model.layers[0].ffn.experts.act_fp8 == "e8m0"
    losses = [trainer.train_step()["loss"] for _ in range(2)]
    assert all(math.isfinite(x) for x in losses)


def test_switching_a_built_model_and_the_quantize_report(tmp_path):
    from sparseek.model.qat import set_act_fp8_
    from sparseek.quant.convert import quantize_checkpoint

    on = randomize_(build_model(sparseek.preset("debug", act_fp8=True)), 3).eval()
    off = build_model(sparseek.preset("debug")).eval()
    off.load_state_dict(on.state_dict())
    ids = torch.randint(0, on.args.vocab_size, (1, 30), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, plain = on(ids), off(ids)
        assert torch.equal(set_act_fp8_(off, "e8m0")(ids), want)
        assert torch.equal(set_act_fp8_(off, None)(ids), plain)
    with pytest.raises(ValueError, match="scale format"):
        set_act_fp8_(off, "fp8")
    src = tmp_path / "src"
    sparseek.save(off, src)
    reports = [quantize_checkpoint(str(src), str(tmp_path / f"q{act}"), windows=1, seq_len=32, act_fp8=act)["report"]
               for act in (False, True)]
    assert reports[0]["act_fp8"] is None and reports[1]["act_fp8"] == "e8m0"
    assert reports[1]["kl_mean"] != reports[0]["kl_mean"]
    # the rounding was measured, not written: both checkpoints are the same, without the switch
    assert (tmp_path / "qTrue" / "model.safetensors").read_bytes() == \
        (tmp_path / "qFalse" / "model.safetensors").read_bytes()
    assert "act_fp8" not in (tmp_path / "qTrue" / "config.json").read_text()


@pytest.mark.slow  # ~4 min of compiling
def test_compiled_decode_rounds_as_eager():
    from sparseek.engine import LLM, SamplingParams

    torch._dynamo.reset()
    sp = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    prompts = [[1, 2, 3, 4], [5, 6, 7, 8, 9, 10, 11]]
    runs = [[o.token_ids for o in LLM("debug", max_batch_size=2, max_seq_len=128, **kw).generate(prompts, sp)]
            for kw in ({"act_fp8": True}, {"act_fp8": True, "compile": True}, {})]
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]  # the rounding changes this random model's greedy tokens
