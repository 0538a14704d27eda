"""The FP4 lightning indexer of DeepSeek's runtime (``index_fp4``): the Hadamard rotation and the
FP4 round trip against brute-force references, and the model with it on (picks only: with every
entry picked it computes what the plain indexer computes; cached decode follows the full forward)."""

from __future__ import annotations


import pytest
import torch

import sparseek
from sparseek.config import ConfigError
from sparseek.model import build_model
from sparseek.model.cache import Cache, cache_bytes
from sparseek.model.qat import FP4Keys, fp4_round, hadamard

GRID = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]


def _sylvester(d: int) -> torch.Tensor:
    H = torch.ones(1, 1, dtype=torch.float64)
    while H.shape[0] < d:
        H = torch.cat([torch.cat([H, H], 1), torch.cat([H, -H], 1)], 0)
    return H


def _fp4_brute(x: torch.Tensor, block: int) -> torch.Tensor:
    """Element by element: the block's scale as the smallest power of two 2^e with amax / 2^e <= 6,
    then the nearest grid value, ties to the even code."""
    out = torch.empty_like(x, dtype=torch.float64)
    flat, res = x.double().reshape(-1, block), out.view(-1, block)
    for r, row in enumerate(flat):
        amax = max(float(row.abs().max()), 6 * 2.0 ** -126)
        e = -130
        while amax / 2.0 ** e > 6:
            e += 1
        for j, v in enumerate(row.tolist()):
            q = min(abs(v) / 2.0 ** e, 6.0)
            code = min(range(8), key=lambda k: (abs(q - GRID[k]), k % 2))
            res[r, j] = (GRID[code] if v >= 0 else -GRID[code]) * 2.0 ** e
    return out


def test_hadamard_is_the_normalized_sylvester_transform():
    x = torch.randn(3, 5, 128, dtype=torch.float64)
    assert torch.allclose(hadamard(x), x @ _sylvester(128) / 128 ** 0.5, atol=1e-12)
    assert torch.allclose(hadamard(hadamard(x)), x, atol=1e-12)  # orthonormal and symmetric
    y = torch.randn(3, 5, 128, dtype=torch.float64)
    assert torch.allclose((hadamard(x) * hadamard(y)).sum(-1), (x * y).sum(-1), atol=1e-10)
    with pytest.raises(ValueError, match="power-of-two"):
        hadamard(torch.zeros(96))


def test_fp4_round_matches_the_brute_force_rounding():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 64, generator=g) * torch.logspace(-3, 3, 6)[:, None]
    # exact midpoints between grid values (at scale 1: amax 6 in each block) must go to the even code
    ties = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -0.25, -0.75, -1.75, -2.5, -5.0])
    x[0, :12] = ties
    x[0, 12] = 6.0
    x[1, :32] = 0.0  # an all-zero block stays zero
    assert torch.equal(fp4_round(x).double(), _fp4_brute(x, 32))
    assert fp4_round(x)[0, :12].tolist() == [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, -0.0, -1.0, -2.0, -2.0, -4.0]
    # a block whose amax is just above 6 takes the next scale (2): 6.0001 -> 6, 0.75 -> 1 (at 0.375 x 2)
    assert fp4_round(torch.tensor([[6.0001, 0.75] + [0.0] * 30]))[0, :2].tolist() == [6.0, 1.0]
    assert torch.equal(fp4_round(fp4_round(x)), fp4_round(x))  # idempotent: values on the grid stay
    b = x.to(torch.bfloat16)
    assert fp4_round(b).dtype == torch.bfloat16 and torch.equal(fp4_round(b).double(), _fp4_brute(b.float(), 32))
    assert torch.equal(fp4_round(x[:, :16]).double(), _fp4_brute(x[:, :16], 16))  # a 16-dim head: one block
    w = x.clone().requires_grad_()
    fp4_round(w).sum().backward()  # quantization-aware training: the gradient passes straight through
    assert torch.equal(w.grad, torch.ones_like(x))


def _model(**kw):
    m = build_model(sparseek.preset("debug", index_fp4=True, **kw)).eval()
    m.init_weights(seed=5)
    return m


def test_fp4_indexer_only_changes_the_picks():
    """With index_topk >= every entry, all entries are picked either way: the logits equal the
    plain model's bit for bit. With a small top-k the picks come from FP4 scores: rounded keys are
    cached, and the logits move."""
    on = _model(index_topk=64)
    off = build_model(sparseek.preset("debug", index_topk=64)).eval()
    off.load_state_dict(on.state_dict())
    ids = torch.randint(0, on.args.vocab_size, (2, 200), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(on(ids), off(ids))
        small_on, small_off = _model(index_topk=3), build_model(sparseek.preset("debug", index_topk=3)).eval()
        small_off.load_state_dict(small_on.state_dict())
        cache = small_on.new_cache(2, 256)
        a = small_on(ids, cache)
        assert not torch.equal(a, small_off(ids))
        # the cache keeps the keys as FP4 bytes (9 per 16-dim key), which decode to the rounded keys
        layers = [lc for lc in cache.layers if lc.index_keys is not None]
        assert layers and all(lc.index_keys.dtype == torch.uint8 and lc.index_keys.shape[-1] == 9 for lc in layers)
        keys = [lc.key_codec.decode(lc.index_keys[:, :50], torch.float32) for lc in layers]  # 200 tokens' entries
        assert all(torch.equal(fp4_round(k), k) and k.abs().sum() > 0 for k in keys)
        # the bytes lose nothing: the same forward keeping the rounded keys in fp32 is bit-identical
        assert torch.equal(small_on(ids, small_on.new_cache(2, 256, fp4_storage=False)), a)
    with pytest.raises(ValueError, match="index_fp4"):
        small_off.new_cache(1, 16, fp4_storage=True)


def test_fp4_key_bytes_round_trip_exactly():
    for dim in (128, 16):
        x = fp4_round(torch.randn(4, 7, dim) * torch.logspace(-4, 4, 7)[:, None])
        x[0, 0] = 0.0
        codec = FP4Keys(dim)
        assert codec.width == dim // 2 + dim // min(32, dim)
        for dtype in (torch.float32, torch.bfloat16):
            packed = codec.encode(x.to(dtype))
            assert packed.dtype == torch.uint8 and torch.equal(codec.decode(packed, dtype), x.to(dtype))
            assert torch.equal(codec.decode(packed[:, 2:5], dtype), x[:, 2:5].to(dtype))


@pytest.mark.parametrize("name", ["v4-flash", "v4-pro"])
def test_production_cache_size_equals_analytic(name):
    """FP8 KV + FP4 indexer keys, DeepSeek's production layout: a CSA layer keeps a 583-byte entry
    and a 68-byte key per 4 tokens (the spec's ~576 + 68)."""
    a = sparseek.preset(name, kv_fp8=True, index_fp4=True)
    n = 1 << 20
    with torch.device("meta"):
        c = Cache(a, batch_size=1, max_seq_len=n, device="meta", dtype=torch.bfloat16)
    got = cache_bytes(a, n)
    assert c.nbytes() == pytest.approx(got["total_bytes"], rel=1e-9)
    csa = got["per_layer_type"]["csa"]
    assert csa["bytes_per_token"] == csa["layers"] * (583 + 68) / 4
    fp8_only = cache_bytes(sparseek.preset(name, kv_fp8=True), n)
    assert got["bytes_per_token"] < fp8_only["bytes_per_token"]


def test_fp4_indexer_cached_decode_follows_the_full_forward():
    """FP4 rounding is discontinuous: a last-bit difference between the cached and the one-shot
    paths may flip a rounding and so a pick now and then; the agreement is exact almost everywhere."""
    m = _model(index_topk=3)
    ids = torch.randint(0, m.args.vocab_size, (2, 110), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = m(ids)
        c = m.new_cache(2, 118)
        got = torch.cat([m(ids[:, :37], c)] + [m(ids[:, t:t + 1], c) for t in range(37, 110)], 1)
        static, eager = m.new_cache(2, 118), m.new_cache(2, 118)
        m(ids[:, :37], static)
        m(ids[:, :37], eager)
        for t in range(37, 45):
            step = m.decode_step(ids[:, t:t + 1], static)
            assert torch.allclose(step, m(ids[:, t:t + 1], eager)[:, -1], atol=1e-4, rtol=1e-4)
    err = (got - full).abs().amax(-1) / full.abs().amax(-1)
    assert err.median() < 1e-5 and (err > 1e-3).float().mean() < 0.1


@pytest.mark.parametrize("kw,words", [({"index_head_dim": 24}, "power-of-two"), ({}, "DeepSeek-V4's")])
def test_index_fp4_config_errors(kw, words):
    with pytest.raises(ConfigError, match=words):
        sparseek.preset("debug" if kw else "debug-v3", index_fp4=True, **kw)


def test_index_fp4_is_written_back_only_when_on():
    on, off = sparseek.preset("debug", index_fp4=True), sparseek.preset("debug")
    assert on.to_dict()["index_fp4"] is True and "index_fp4" not in off.to_dict()


def test_engine_runs_the_production_cache():
    """FP8 KV + FP4 keys through the engine: batched, prefix-cached and fixed-shape decoding give
    each prompt the tokens it gets alone."""
    from sparseek.engine import LLM, SamplingParams
    from sparseek.tokenizer import default_tokenizer

    m = _model(index_topk=3, kv_fp8=True)
    tok = default_tokenizer(512)
    prompts = [list(range(20, 90)), list(range(20, 60)) + [7] * 9, [5, 6, 7]]
    sp = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    alone = [LLM(m, tok, max_batch_size=1, max_seq_len=128, prefix_cache_bytes=0).generate([p], sp)[0].token_ids
             for p in prompts]
    llm = LLM(m, tok, max_batch_size=3, max_seq_len=128)
    assert [o.token_ids for o in llm.generate(prompts, sp)] == alone
    again = llm.generate(prompts[:2], sp)  # restored from the prefix cache's snapshots (FP4 bytes too)
    assert [o.token_ids for o in again] == alone[:2] and again[0].num_cached_tokens > 0
