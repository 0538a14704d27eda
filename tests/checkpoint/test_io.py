"""Checkpoint layouts: official / transformers names, sharding, quantized weights, errors, round trips."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import sparseek
from sparseek.checkpoint import CheckpointError, checkpoint_state
from sparseek.checkpoint.quant import dequant_fp4, dequant_fp8, quant_fp4, quant_fp8
from sparseek.model import build_model
from tests.conftest import randomize_, rel_err


@pytest.fixture(scope="module")
def v4():
    return randomize_(build_model(sparseek.preset("debug")), 11).eval()


def _ids():
    return torch.randint(0, 512, (2, 70), generator=torch.Generator().manual_seed(0))


def _tensors(d):
    out = {}
    for f in sorted(os.listdir(d)):
        if f.endswith(".safetensors"):
            out.update(load_file(os.path.join(d, f)))
    return out


def test_saved_names_are_deepseeks(v4, tmp_path):
    sparseek.save(v4, tmp_path)
    names = set(_tensors(tmp_path))
    for n in ("embed.weight", "head.weight", "norm.weight", "hc_head_fn", "layers.0.attn.kv_norm.weight",
              "layers.0.ffn.gate.tid2eid", "layers.1.ffn.gate.bias", "layers.1.attn.indexer.compressor.ape",
              "layers.1.ffn.experts.7.w2.weight", "layers.2.attn.compressor.wkv.weight", "mtp.0.e_proj.weight",
              "mtp.0.hc_head_scale", "layers.3.hc_ffn_fn"):
        assert n in names, n
    cfg = json.load(open(tmp_path / "config.json"))
    assert cfg["compress_ratios"] == [0, 4, 128, 4, 0] and cfg["architectures"] == ["DeepseekV4ForCausalLM"]


def _official_dtypes(tensors):
    """DeepSeek's published dtypes: bf16 except f32 mHC/ape/sink/router bias and int64 hash tables."""
    keep_f32 = ("hc_", "ape", "attn_sink", "gate.bias")
    return {k: (t if (not t.is_floating_point() or any(s in k for s in keep_f32)) else t.to(torch.bfloat16))
            for k, t in tensors.items()}


def test_round_trip_is_bit_exact(v4, tmp_path):
    sparseek.save(v4, tmp_path / "f32")
    os.makedirs(tmp_path / "a")
    save_file(_official_dtypes(_tensors(tmp_path / "f32")), str(tmp_path / "a" / "model.safetensors"))
    (tmp_path / "a" / "config.json").write_text((tmp_path / "f32" / "config.json").read_text())
    for dtype in (torch.bfloat16, torch.float32):
        m, _ = sparseek.load(str(tmp_path / "a"), dtype=dtype, tokenizer=False)
        sparseek.save(m, tmp_path / "b")
        ta, tb = _tensors(tmp_path / "a"), _tensors(tmp_path / "b")
        assert ta.keys() == tb.keys()
        for k in ta:
            assert ta[k].dtype == tb[k].dtype, (k, ta[k].dtype, tb[k].dtype)
            assert torch.equal(ta[k].view(torch.uint8), tb[k].view(torch.uint8)), k
        assert json.load(open(tmp_path / "a" / "config.json")) == json.load(open(tmp_path / "b" / "config.json"))


def test_sharded_checkpoint(v4, tmp_path):
    from sparseek.checkpoint.io import save_model

    save_model(v4, tmp_path, max_shard_bytes=200_000)
    index = json.load(open(tmp_path / "model.safetensors.index.json"))
    files = set(index["weight_map"].values())
    assert len(files) > 2 and all((tmp_path / f).exists() for f in files)
    m, _ = sparseek.load(str(tmp_path), dtype=torch.float32, tokenizer=False)
    with torch.no_grad():
        assert torch.equal(m(_ids()), v4(_ids()))


def test_memory_mapped_not_copied(v4, tmp_path):
    sparseek.save(v4, tmp_path)
    m, _ = sparseek.load(str(tmp_path), dtype=torch.float32, tokenizer=False)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        ref = f.get_tensor("embed.weight")
    # same file pages: the parameter's storage is the mmap, not a private copy
    assert m.embed.weight.untyped_storage().nbytes() >= ref.numel() * 4
    assert not m.embed.weight.untyped_storage().resizable()


def test_transformers_module_names_with_fused_experts(v4, tmp_path):
    transformers = pytest.importorskip("transformers")
    sparseek.save(v4, tmp_path / "ours")
    hf = transformers.DeepseekV4ForCausalLM.from_pretrained(tmp_path / "ours", dtype=torch.float32)
    sd = {k: v.contiguous() for k, v in hf.state_dict().items()}
    assert any(k.endswith("experts.gate_up_proj") for k in sd)  # fused [E, 2I, D] in memory
    os.makedirs(tmp_path / "hfmem")
    save_file(sd, str(tmp_path / "hfmem" / "model.safetensors"))
    (tmp_path / "hfmem" / "config.json").write_text((tmp_path / "ours" / "config.json").read_text())
    m, _ = sparseek.load(str(tmp_path / "hfmem"), dtype=torch.float32, tokenizer=False)
    with torch.no_grad():
        ref = v4(_ids())
        assert rel_err(m(_ids()), ref) < 1e-6


def _quantize_dir(src, dst, fp4_experts: bool, scale_name: str):
    """Rewrite a bf16/fp32 checkpoint the way DeepSeek ships it: FP8 linears, FP4 routed experts."""
    os.makedirs(dst, exist_ok=True)
    ref = {}
    out = {}
    for k, t in _tensors(src).items():
        base = k[: -len(".weight")]
        is_linear = k.endswith(".weight") and t.dim() == 2 and not any(
            s in k for s in ("embed", "head.weight", "norm", "compressor", "weights_proj", "gate.weight"))
        if is_linear and fp4_experts and ".experts." in k:
            q, s = quant_fp4(t)
            out[k], out[f"{base}.scale"] = q, s
            ref[k] = dequant_fp4(q, s, torch.float32)
        elif is_linear:
            q, s = quant_fp8(t, scale_dtype=torch.float8_e8m0fnu if scale_name == "scale" else torch.float32)
            out[k], out[f"{base}.{scale_name}"] = q, s
            ref[k] = dequant_fp8(q, s, torch.float32)
        else:
            out[k] = t
            ref[k] = t
    save_file(out, os.path.join(dst, "model.safetensors"))
    with open(os.path.join(src, "config.json")) as f:
        open(os.path.join(dst, "config.json"), "w").write(f.read())
    save_file(ref, os.path.join(dst, "reference.safetensors.ref"))
    return ref


def test_fp8_fp4_v4_checkpoint(v4, tmp_path):
    sparseek.save(v4, tmp_path / "plain")
    ref = _quantize_dir(tmp_path / "plain", tmp_path / "q", fp4_experts=True, scale_name="scale")
    with safe_open(str(tmp_path / "q" / "model.safetensors"), "pt") as f:
        assert f.get_tensor("layers.1.ffn.experts.3.w1.weight").dtype == torch.int8
        assert f.get_tensor("layers.1.attn.wq_a.weight").dtype == torch.float8_e4m3fn
    m, _ = sparseek.load(str(tmp_path / "q"), dtype=torch.float32, tokenizer=False)
    # the loaded weights are exactly the dequantized values
    got = checkpoint_state(m)
    for k, t in ref.items():
        assert torch.equal(got[k], t.float() if t.is_floating_point() else t), k
    # and the model computes with them: same logits as an unquantized checkpoint of those values
    os.makedirs(tmp_path / "r")
    save_file(ref, str(tmp_path / "r" / "model.safetensors"))
    (tmp_path / "r" / "config.json").write_text((tmp_path / "plain" / "config.json").read_text())
    r, _ = sparseek.load(str(tmp_path / "r"), dtype=torch.float32, tokenizer=False)
    with torch.no_grad():
        assert torch.equal(m(_ids()), r(_ids()))


def test_fp8_v3_checkpoint_with_weight_scale_inv(tmp_path):
    v3 = randomize_(build_model(sparseek.preset("debug-v3")), 1).eval()
    sparseek.save(v3, tmp_path / "plain")
    ref = _quantize_dir(tmp_path / "plain", tmp_path / "q", fp4_experts=False, scale_name="weight_scale_inv")
    assert any(k.endswith("kv_a_proj_with_mqa.weight") for k in ref)
    m, _ = sparseek.load(str(tmp_path / "q"), dtype=torch.float32, tokenizer=False)
    got = checkpoint_state(m)
    for k, t in ref.items():
        assert torch.equal(got[k], t), k


def test_mismatch_lists_every_problem(v4, tmp_path):
    sparseek.save(v4, tmp_path)
    t = load_file(str(tmp_path / "model.safetensors"))
    del t["layers.1.attn.wq_a.weight"]
    del t["layers.2.ffn.experts.5.w3.weight"]
    t["layers.0.attn.bogus.weight"] = torch.zeros(3)
    t["layers.3.attn.wkv.weight"] = torch.zeros(7, 7)
    save_file(t, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError) as e:
        sparseek.load(str(tmp_path), tokenizer=False)
    msg = str(e.value)
    for needle in ("layers.1.attn.wq_a.weight", "layers.2.ffn.experts.w3 experts [5]", "layers.0.attn.bogus.weight",
                   "layers.3.attn.wkv.weight: checkpoint [7, 7]", "2 missing", "1 unexpected", "1 wrong shape"):
        assert needle in msg, (needle, msg)


def test_refuses_pickle_and_empty_dirs(tmp_path):
    sparseek.preset("debug").save(tmp_path)
    torch.save({"x": torch.zeros(1)}, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pickled"):
        sparseek.load(str(tmp_path), tokenizer=False)


def test_missing_mtp_is_dropped_with_a_warning(v4, tmp_path, caplog):
    sparseek.save(v4, tmp_path)
    t = {k: v for k, v in load_file(str(tmp_path / "model.safetensors")).items() if not k.startswith("mtp.")}
    save_file(t, str(tmp_path / "model.safetensors"))
    m, _ = sparseek.load(str(tmp_path), dtype=torch.float32, tokenizer=False)
    assert len(m.mtp) == 0 and "MTP" in caplog.text
    with torch.no_grad():
        assert torch.equal(m(_ids()), v4(_ids()))


def test_half_checkpoints_on_cpus_without_half_products(tmp_path, monkeypatch, caplog):
    """A built bf16 model's checkpoint says bfloat16; loading it without a dtype keeps bf16 where
    the CPU multiplies bf16 natively and falls back to float32, with a warning naming why, where
    it does not (torch's scalar loops there run ~100x slower); an explicit dtype is kept."""
    import logging

    import sparseek.utils

    m, _ = sparseek.load("debug", dtype="bfloat16")
    sparseek.save(m, tmp_path)
    assert json.load(open(tmp_path / "config.json"))["torch_dtype"] == "bfloat16"
    monkeypatch.setattr(sparseek.utils, "cpu_has_fast_half", lambda dtype: True)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="sparseek"):
        assert sparseek.load(str(tmp_path), tokenizer=False)[0].embed.weight.dtype == torch.bfloat16
        assert "matrix products" not in caplog.text
        monkeypatch.setattr(sparseek.utils, "cpu_has_fast_half", lambda dtype: False)
        assert sparseek.load(str(tmp_path), tokenizer=False)[0].embed.weight.dtype == torch.float32
        assert "no native bfloat16 matrix products" in caplog.text and "loading in float32" in caplog.text
        caplog.clear()
        kept = sparseek.load(str(tmp_path), dtype="bfloat16", tokenizer=False)[0]
        assert kept.embed.weight.dtype == torch.bfloat16 and "~100x slower" in caplog.text


# DeepSeek's convert.py (spec 7.2; V3's version also renames transformers' modules): these modules'
# tensors split over ranks, column-parallel on dim 0, row-parallel on dim 1; routed experts by index
# range; V4's wo_a dequantized to bf16; FP4 experts stored with torch's FP4 dtype, or (--expert-dtype
# fp8) cast to FP8 with 128 x 128 scales
_TP_DIMS = {"embed": 0, "wq": 0, "wq_b": 0, "wkv_b": 0, "wo_a": 0, "head": 0, "attn_sink": 0, "weights_proj": 0,
            "w1": 0, "w3": 0, "wo": 1, "wo_b": 1, "w2": 1}
_V3_NAMES = {"embed_tokens": "embed", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
             "q_proj": "wq", "q_a_proj": "wq_a", "q_a_layernorm": "q_norm", "q_b_proj": "wq_b",
             "kv_a_proj_with_mqa": "wkv_a", "kv_a_layernorm": "kv_norm", "kv_b_proj": "wkv_b", "o_proj": "wo",
             "gate_proj": "w1", "down_proj": "w2", "up_proj": "w3", "lm_head": "head"}


def _tensor_parallel_dir(src, dst, mp: int, n_experts: int, expert_dtype: str = "fp4", split_shared: bool = True,
                         skip_layer: int | None = None):
    """Write the checkpoint in ``src`` (FP8 / FP4) as DeepSeek's convert.py would for ``mp`` ranks
    (our own reading of the spec, not DeepSeek's code); ``skip_layer``: V3's MTP layer, which V3's
    script leaves out."""
    os.makedirs(dst, exist_ok=True)
    ranks = [{} for _ in range(mp)]
    per_rank = n_experts // mp
    for name, t in _tensors(src).items():
        if skip_layer is not None and f"model.layers.{skip_layer}." in name:
            continue
        name = name.removeprefix("model.")
        if name.startswith("mtp.") and ("emb" in name or name.endswith("head.weight")):
            continue
        name = name.replace("self_attn", "attn").replace("mlp", "ffn").replace("weight_scale_inv", "scale")
        name = name.replace("e_score_correction_bias", "bias")
        parts = name.split(".")
        at = -2 if parts[-1] in ("weight", "scale", "bias") else -1
        parts[at] = _V3_NAMES.get(parts[at], parts[at])
        name, key = ".".join(parts), parts[at]
        routed = ".experts." in name and "shared_experts" not in name
        dim = None if routed or (not split_shared and "shared_experts" in name) else _TP_DIMS.get(key)
        for i in range(mp):
            if routed and not i * per_rank <= int(parts[-3]) < (i + 1) * per_rank:
                continue
            ranks[i][name] = t if dim is None else t.chunk(mp, dim)[i].contiguous()
    for sd in ranks:
        for name in [n for n in sd if n.endswith("wo_a.weight")]:
            sd[name] = dequant_fp8(sd[name], sd.pop(name[:-len("weight")] + "scale"), torch.bfloat16)
        for name in [n for n in sd if sd[n].dtype == torch.int8]:
            if expert_dtype == "fp8":
                scale = name[:-len("weight")] + "scale"
                sd[name], sd[scale] = quant_fp8(dequant_fp4(sd[name], sd[scale], torch.float32),
                                                scale_dtype=torch.float8_e8m0fnu)
            else:
                sd[name] = sd[name].view(torch.float4_e2m1fn_x2)
    for i, sd in enumerate(ranks):
        save_file(sd, os.path.join(dst, f"model{i}-mp{mp}.safetensors"))


@pytest.mark.parametrize("mp,expert_dtype,split_shared", [(2, "fp4", True), (4, "fp4", False), (2, "fp8", True)])
def test_deepseeks_tensor_parallel_files_load_as_one_checkpoint(tmp_path, mp, expert_dtype, split_shared):
    """The output of DeepSeek's inference/convert.py (model{i}-mp{N}.safetensors: split tensors,
    experts by rank, wo_a in bf16, FP4 experts in torch's FP4 dtype or cast to FP8) loads as the
    checkpoint it came from: the same logits, dequantized and kept quantized."""
    # split dims and FP8 blocks that divide into 128-row blocks per rank, as in DeepSeek's models
    v4 = randomize_(build_model(sparseek.preset("debug", hidden_size=128, head_dim=128, o_lora_rank=256,
                                                moe_intermediate_size=512, index_head_dim=64)), 11).eval()
    sparseek.save(v4, tmp_path / "plain")
    _quantize_dir(tmp_path / "plain", tmp_path / "q", fp4_experts=True, scale_name="scale")
    _tensor_parallel_dir(tmp_path / "q", tmp_path / "tp", mp, v4.args.n_routed_experts, expert_dtype, split_shared)
    with pytest.raises(Exception, match="convert.py writes none"):
        sparseek.load(str(tmp_path / "tp"), dtype=torch.float32, tokenizer=False)
    (tmp_path / "tp" / "config.json").write_text((tmp_path / "q" / "config.json").read_text())
    ref, _ = sparseek.load(str(tmp_path / "q"), dtype=torch.float32, tokenizer=False)
    got, _ = sparseek.load(str(tmp_path / "tp"), dtype=torch.float32, tokenizer=False)
    kept, _ = sparseek.load(str(tmp_path / "tp"), dtype=torch.float32, tokenizer=False, quantize="stored")
    with torch.no_grad():
        want = ref(_ids())
        assert torch.equal(got(_ids()), want)  # the FP8 cast of FP4 experts is lossless (scales 2^6 apart at most)
        assert rel_err(kept(_ids()), want) < 1e-5
    from sparseek.quant.modules import QuantExperts

    assert isinstance(kept.layers[1].ffn.experts, QuantExperts) and kept.layers[1].ffn.experts.fmt == expert_dtype
    os.remove(tmp_path / "tp" / f"model1-mp{mp}.safetensors")
    with pytest.raises(CheckpointError, match=r"lacks the tensor-parallel files of ranks \[1\]"):
        sparseek.load(str(tmp_path / "tp"), dtype=torch.float32, tokenizer=False)


def test_deepseek_v3_tensor_parallel_files(tmp_path, caplog):
    """V3 / R1's convert.py output (transformers' names renamed to DeepSeek's, weight_scale_inv ->
    scale, the MTP layer left out): the same logits as the FP8 checkpoint it came from."""
    # every split dim a multiple of 128 per rank (FP8 blocks), as in DeepSeek's models
    v3 = randomize_(build_model(sparseek.preset("debug-v3", hidden_size=128, num_attention_heads=16,
                                                qk_nope_head_dim=48, qk_rope_head_dim=16, v_head_dim=16,
                                                intermediate_size=512, moe_intermediate_size=512)), 2).eval()
    sparseek.save(v3, tmp_path / "plain")
    _quantize_dir(tmp_path / "plain", tmp_path / "q", fp4_experts=False, scale_name="weight_scale_inv")
    _tensor_parallel_dir(tmp_path / "q", tmp_path / "tp", 2, v3.args.n_routed_experts,
                         skip_layer=v3.args.num_hidden_layers)
    with safe_open(str(tmp_path / "tp" / "model0-mp2.safetensors"), "pt") as f:
        assert "layers.0.attn.wkv_b.scale" in f.keys() and "embed.weight" in f.keys()
    (tmp_path / "tp" / "config.json").write_text((tmp_path / "q" / "config.json").read_text())
    ref, _ = sparseek.load(str(tmp_path / "q"), dtype=torch.float32, tokenizer=False)
    ref.mtp = torch.nn.ModuleList()  # the rank files have no MTP layer: compare the main model
    got, _ = sparseek.load(str(tmp_path / "tp"), dtype=torch.float32, tokenizer=False)
    assert "no MTP weights" in caplog.text and not len(got.mtp)
    with torch.no_grad():
        assert torch.equal(got(_ids()), ref(_ids()))
