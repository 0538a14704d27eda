"""ModelArgs reads DeepSeek's, the inference code's and transformers' configs 1:1 and writes them back."""

from __future__ import annotations

import json

import pytest

import sparseek
from sparseek.config import PRESETS, ConfigError, ModelArgs

FLASH_INFERENCE = {  # the keys of DeepSeek's inference/config.json for V4-Flash (spec §1.1)
    "vocab_size": 129280, "dim": 4096, "moe_inter_dim": 2048, "n_layers": 43, "n_hash_layers": 3, "n_heads": 64,
    "n_routed_experts": 256, "n_shared_experts": 1, "n_activated_experts": 6, "score_func": "sqrtsoftplus",
    "route_scale": 1.5, "swiglu_limit": 10.0, "q_lora_rank": 1024, "head_dim": 512, "rope_head_dim": 64,
    "o_groups": 8, "o_lora_rank": 1024, "window_size": 128, "original_seq_len": 65536, "rope_theta": 10000,
    "rope_factor": 16, "beta_fast": 32, "beta_slow": 1, "index_n_heads": 64, "index_head_dim": 128,
    "index_topk": 512, "hc_mult": 4, "hc_sinkhorn_iters": 20, "dtype": "fp8", "scale_fmt": "ue8m0",
    "expert_dtype": "fp4", "compress_rope_theta": 160000, "compress_ratios": [0, 0] + [4, 128] * 20 + [4, 0],
    "max_batch_size": 4, "max_seq_len": 4096, "n_mtp_layers": 1, "norm_eps": 1e-6, "hc_eps": 1e-6,
}
V3_INFERENCE = {  # DeepSeek-V3 inference/configs/config_671B.json
    "vocab_size": 129280, "dim": 7168, "inter_dim": 18432, "moe_inter_dim": 2048, "n_layers": 61, "n_dense_layers": 3,
    "n_heads": 128, "n_routed_experts": 256, "n_shared_experts": 1, "n_activated_experts": 8, "n_expert_groups": 8,
    "n_limited_groups": 4, "route_scale": 2.5, "score_func": "sigmoid", "q_lora_rank": 1536, "kv_lora_rank": 512,
    "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128, "dtype": "fp8",
}
SAME = ("hidden_size", "num_hidden_layers", "num_attention_heads", "head_dim", "qk_rope_head_dim", "q_lora_rank",
        "o_groups", "o_lora_rank", "sliding_window", "compress_ratios", "compress_rope_theta", "rope_theta",
        "index_n_heads", "index_head_dim", "index_topk", "n_routed_experts", "num_experts_per_tok",
        "moe_intermediate_size", "num_hash_layers", "scoring_func", "routed_scaling_factor", "swiglu_limit",
        "hc_mult", "hc_sinkhorn_iters", "hc_eps", "num_nextn_predict_layers", "rms_norm_eps", "vocab_size")


def _same(a: ModelArgs, b: ModelArgs, fields=SAME):
    for f in fields:
        assert getattr(a, f) == getattr(b, f), f
    assert a.yarn()["factor"] == b.yarn()["factor"]
    assert a.yarn()["original_max_position_embeddings"] == b.yarn()["original_max_position_embeddings"]


@pytest.mark.parametrize("name", ["v4-flash", "v4-pro", "v3-671b", "v2-lite", "nano", "small", "debug"])
def test_hub_config_round_trips_losslessly(name):
    d = PRESETS[name]()
    assert ModelArgs.from_dict(d).to_dict() == d


def test_flash_layer_census():
    a = sparseek.preset("v4-flash")
    kinds = [a.layer_kind(i) for i in range(a.num_hidden_layers)]
    assert kinds.count("swa") == 2 and kinds.count("csa") == 21 and kinds.count("hca") == 20
    assert a.layer_kind(a.num_hidden_layers) == "swa"  # the MTP block
    p = sparseek.preset("v4-pro")
    assert [p.layer_kind(i) for i in range(2)] == ["hca", "hca"]


def test_inference_layout():
    a = ModelArgs.from_dict(FLASH_INFERENCE)
    _same(a, sparseek.preset("v4-flash"))
    assert a.expert_dtype == "fp4" and a.extra["max_seq_len"] == 4096
    v3 = ModelArgs.from_dict(V3_INFERENCE)
    ref = sparseek.preset("v3-671b")
    for f in ("hidden_size", "intermediate_size", "first_k_dense_replace", "n_group", "topk_group", "kv_lora_rank",
              "qk_nope_head_dim", "v_head_dim", "scoring_func", "routed_scaling_factor", "num_experts_per_tok"):
        assert getattr(v3, f) == getattr(ref, f), f


def test_transformers_layout_and_write_back(tmp_path):
    transformers = pytest.importorskip("transformers")
    flash = sparseek.preset("v4-flash")
    flash.save(tmp_path)
    hf = transformers.DeepseekV4Config.from_pretrained(tmp_path)  # transformers accepts what we write
    assert hf.layer_types[:4] == ["sliding_attention", "sliding_attention", "compressed_sparse_attention",
                                  "heavily_compressed_attention"]
    assert hf.mlp_layer_types[:4] == ["hash_moe"] * 3 + ["moe"]
    hf.save_pretrained(tmp_path / "hf")  # transformers' own layout: layer_types, nested rope_parameters
    written = json.load(open(tmp_path / "hf" / "config.json"))
    assert "layer_types" in written and "compress" in written["rope_parameters"]
    _same(ModelArgs.from_json(tmp_path / "hf"), flash)
    v3 = transformers.DeepseekV3Config.from_dict(sparseek.preset("v3-671b").to_dict())
    v3.save_pretrained(tmp_path / "v3")
    assert ModelArgs.from_json(tmp_path / "v3").kv_lora_rank == 512


@pytest.mark.parametrize("change, field", [
    ({"frobnicate": 1}, "frobnicate"),
    ({"compress_ratios": [0, 4]}, "compress_ratios"),
    ({"o_groups": 3}, "o_groups"),
    ({"num_experts_per_tok": 999}, "num_experts_per_tok"),
    ({"scoring_func": "relu"}, "scoring_func"),
    ({"mlp_layer_types": ["moe", "hash_moe", "moe", "moe"]}, "mlp_layer_types"),
    ({"compress_ratios": [0, 1, 128, 4, 0]}, "compress_ratios[1]"),
])
def test_bad_fields_are_named(change, field):
    d = PRESETS["debug"]()
    d.update(change)
    with pytest.raises(ConfigError, match=field.replace("[", r"\[")):
        ModelArgs.from_dict(d)


def test_missing_config_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="no config.json"):
        ModelArgs.from_json(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        ModelArgs.from_json(tmp_path)


def test_small_presets_have_the_advertised_size():
    nano = sparseek.preset("nano").num_params()
    small = sparseek.preset("small").num_params()
    assert 10e6 <= nano["total"] <= 20e6, nano
    assert 100e6 <= small["total"] <= 200e6, small
    assert small["active"] < 0.5 * small["total"]
    for name in ("nano", "small"):
        a = sparseek.preset(name)
        kinds = {a.layer_kind(i) for i in range(a.num_hidden_layers)}
        assert kinds == {"swa", "csa", "hca"} and a.num_hash_layers > 0 and a.hc_mult == 4 and a.n_mtp == 1


def test_flash_param_count_matches_the_model_card():
    counts = sparseek.preset("v4-flash").num_params()
    assert 270e9 < counts["total"] < 300e9  # "284B total"
    assert 10e9 < counts["active"] + counts["embedding"] < 16e9  # "13B active"
