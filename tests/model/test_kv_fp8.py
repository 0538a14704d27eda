"""FP8 KV (DeepSeek's runtime format): the model rounds the non-rope dims of cached entries to FP8
e4m3 in 64-blocks with power-of-two scales, and the cache stores them as FP8 bytes, losslessly."""

from __future__ import annotations

import pytest
import torch

import sparseek
from sparseek.model import build_model
from sparseek.model.cache import FP8KV, Cache, cache_bytes, fp8_round
from tests.conftest import randomize_, rel_err

T = 300


def _args(**kw):
    # head_dim 72 = 64 FP8 dims (one block) + 8 rope dims
    return sparseek.preset("debug", head_dim=72, **kw)


@pytest.fixture(scope="module")
def model():
    return randomize_(build_model(_args(kv_fp8=True)), 3).eval()


@pytest.fixture(scope="module")
def ids(model):
    return torch.randint(0, model.args.vocab_size, (2, T), generator=torch.Generator().manual_seed(4))


def test_fp8_round_by_hand():
    x = torch.zeros(1, 64 + 2)
    x[0, 0], x[0, 1], x[0, 2] = 1.0, 0.3, -0.01
    x[0, 64:] = torch.tensor([0.123456, 7.654321])  # rope dims pass unchanged
    y = fp8_round(x, 64)
    # amax 1.0 -> scale 2^ceil(log2(1/448)) = 2^-8; 0.3 * 256 = 76.8 -> nearest e4m3 is 80 (step 8 in
    # [64, 128)); -0.01 * 256 = -2.56 -> -2.5 (step 0.25 in [2, 4))
    assert y[0, 0] == 1.0 and y[0, 1] == 80 / 256 and y[0, 2] == -2.5 / 256
    assert torch.equal(y[0, 64:], x[0, 64:])
    big = torch.full((1, 64), 1000.0)  # scale 2^ceil(log2(1000/448)) = 4: 1000 / 4 = 250 -> 256
    assert fp8_round(big, 64)[0, 0] == 1024.0


def test_codec_is_lossless_on_rounded_values_and_packs_tight():
    codec = FP8KV(dim=512, rope_dim=64, dtype=torch.bfloat16)
    assert codec.width == 64 * 2 + 448 + 7  # 583 bytes per V4 entry instead of 1,024
    x = fp8_round((torch.randn(3, 5, 512) * torch.logspace(-3, 3, 5)[:, None]).to(torch.bfloat16), 448)
    packed = codec.encode(x)
    assert packed.dtype == torch.uint8 and packed.shape == (3, 5, 583)
    assert torch.equal(codec.decode(packed), x)
    assert torch.equal(codec.decode(packed[:, 2:4]), x[:, 2:4])  # rows and slices decode on their own
    with pytest.raises(ValueError, match="blocks of 64"):
        FP8KV(dim=80, rope_dim=8, dtype=torch.float32)


def test_fp8_storage_equals_rounded_values_in_full_precision(model, ids):
    """Same model, same path: an FP8-packed cache gives bit-identical logits to one that keeps the
    rounded values in fp32 -- the storage loses nothing."""
    outs = []
    with torch.no_grad():
        for fp8 in (True, False):
            c = model.new_cache(2, T + 8, fp8_storage=fp8)
            steps = [model(ids[:, :37], c)] + [model(ids[:, t:t + 1], c) for t in range(37, 150)]
            steps += [model(ids[:, 150:T], c)]
            outs.append(torch.cat(steps, 1))
            if fp8:
                assert c.layers[1].window.dtype == torch.uint8 and c.layers[1].comp.dtype == torch.uint8
    assert torch.equal(outs[0], outs[1])


def _init_model(**kw):
    # trained-like scale (std 0.02): the randomized test weights make every FP8 step chaotic
    m = build_model(_args(**kw)).eval()
    m.init_weights(seed=3)
    return m


def test_fp8_cache_decode_follows_the_full_forward(model, ids):
    """Chunked prefill + decode against the one-shot forward. FP8 rounding is discontinuous, so the
    last-bit differences between the two paths now and then move an entry by one FP8 step: the
    agreement is exact almost everywhere and to FP8 accuracy at worst."""
    m = _init_model(kv_fp8=True)
    with torch.no_grad():
        full = m(ids)
        c = m.new_cache(2, T + 8)
        got = torch.cat([m(ids[:, :37], c)] + [m(ids[:, t:t + 1], c) for t in range(37, T)], 1)
        static = model.new_cache(2, T + 8)  # the compile-friendly step reads and writes packed entries too
        eager = model.new_cache(2, T + 8)
        model(ids[:, :37], static)
        model(ids[:, :37], eager)
        for t in range(37, 80):  # the two steps run the experts through different kernels (gathered
            # GEMVs vs a batched GEMM): equal to fp32 summation order, as in tests/engine/test_compile.py
            assert rel_err(model.decode_step(ids[:, t:t + 1], static), model(ids[:, t:t + 1], eager)[:, -1]) < 1e-4
    err = (got - full).abs().amax(-1) / full.abs().amax(-1)
    # a moved entry stays in the cache, so its (chaotic) effect reaches later positions too: the
    # bound is the share of positions off by more than 1e-3 and one e4m3 step (2^-3) at worst
    assert err.median() < 1e-5 and (err > 1e-3).float().mean() < 0.1 and err.max() < 2 ** -3


def test_rounding_is_a_switch_that_matters(ids):
    on, off = _init_model(kv_fp8=True), _init_model()
    with torch.no_grad():
        a, b = on(ids[:, :200]), off(ids[:, :200])
    err = (a - b).abs().amax(-1) / b.abs().amax(-1)
    assert 1e-3 < err.median() < 0.2  # FP8-sized differences, not a different model
    with pytest.raises(ValueError, match="kv_fp8"):
        off.new_cache(1, 16, fp8_storage=True)


@pytest.mark.parametrize("name", ["v4-flash", "v4-pro"])
def test_fp8_cache_size_equals_analytic(name):
    a = sparseek.preset(name, kv_fp8=True)
    n = 1 << 20
    with torch.device("meta"):
        c = Cache(a, batch_size=1, max_seq_len=n, device="meta", dtype=torch.bfloat16)
    got = cache_bytes(a, n)
    assert c.nbytes() == pytest.approx(got["total_bytes"], rel=1e-9)
    # a CSA layer: a 583-byte entry + a 128-d bf16 indexer key per 4 tokens; HCA: 583 B per 128
    csa, hca = (got["per_layer_type"][k] for k in ("csa", "hca"))
    assert csa["bytes_per_token"] == csa["layers"] * (583 + 256) / 4
    assert hca["bytes_per_token"] == hca["layers"] * 583 / 128
    bf16 = cache_bytes(sparseek.preset(name), n)
    assert got["bytes_per_token"] < 0.7 * bf16["bytes_per_token"]


def test_kv_fp8_round_trips_through_config_json(tmp_path):
    m = build_model(_args(kv_fp8=True))
    sparseek.save(m, tmp_path)
    loaded, _ = sparseek.load(str(tmp_path), dtype=torch.float32, tokenizer=False)
    assert loaded.args.kv_fp8 and loaded.layers[0].attn.fp8_dims == 64
    assert "kv_fp8" not in build_model(_args()).args.to_dict()  # written only when switched on


def test_kv_fp8_from_load_llm_and_clear_errors():
    m, _ = sparseek.load("debug", tokenizer=False, head_dim=72, kv_fp8=True)
    assert m.new_cache(1, 32).layers[0].window.dtype == torch.uint8
    with pytest.raises(sparseek.ConfigError, match="kv_fp8"):
        sparseek.preset("debug", head_dim=80, kv_fp8=True)  # 72 non-rope dims: not whole 64-blocks
    with pytest.raises(sparseek.ConfigError, match="kv_fp8"):
        sparseek.preset("debug-v3", kv_fp8=True)
    with pytest.raises(sparseek.ConfigError, match="kv_fpp8"):
        sparseek.preset("debug").replace(kv_fpp8=True)
    from sparseek.engine import LLM, SamplingParams

    # heads narrower than a block (the small presets: 32 non-rope dims) take one scale per head
    assert FP8KV(64, 32, torch.float32).width == 32 * 4 + 32 + 1
    assert sparseek.preset("small", kv_fp8=True).kv_fp8
    llm = LLM(build_model(_args(kv_fp8=True)).eval(), tokenizer=None, max_batch_size=2, max_seq_len=128)
    out = llm.generate([[1, 2, 3], [4, 5, 6, 7]], SamplingParams(max_tokens=5, temperature=0, ignore_eos=True))
    assert [len(o.token_ids) for o in out] == [5, 5]
    assert llm._cache.layers[0].window.dtype == torch.uint8
    with pytest.raises(ValueError, match="kv_fp8"):
        LLM(build_model(_args()).eval(), tokenizer=None, kv_fp8=True)  # a built model cannot switch
