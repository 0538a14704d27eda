"""DeepSeek-V3/V2 (MLA) against transformers, absorbed == naive attention, cached == full forward."""

from __future__ import annotations

import os

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
    # the MTP layer after the main ones is DeepSeek's layout (layer 61 in V3 / R1), which transformers skips
    mtp = f"model.layers.{ours.args.num_hidden_layers}."
    assert info["unexpected_keys"] and all(k.startswith(mtp) for k in info["unexpected_keys"])
    assert not any(v for k, v in info.items() if k != "unexpected_keys"), info
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


def test_mtp_layer_by_hand_and_cached_equals_one_shot(v3):
    """V3's MTP layer: eh_proj([enorm(Emb(t+1)); hnorm(h_t)]) through one decoder layer, then the
    shared head after its own norm, h_t being the main model's last hidden state after the final
    norm; run over a cache in chunks (its own latents and positions) it gives the one-shot logits."""
    ids = torch.randint(0, 512, (2, 90), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        logits, h = v3(ids, return_hidden=True)
        assert torch.equal(v3.head(h).float(), logits)  # the hidden state comes after the final norm
        want = v3.forward_mtp(h[:, :-1], ids[:, 1:])
        mtp = v3.mtp[0]
        x = mtp.eh_proj(torch.cat([mtp.enorm(v3.embed(ids[:, 1:])), mtp.hnorm(h[:, :-1])], dim=-1))
        cos, sin = v3.rotary(torch.arange(89)[None].expand(2, -1))
        x = x + mtp.attn(mtp.attn_norm(x), cos, sin, None, torch.zeros(2, dtype=torch.long), False)
        x = x + mtp.ffn(mtp.ffn_norm(x))
        assert rel_err(want, v3.head(mtp.norm(x)).float()) < 1e-5
        cache = v3.new_cache(2, 128)
        got = [v3.forward_mtp(h[:, a:b], ids[:, a + 1:b + 1], cache) for a, b in ((0, 40), (40, 41), (41, 89))]
        assert rel_err(torch.cat(got, dim=1), want) < 1e-4
        assert cache.mtp_pos.tolist() == [89, 89] and cache.pos.tolist() == [0, 0]
    assert v3.param_counts()["mtp"] == sum(p.numel() for p in v3.mtp.parameters()) > 0


def test_mtp_layer_in_deepseek_s_layout(v3, tmp_path):
    """Saved as V3 / R1 publish it (the layer after the main ones, its own copies of the embedding
    and head, which loading reads as shared), read back bit for bit; a checkpoint without it loads
    without the MTP layer."""
    from safetensors import safe_open

    sparseek.save(v3, tmp_path / "a")
    L = v3.args.num_hidden_layers
    with safe_open(str(tmp_path / "a" / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        assert torch.equal(f.get_tensor(f"model.layers.{L}.shared_head.head.weight"), v3.head.weight)
        assert torch.equal(f.get_tensor(f"model.layers.{L}.embed_tokens.weight"), v3.embed.weight)
    for name in ("enorm", "hnorm", "eh_proj", "shared_head.norm", "self_attn.kv_b_proj", "mlp.gate"):
        assert f"model.layers.{L}.{name}.weight" in keys, name
    back, _ = sparseek.load(str(tmp_path / "a"), dtype=torch.float32, tokenizer=False)
    assert len(back.mtp) == 1 and all(torch.equal(a, b) for a, b in zip(back.state_dict().values(),
                                                                        v3.state_dict().values()))
    sparseek.save(back, tmp_path / "b")
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()
    from safetensors.torch import load_file, save_file

    plain = {k: v for k, v in load_file(str(tmp_path / "a" / "model.safetensors")).items()
             if not k.startswith(f"model.layers.{L}.")}
    os.makedirs(tmp_path / "c")
    save_file(plain, str(tmp_path / "c" / "model.safetensors"))
    (tmp_path / "c" / "config.json").write_text((tmp_path / "a" / "config.json").read_text())
    bare, _ = sparseek.load(str(tmp_path / "c"), dtype=torch.float32, tokenizer=False)
    assert len(bare.mtp) == 0
    with pytest.raises(ValueError, match="no MTP layer"):
        bare.forward_mtp(torch.zeros(1, 2, v3.args.hidden_size), torch.zeros(1, 2, dtype=torch.long))
