"""DeepSeek-V3/V2 (MLA) against transformers, absorbed == naive attention, cached == full forward."""

from __future__ import annotations

import pytest
import torch

import sparseek
from sparseek.model import build_model
from tests.conftest import randomize_, rel_err, tie_free_ids

transformers = pytest.importorskip("transformers")

LENGTHS = (1, 3, 4, 5, 127, 128, 129, 131, 300, 600)


@pytest.mark.parametrize("seed", [0, 1])
def test_v3_ours_to_transformers(tmp_path, seed):
    ours = randomize_(build_model(sparseek.preset("debug-v3")), seed).eval()
    sparseek.save(ours, tmp_path)
    theirs, info = transformers.DeepseekV3ForCausalLM.from_pretrained(tmp_path, dtype=torch.float32,
                                                                       output_loading_info=True)
    assert not any(info.values()), info
    _compare(ours, theirs.eval(), seed)


def test_v3_transformers_to_ours(tmp_path):
    a = sparseek.preset("debug-v3")
    cfg = transformers.DeepseekV3Config(**{k: v for k, v in a.to_dict().items() if k != "architectures"})
    theirs = randomize_(transformers.DeepseekV3ForCausalLM(cfg), 5).eval()
    theirs.save_pretrained(tmp_path)
    ours, _ = sparseek.load(str(tmp_path), dtype=torch.float32, tokenizer=False)
    _compare(ours, theirs, 5)


def test_v2_lite_shape_matches_transformers(tmp_path):
    """V2-Lite style: no q LoRA, softmax scoring, greedy top-k without bias, 2 shared experts."""
    ours = randomize_(build_model(sparseek.preset("debug-v2")), 2).eval()
    assert not hasattr(ours.layers[0].attn, "wq_a") and ours.layers[1].ffn.gate.bias is None
    sparseek.save(ours, tmp_path)
    theirs, info = transformers.DeepseekV2ForCausalLM.from_pretrained(tmp_path, dtype=torch.float32,
                                                                       output_loading_info=True)
    assert not any(info.values()), info
    _compare(ours, theirs.eval(), 2, lengths=(1, 5, 129, 300))


def _compare(ours, theirs, seed, lengths=LENGTHS):
    with torch.no_grad():
        for T in lengths:
            ids = tie_free_ids(ours, 2, T, seed)
            err = rel_err(ours(ids), theirs(ids).logits)
            assert err <= 1e-4, f"T={T}: relative max error {err:.2e}"


@pytest.fixture(scope="module")
def v3():
    return randomize_(build_model(sparseek.preset("debug-v3")), 3).eval()


def test_absorbed_equals_naive(v3):
    ids = torch.randint(0, 512, (2, 200), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        v3.attn_impl = "naive"
        naive = v3(ids)
        v3.attn_impl = "absorb"
        absorbed = v3(ids)
        v3.attn_impl = "auto"
    assert rel_err(absorbed, naive) < 1e-5
    assert rel_err(absorbed, naive) > 0  # two different computations, not one path twice


@pytest.mark.parametrize("impl", ["naive", "absorb", "auto"])
def test_cached_decode_equals_full(v3, impl):
    ids = torch.randint(0, 512, (2, 150), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        v3.attn_impl = "naive"
        full = v3(ids)
        v3.attn_impl = impl
        cache = v3.new_cache(2, 160)
        sizes, out, s = [1, 7, 33, 1, 1, 64, 43], [], 0
        for n in sizes:
            out.append(v3(ids[:, s:s + n], cache))
            s += n
        v3.attn_impl = "auto"
    assert rel_err(torch.cat(out, 1), full) < 1e-4


def test_v3_rows_at_different_positions(v3):
    ids = torch.randint(0, 512, (2, 80), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        cache = v3.new_cache(2, 100)
        v3(ids[0:1, :20], cache.select(0))
        v3(ids[1:2, :50], cache.select(1))
        got = v3(torch.stack([ids[0, 20:21], ids[1, 50:51]]), cache)
        assert rel_err(got[0, 0], v3(ids[0:1, :21])[0, -1]) < 1e-4
        assert rel_err(got[1, 0], v3(ids[1:2, :51])[0, -1]) < 1e-4
        # several tokens per row, rows apart (speculative verification): one batched forward, MLA
        # writing and masking each row at its own positions
        for impl in ("absorb", "naive"):
            v3.attn_impl = impl
            c = v3.new_cache(2, 100)
            v3(ids[0:1, :21], c.select(0))
            v3(ids[1:2, :51], c.select(1))
            got = v3(torch.stack([ids[0, 21:26], ids[1, 51:56]]), c)
            assert rel_err(got[0], v3(ids[0:1, :26])[0, 21:]) < 1e-4, impl
            assert rel_err(got[1], v3(ids[1:2, :56])[0, 51:]) < 1e-4, impl
        v3.attn_impl = "auto"
