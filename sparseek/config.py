"""Model arguments: one dataclass for DeepSeek-V4, V3/R1 and V2-Lite, read 1:1 from any config.json.

Three layouts reach us in the wild and all map onto the same fields:

* the hub ``config.json`` DeepSeek ships (transformers-style names plus the legacy V4 fields
  ``compress_ratios``, ``num_hash_layers``, ``qk_rope_head_dim``, ``rope_scaling``);
* the official ``inference/config.json`` (the ``ModelArgs`` names of DeepSeek's own code:
  ``dim``, ``n_layers``, ``window_size``, ``rope_factor`` ...);
* transformers' ``DeepseekV4Config`` layout (``layer_types``, ``mlp_layer_types``,
  ``compress_rates``, nested ``rope_parameters``).

The canonical fields are the hub names, so ``to_dict()`` writes back the file DeepSeek
publishes, which transformers also loads. Unknown or inconsistent fields raise
``ConfigError`` naming the field.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import re
from dataclasses import dataclass, field
from typing import Any

V4, V3, V2 = "deepseek_v4", "deepseek_v3", "deepseek_v2"
CSA_RATIO = 4  # DeepSeek's code gives the overlap compressor and the indexer to ratio-4 layers only

LAYER_TYPE_BY_RATIO = {0: "sliding_attention", CSA_RATIO: "compressed_sparse_attention"}


class ConfigError(ValueError):
    """A config field is unknown, missing or inconsistent; the message names it."""


@dataclass
class ModelArgs:
    model_type: str = V4
    vocab_size: int = 129280
    hidden_size: int = 4096
    num_hidden_layers: int = 43
    num_attention_heads: int = 64
    num_key_value_heads: int = 1
    rms_norm_eps: float = 1e-6
    hidden_act: str = "silu"
    max_position_embeddings: int = 1048576
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    bos_token_id: int | None = 0
    eos_token_id: int | list[int] | None = 1
    pad_token_id: int | None = None
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    attention_bias: bool = False
    attention_dropout: float = 0.0
    # --- MoE (all families) ---
    moe_intermediate_size: int = 2048
    n_routed_experts: int = 256
    n_shared_experts: int = 1
    num_experts_per_tok: int = 6
    scoring_func: str = "sqrtsoftplus"
    topk_method: str = "noaux_tc"
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.5
    n_group: int | None = None
    topk_group: int | None = None
    aux_loss_alpha: float = 0.0001
    seq_aux: bool = True
    num_nextn_predict_layers: int = 1
    # --- V3/V2 only ---
    intermediate_size: int | None = None
    first_k_dense_replace: int = 0
    moe_layer_freq: int = 1
    kv_lora_rank: int | None = None
    qk_nope_head_dim: int | None = None
    v_head_dim: int | None = None
    # --- attention shared by V4 and V3 ---
    q_lora_rank: int | None = 1024
    qk_rope_head_dim: int = 64
    # --- V4 only ---
    head_dim: int | None = 512
    o_groups: int | None = 8
    o_lora_rank: int | None = 1024
    sliding_window: int | None = 128
    compress_ratios: list[int] | None = None
    compress_rope_theta: float = 160000.0
    index_n_heads: int | None = 64
    index_head_dim: int | None = 128
    index_topk: int | None = 512
    num_hash_layers: int = 3
    swiglu_limit: float | None = 10.0
    hc_mult: int = 4
    hc_sinkhorn_iters: int = 20
    hc_eps: float = 1e-6
    expert_dtype: str | None = None
    # --- sparseek switches (not in DeepSeek's files; written back only when changed) ---
    # DeepSeek's code leaves the shared expert unclamped; transformers' port clamps it.
    clamp_shared_expert: bool = False
    # DeepSeek's runtime rounds the non-rope dims of cached V4 KV entries to FP8 (64-blocks, power-of-
    # two scales) and serving stacks store them so; transformers' port keeps them in bf16.
    kv_fp8: bool = False
    # DeepSeek's runtime rotates the lightning indexer's queries and keys by a Hadamard matrix and
    # rounds them to FP4 (32-blocks, power-of-two scales); transformers' port does neither.
    index_fp4: bool = False
    # DeepSeek's runtime rounds the inputs of its FP8 / FP4 weights' GEMMs to FP8 (1 x 128 blocks per
    # token); transformers' port, which dequantizes the weights, does not.
    act_fp8: bool = False
    # Everything else a config.json carries (architectures, quantization_config, torch_dtype,
    # runtime fields of inference/config.json ...) is kept verbatim so a round trip loses nothing.
    extra: dict = field(default_factory=dict)

    # ------------------------------------------------------------------ derived
    @property
    def is_v4(self) -> bool:
        return self.model_type == V4

    @property
    def act_scale_fmt(self) -> str | None:
        """How ``act_fp8`` scales its blocks (None: off): powers of two ("e8m0") where the
        checkpoint's ``quantization_config`` (or the runtime's ``scale_fmt``) says ``ue8m0`` -- V4,
        V3.1 -- and for V4 models without one; amax / 448 exactly ("f32") as V3 / R1 run."""
        if not self.act_fp8:
            return None
        qc = self.extra.get("quantization_config") or {}
        fmt = qc.get("scale_fmt", self.extra.get("scale_fmt"))
        if fmt is None:
            return "e8m0" if self.is_v4 else "f32"
        return "e8m0" if fmt == "ue8m0" else "f32"

    @property
    def n_mtp(self) -> int:
        return self.num_nextn_predict_layers

    def compress_ratio(self, layer_id: int) -> int:
        """Ratio of block ``layer_id``; ``layer_id == num_hidden_layers`` is the MTP block."""
        return self.compress_ratios[layer_id] if self.compress_ratios else 0

    def layer_kind(self, layer_id: int) -> str:
        r = self.compress_ratio(layer_id)
        return "swa" if r == 0 else ("csa" if r == CSA_RATIO else "hca")

    @property
    def quantization_config(self) -> dict | None:
        return self.extra.get("quantization_config")

    @property
    def qk_head_dim(self) -> int:
        return (self.qk_nope_head_dim or 0) + self.qk_rope_head_dim

    def num_params(self) -> dict[str, int]:
        """Analytic parameter counts: total, active per token, and embedding (one table)."""
        from sparseek.model import build_model

        import torch

        with torch.device("meta"):
            model = build_model(self)
        return model.param_counts()

    # ------------------------------------------------------------------ io
    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelArgs":
        d = copy.deepcopy(dict(d))
        if not isinstance(d, dict) or not d:
            raise ConfigError("config is empty")
        if "dim" in d and "hidden_size" not in d:
            d = _from_inference_layout(d)
        if "layer_types" in d or "mlp_layer_types" in d or "compress_rates" in d or _nested_rope(d):
            d = _from_transformers_v4_layout(d)
        d = _normalise_rope_keys(d)
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        extra = dict(d.pop("extra", {}) or {})
        known: dict[str, Any] = {}
        for k, v in d.items():
            if k in names:
                known[k] = v
            elif k in _PASSTHROUGH_KEYS:
                extra[k] = v
            else:
                raise ConfigError(
                    f"unknown config field {k!r}; if it is a newer DeepSeek field, sparseek does not know "
                    f"what it changes and refuses to guess"
                )
        model_type = known.get("model_type") or _guess_model_type(known)
        known["model_type"] = model_type
        if model_type not in (V4, V3, V2):
            raise ConfigError(f"model_type {model_type!r} is not one of {V4!r}, {V3!r}, {V2!r}")
        if model_type != V4:
            _drop_derived_mla(known, extra)
            # V3/V2 configs omit the V4 fields: their dataclass defaults are V4-Flash's, so clear them.
            for k in _V4_ONLY:
                known.setdefault(k, None if k not in ("num_hash_layers",) else 0)
            known.setdefault("scoring_func", "sigmoid" if model_type == V3 else "softmax")
            known.setdefault("topk_method", "noaux_tc" if model_type == V3 else "greedy")
            known.setdefault("routed_scaling_factor", 2.5 if model_type == V3 else 1.0)
            known.setdefault("swiglu_limit", None)
            known.setdefault("num_nextn_predict_layers", 0)
        args = cls(**known, extra=extra)
        args._given = [k for k in d if k != "extra"]  # so that to_dict writes back the same file
        args.validate()
        return args

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> "ModelArgs":
        path = os.fspath(path)
        folder = path if os.path.isdir(path) else None
        if folder is not None:
            path = os.path.join(path, "config.json")
        try:
            with open(path, encoding="utf-8") as f:
                d = json.load(f)
        except FileNotFoundError:
            hint = ""
            if folder is not None and any(re.fullmatch(r"model\d+-mp\d+\.safetensors", f) for f in os.listdir(folder)):
                hint = (" (DeepSeek's inference/convert.py writes none beside its model{i}-mp{N} files: copy the "
                        "model's config.json or its inference/config.json there)")
            raise ConfigError(f"no config.json at {path}{hint}") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} is not valid JSON: {e}") from None
        return cls.from_dict(d)

    def to_dict(self) -> dict[str, Any]:
        """The hub ``config.json`` layout: what DeepSeek ships and transformers loads.

        A config read from a file is written back with the same keys in the same order; fields
        changed since (or set on a preset) are added after them.
        """
        arch = {V4: "DeepseekV4ForCausalLM", V3: "DeepseekV3ForCausalLM", V2: "DeepseekV2ForCausalLM"}
        defaults = ModelArgs()
        fields = {f.name for f in dataclasses.fields(self)} - {"extra"}
        given = getattr(self, "_given", None)
        out: dict[str, Any] = {}
        if given is None:
            out["architectures"] = [arch[self.model_type]]
        for k in given or []:
            if k in fields:
                out[k] = copy.deepcopy(getattr(self, k))
            elif k in self.extra:
                out[k] = copy.deepcopy(self.extra[k])
        for k in sorted(fields, key=[f.name for f in dataclasses.fields(self)].index):
            if k in out:
                continue
            v = getattr(self, k)
            relevant = not ((self.model_type != V4 and k in _V4_ONLY) or (self.model_type == V4 and k in _V3_ONLY))
            if not relevant or (k in _SPARSEEK_SWITCHES and v == getattr(defaults, k)):
                continue
            if given is not None and v == getattr(defaults, k):
                continue
            if k == "expert_dtype" and v is None:
                continue
            out[k] = copy.deepcopy(v)
        for k, v in self.extra.items():
            out.setdefault(k, copy.deepcopy(v))
        return out

    def save(self, directory: str | os.PathLike) -> None:
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, "config.json")
        tmp = path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, indent=2)
            f.write("\n")
        os.replace(tmp, path)

    def replace(self, **changes) -> "ModelArgs":
        unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(self)} - {"extra"})
        if unknown:
            raise ConfigError(f"unknown config field(s) {unknown}")
        new = dataclasses.replace(self, **changes)
        if hasattr(self, "_given"):
            new._given = list(self._given)
        new.validate()
        return new

    # ------------------------------------------------------------------ checks
    def validate(self) -> None:
        def need(cond: bool, fld: str, msg: str) -> None:
            if not cond:
                raise ConfigError(f"{fld}: {msg}")

        for fld in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                    "moe_intermediate_size", "n_routed_experts", "num_experts_per_tok"):
            v = getattr(self, fld)
            need(isinstance(v, int) and v > 0, fld, f"must be a positive integer, got {v!r}")
        need(self.num_experts_per_tok <= self.n_routed_experts, "num_experts_per_tok",
             f"{self.num_experts_per_tok} > n_routed_experts={self.n_routed_experts}")
        need(self.scoring_func in ("sqrtsoftplus", "sigmoid", "softmax"), "scoring_func",
             f"{self.scoring_func!r} is not sqrtsoftplus, sigmoid or softmax")
        need(self.hidden_act == "silu", "hidden_act", f"only silu is used by DeepSeek models, got {self.hidden_act!r}")
        need(self.qk_rope_head_dim > 0 and self.qk_rope_head_dim % 2 == 0, "qk_rope_head_dim",
             f"must be a positive even number, got {self.qk_rope_head_dim}")
        need(self.num_nextn_predict_layers in (0, 1), "num_nextn_predict_layers",
             f"only MTP depth 0 or 1 exists in DeepSeek checkpoints, got {self.num_nextn_predict_layers}")
        if self.rope_scaling is not None:
            rs = self.rope_scaling
            need(isinstance(rs, dict), "rope_scaling", "must be an object")
            kind = rs.get("type", rs.get("rope_type"))
            need(kind in ("yarn", "default", None), "rope_scaling.type", f"{kind!r} is not supported (yarn only)")
            if kind == "yarn":
                for k in ("factor", "original_max_position_embeddings"):
                    need(k in rs, f"rope_scaling.{k}", "is required for yarn")
        if self.model_type == V4:
            self._validate_v4(need)
        else:
            need(not self.kv_fp8, "kv_fp8", "the FP8 KV cache is DeepSeek-V4's (MLA caches stay in the model dtype)")
            need(not self.index_fp4, "index_fp4", "the FP4 lightning indexer is DeepSeek-V4's")
            self._validate_mla(need)

    def _validate_v4(self, need) -> None:
        for fld in ("head_dim", "o_groups", "o_lora_rank", "sliding_window", "q_lora_rank",
                    "index_n_heads", "index_head_dim", "index_topk"):
            v = getattr(self, fld)
            need(isinstance(v, int) and v > 0, fld, f"must be a positive integer for DeepSeek-V4, got {v!r}")
        need(self.num_key_value_heads == 1, "num_key_value_heads", "DeepSeek-V4 uses one shared KV head")
        need(self.qk_rope_head_dim <= self.head_dim, "qk_rope_head_dim", f"> head_dim={self.head_dim}")
        need(self.qk_rope_head_dim <= self.index_head_dim, "qk_rope_head_dim", f"> index_head_dim={self.index_head_dim}")
        need(self.num_attention_heads % self.o_groups == 0, "o_groups",
             f"num_attention_heads={self.num_attention_heads} is not divisible by o_groups={self.o_groups}")
        nope = self.head_dim - self.qk_rope_head_dim
        need(not self.kv_fp8 or (nope > 0 and nope % min(64, nope) == 0), "kv_fp8",
             f"FP8 KV rounds the non-rope dims in blocks of 64: head_dim - qk_rope_head_dim = {nope}")
        idim = self.index_head_dim
        need(not self.index_fp4 or idim & (idim - 1) == 0, "index_fp4",
             f"the FP4 indexer's Hadamard rotation needs a power-of-two index_head_dim, got {idim}")
        need(self.hc_mult >= 1, "hc_mult", "must be >= 1")
        need(self.hc_sinkhorn_iters >= 1, "hc_sinkhorn_iters", "must be >= 1")
        need(0 <= self.num_hash_layers <= self.num_hidden_layers, "num_hash_layers",
             f"{self.num_hash_layers} is outside [0, num_hidden_layers={self.num_hidden_layers}]")
        n_total = self.num_hidden_layers + self.num_nextn_predict_layers
        if self.compress_ratios is None:
            self.compress_ratios = [0] * n_total
        need(isinstance(self.compress_ratios, list) and all(isinstance(r, int) and r >= 0 for r in self.compress_ratios),
             "compress_ratios", "must be a list of non-negative integers")
        if len(self.compress_ratios) == self.num_hidden_layers and self.num_nextn_predict_layers:
            # transformers-style lists have no MTP entry; the MTP block is sliding-window only.
            self.compress_ratios = list(self.compress_ratios) + [0] * self.num_nextn_predict_layers
        need(len(self.compress_ratios) == n_total, "compress_ratios",
             f"has {len(self.compress_ratios)} entries, expected num_hidden_layers + num_nextn_predict_layers = {n_total}")
        for i, r in enumerate(self.compress_ratios):
            need(r == 0 or r >= 2, f"compress_ratios[{i}]", f"ratio {r} compresses nothing; use 0 for sliding window only")
        need(self.topk_method in ("noaux_tc", "greedy"), "topk_method",
             f"{self.topk_method!r}: DeepSeek-V4 has no group-limited routing")

    def _validate_mla(self, need) -> None:
        for fld in ("kv_lora_rank", "qk_nope_head_dim", "v_head_dim"):
            v = getattr(self, fld)
            need(isinstance(v, int) and v > 0, fld, f"must be a positive integer for MLA models, got {v!r}")
        need(self.q_lora_rank is None or self.q_lora_rank > 0, "q_lora_rank", "must be null or positive")
        if self.first_k_dense_replace > 0:
            need(isinstance(self.intermediate_size, int) and self.intermediate_size > 0, "intermediate_size",
                 "is required when first_k_dense_replace > 0 (dense FFN layers)")
        need(self.first_k_dense_replace <= self.num_hidden_layers, "first_k_dense_replace",
             f"> num_hidden_layers={self.num_hidden_layers}")
        need(self.topk_method in ("noaux_tc", "greedy", "group_limited_greedy"), "topk_method",
             f"{self.topk_method!r} is not noaux_tc, greedy or group_limited_greedy")
        if self.n_group not in (None, 1) or self.topk_method == "group_limited_greedy":
            need(self.n_group is not None and self.n_routed_experts % self.n_group == 0, "n_group",
                 f"n_routed_experts={self.n_routed_experts} is not divisible by n_group={self.n_group}")
            need(self.topk_group is not None and 1 <= self.topk_group <= self.n_group, "topk_group",
                 f"must be in [1, n_group={self.n_group}], got {self.topk_group}")
        need(self.moe_layer_freq >= 1, "moe_layer_freq", "must be >= 1")

    # ------------------------------------------------------------------ rope
    def yarn(self) -> dict | None:
        rs = self.rope_scaling
        if not rs or rs.get("type", rs.get("rope_type")) != "yarn":
            return None
        return rs


# Keys of hub/transformers/inference configs that do not change the computation. They are kept
# in ``extra`` and written back unchanged.
_PASSTHROUGH_KEYS = {
    "architectures", "auto_map", "transformers_version", "torch_dtype", "dtype", "quantization_config",
    "use_cache", "pretraining_tp", "_name_or_path", "ep_size", "output_router_logits",
    "router_aux_loss_coef", "router_jitter_noise", "mlp_bias", "rope_interleave", "num_mtp_layers",
    "max_batch_size", "max_seq_len", "scale_fmt", "scale_dtype", "is_decoder", "output_hidden_states",
    "output_attentions", "return_dict", "chunk_size_feed_forward", "tie_encoder_decoder", "partial_rotary_factor",
    "_attn_implementation_autoset", "generation_config", "model_name", "id2label", "label2id", "qk_head_dim",
    "is_encoder_decoder", "tie_encoder_decoder", "problem_type", "tokenizer_class", "prefix", "sep_token_id",
    "decoder_start_token_id", "task_specific_params", "torchscript", "add_cross_attention",
}
_V4_ONLY = ("head_dim", "o_groups", "o_lora_rank", "sliding_window", "compress_ratios", "compress_rope_theta",
            "index_n_heads", "index_head_dim", "index_topk", "num_hash_layers", "swiglu_limit", "hc_mult",
            "hc_sinkhorn_iters", "hc_eps", "expert_dtype")
_V3_ONLY = ("intermediate_size", "first_k_dense_replace", "moe_layer_freq", "kv_lora_rank", "qk_nope_head_dim",
            "v_head_dim", "n_group", "topk_group")
_SPARSEEK_SWITCHES = ("clamp_shared_expert", "kv_fp8", "index_fp4", "act_fp8")


def _drop_derived_mla(known: dict, extra: dict) -> None:
    """transformers writes two derived MLA fields into V3/V2 configs; check them and drop them."""
    nope, rope = known.get("qk_nope_head_dim"), known.get("qk_rope_head_dim", 64)
    qk = extra.pop("qk_head_dim", None)
    if qk is not None and nope is not None and qk != nope + rope:
        raise ConfigError(f"qk_head_dim={qk} != qk_nope_head_dim + qk_rope_head_dim = {nope + rope}")
    hd = known.pop("head_dim", None)
    if hd is not None and hd != rope:
        raise ConfigError(f"head_dim={hd}: for MLA models transformers sets it to qk_rope_head_dim={rope}")


def _guess_model_type(d: dict) -> str:
    if "compress_ratios" in d or "hc_mult" in d or "o_groups" in d:
        return V4
    if "kv_lora_rank" in d:
        return V3
    raise ConfigError("model_type is missing and the fields match neither DeepSeek-V4 nor V3")


def _nested_rope(d: dict) -> bool:
    rp = d.get("rope_parameters")
    return isinstance(rp, dict) and isinstance(rp.get("main"), dict)


def _normalise_rope_keys(d: dict) -> dict:
    """transformers 5 renamed ``rope_scaling`` to a flat ``rope_parameters`` (V3 layout)."""
    rp = d.pop("rope_parameters", None)
    if rp is not None:
        if not isinstance(rp, dict):
            raise ConfigError("rope_parameters: must be an object")
        rp = dict(rp)
        if "rope_theta" in rp:
            d.setdefault("rope_theta", rp.pop("rope_theta"))
        kind = rp.get("rope_type", rp.get("type", "default"))
        if kind != "default" and "rope_scaling" not in d:
            rp.pop("rope_type", None)
            rp["type"] = kind
            d["rope_scaling"] = rp
    if isinstance(d.get("rope_scaling"), dict):
        rs = dict(d["rope_scaling"])
        if "rope_type" in rs and "type" not in rs:
            rs["type"] = rs.pop("rope_type")
        rs.pop("rope_type", None)
        d["rope_scaling"] = rs
    return d


_INFERENCE_V4 = {
    "dim": "hidden_size", "moe_inter_dim": "moe_intermediate_size", "n_layers": "num_hidden_layers",
    "n_hash_layers": "num_hash_layers", "n_heads": "num_attention_heads", "n_routed_experts": "n_routed_experts",
    "n_shared_experts": "n_shared_experts", "n_activated_experts": "num_experts_per_tok", "score_func": "scoring_func",
    "route_scale": "routed_scaling_factor", "swiglu_limit": "swiglu_limit", "q_lora_rank": "q_lora_rank",
    "head_dim": "head_dim", "rope_head_dim": "qk_rope_head_dim", "o_groups": "o_groups", "o_lora_rank": "o_lora_rank",
    "window_size": "sliding_window", "rope_theta": "rope_theta", "index_n_heads": "index_n_heads",
    "index_head_dim": "index_head_dim", "index_topk": "index_topk", "hc_mult": "hc_mult",
    "hc_sinkhorn_iters": "hc_sinkhorn_iters", "hc_eps": "hc_eps", "compress_rope_theta": "compress_rope_theta",
    "compress_ratios": "compress_ratios", "vocab_size": "vocab_size", "n_mtp_layers": "num_nextn_predict_layers",
    "norm_eps": "rms_norm_eps", "expert_dtype": "expert_dtype",
    # V3 inference names
    "inter_dim": "intermediate_size", "n_dense_layers": "first_k_dense_replace", "n_expert_groups": "n_group",
    "n_limited_groups": "topk_group", "kv_lora_rank": "kv_lora_rank", "qk_nope_head_dim": "qk_nope_head_dim",
    "qk_rope_head_dim": "qk_rope_head_dim", "v_head_dim": "v_head_dim",
}
_INFERENCE_ROPE = {"original_seq_len": "original_max_position_embeddings", "rope_factor": "factor",
                   "beta_fast": "beta_fast", "beta_slow": "beta_slow", "mscale": "mscale"}


def _from_inference_layout(d: dict) -> dict:
    """DeepSeek's ``inference/config.json`` (the ``ModelArgs`` of their reference code)."""
    is_v4 = "compress_ratios" in d or "hc_mult" in d or "o_groups" in d
    out: dict[str, Any] = {"model_type": V4 if is_v4 else V3}
    rope: dict[str, Any] = {}
    extra: dict[str, Any] = {}
    for k, v in d.items():
        if k in _INFERENCE_V4:
            out[_INFERENCE_V4[k]] = v
        elif k in _INFERENCE_ROPE:
            rope[_INFERENCE_ROPE[k]] = v
        elif k == "dtype":
            # "fp8"/"bf16": the weight format of the converted checkpoint, not a model field
            extra["inference_dtype"] = v
        elif k in _PASSTHROUGH_KEYS:
            extra[k] = v
        else:
            raise ConfigError(f"unknown field {k!r} in inference/config.json layout")
    if rope.get("factor", 1) not in (1, 1.0, None):
        rope = {"type": "yarn", **rope}
        if is_v4:
            rope.setdefault("original_max_position_embeddings", 65536)
        else:
            rope.setdefault("original_max_position_embeddings", 4096)
            rope.setdefault("mscale", 1.0)
            rope.setdefault("mscale_all_dim", rope.get("mscale", 1.0))
        rope.setdefault("beta_fast", 32)
        rope.setdefault("beta_slow", 1)
        out["rope_scaling"] = rope
    if not is_v4:
        out.setdefault("scoring_func", "softmax")
        out.setdefault("n_group", 1)
        out.setdefault("topk_group", 1)
        if out.get("n_group", 1) > 1:
            out.setdefault("topk_method", "noaux_tc")
        out.setdefault("num_nextn_predict_layers", 0)
    else:
        out.setdefault("num_nextn_predict_layers", 1)
    out["extra"] = extra
    return out


def _from_transformers_v4_layout(d: dict) -> dict:
    """transformers' ``DeepseekV4Config`` layout back to DeepSeek's own fields."""
    d = dict(d)
    d.setdefault("model_type", V4)
    rates = d.pop("compress_rates", None) or {"compressed_sparse_attention": 4, "heavily_compressed_attention": 128}
    ratio_by_type = {"sliding_attention": 0, **rates}
    layer_types = d.pop("layer_types", None)
    if layer_types is not None:
        bad = [t for t in layer_types if t not in ratio_by_type]
        if bad:
            raise ConfigError(f"layer_types: unknown layer type(s) {bad}")
        ratios = [ratio_by_type[t] for t in layer_types]
        if "compress_ratios" in d and d["compress_ratios"][: len(ratios)] != ratios:
            raise ConfigError("layer_types and compress_ratios disagree")
        d["compress_ratios"] = ratios
    mlp_types = d.pop("mlp_layer_types", None)
    if mlp_types is not None:
        n_hash = 0
        while n_hash < len(mlp_types) and mlp_types[n_hash] == "hash_moe":
            n_hash += 1
        if any(t != "moe" for t in mlp_types[n_hash:]):
            raise ConfigError(
                f"mlp_layer_types: hash_moe layers must come first and the rest be 'moe', got {mlp_types}"
            )
        d["num_hash_layers"] = n_hash
    rp = d.pop("rope_parameters", None)
    if isinstance(rp, dict) and isinstance(rp.get("main"), dict):
        main, comp = dict(rp["main"]), dict(rp.get("compress") or {})
        d["rope_theta"] = main.get("rope_theta", d.get("rope_theta", 10000.0))
        d["compress_rope_theta"] = comp.pop("rope_theta", d.get("compress_rope_theta", 160000.0))
        prf = comp.pop("partial_rotary_factor", None) or main.get("partial_rotary_factor")
        if prf is not None and "head_dim" in d:
            d.setdefault("qk_rope_head_dim", int(round(d["head_dim"] * prf)))
        kind = comp.pop("rope_type", comp.pop("type", "default"))
        comp.pop("type", None)
        af = comp.pop("attention_factor", 1.0)
        if af not in (1, 1.0):
            raise ConfigError("rope_parameters.compress.attention_factor: DeepSeek-V4 uses no YaRN mscale (1.0)")
        if kind == "yarn":
            d["rope_scaling"] = {"type": "yarn", **comp}
        elif kind != "default":
            raise ConfigError(f"rope_parameters.compress.rope_type {kind!r} is not supported")
    elif rp is not None:
        d["rope_parameters"] = rp
    prf = d.pop("partial_rotary_factor", None)
    if prf is not None and "head_dim" in d:
        d.setdefault("qk_rope_head_dim", int(round(d["head_dim"] * prf)))
    return d


# ---------------------------------------------------------------------------- presets
def _v4_flash() -> dict:
    return {
        "architectures": ["DeepseekV4ForCausalLM"], "model_type": V4, "vocab_size": 129280, "hidden_size": 4096,
        "num_hidden_layers": 43, "num_attention_heads": 64, "num_key_value_heads": 1, "head_dim": 512,
        "qk_rope_head_dim": 64, "q_lora_rank": 1024, "o_groups": 8, "o_lora_rank": 1024, "sliding_window": 128,
        "compress_ratios": [0, 0] + [4, 128] * 20 + [4, 0], "compress_rope_theta": 160000.0, "rope_theta": 10000.0,
        "rope_scaling": {"type": "yarn", "factor": 16, "original_max_position_embeddings": 65536,
                         "beta_fast": 32, "beta_slow": 1},
        "max_position_embeddings": 1048576, "index_n_heads": 64, "index_head_dim": 128, "index_topk": 512,
        "n_routed_experts": 256, "n_shared_experts": 1, "num_experts_per_tok": 6, "moe_intermediate_size": 2048,
        "num_hash_layers": 3, "scoring_func": "sqrtsoftplus", "topk_method": "noaux_tc", "norm_topk_prob": True,
        "routed_scaling_factor": 1.5, "swiglu_limit": 10.0, "hc_mult": 4, "hc_sinkhorn_iters": 20, "hc_eps": 1e-6,
        "num_nextn_predict_layers": 1, "rms_norm_eps": 1e-6, "hidden_act": "silu", "attention_bias": False,
        "tie_word_embeddings": False, "bos_token_id": 0, "eos_token_id": 1, "torch_dtype": "bfloat16",
        "quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                "scale_fmt": "ue8m0", "weight_block_size": [128, 128]},
    }


def _v4_pro() -> dict:
    d = _v4_flash()
    d.update(hidden_size=7168, num_hidden_layers=61, num_attention_heads=128, q_lora_rank=1536, o_groups=16,
             compress_ratios=[128, 128] + [4, 128] * 29 + [4, 0], index_topk=1024, n_routed_experts=384,
             moe_intermediate_size=3072, routed_scaling_factor=2.5, expert_dtype="fp4")
    return d


def _v3_671b() -> dict:
    return {
        "architectures": ["DeepseekV3ForCausalLM"], "model_type": V3, "vocab_size": 129280, "hidden_size": 7168,
        "intermediate_size": 18432, "moe_intermediate_size": 2048, "num_hidden_layers": 61,
        "first_k_dense_replace": 3, "num_attention_heads": 128, "num_key_value_heads": 128, "q_lora_rank": 1536,
        "kv_lora_rank": 512, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128,
        "n_routed_experts": 256, "n_shared_experts": 1, "num_experts_per_tok": 8, "n_group": 8, "topk_group": 4,
        "topk_method": "noaux_tc", "scoring_func": "sigmoid", "norm_topk_prob": True, "routed_scaling_factor": 2.5,
        "aux_loss_alpha": 0.001, "seq_aux": True, "moe_layer_freq": 1, "num_nextn_predict_layers": 1,
        "max_position_embeddings": 163840, "rope_theta": 10000.0,
        "rope_scaling": {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096, "beta_fast": 32,
                         "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
        "rms_norm_eps": 1e-6, "hidden_act": "silu", "tie_word_embeddings": False, "bos_token_id": 0,
        "eos_token_id": 1, "torch_dtype": "bfloat16",
        "quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                "weight_block_size": [128, 128]},
    }


def _v2_lite() -> dict:
    return {
        "architectures": ["DeepseekV2ForCausalLM"], "model_type": V2, "vocab_size": 102400, "hidden_size": 2048,
        "intermediate_size": 10944, "moe_intermediate_size": 1408, "num_hidden_layers": 27,
        "first_k_dense_replace": 1, "num_attention_heads": 16, "num_key_value_heads": 16, "q_lora_rank": None,
        "kv_lora_rank": 512, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128,
        "n_routed_experts": 64, "n_shared_experts": 2, "num_experts_per_tok": 6, "n_group": 1, "topk_group": 1,
        "topk_method": "greedy", "scoring_func": "softmax", "norm_topk_prob": False, "routed_scaling_factor": 1.0,
        "aux_loss_alpha": 0.001, "seq_aux": True, "moe_layer_freq": 1, "num_nextn_predict_layers": 0,
        "max_position_embeddings": 163840, "rope_theta": 10000.0,
        "rope_scaling": {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096, "beta_fast": 32,
                         "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707},
        "rms_norm_eps": 1e-6, "hidden_act": "silu", "tie_word_embeddings": False, "bos_token_id": 100000,
        "eos_token_id": 100001, "torch_dtype": "bfloat16",
    }


def _small_v4(vocab: int, d: int, layers: list[int], heads: int, head_dim: int, experts: int, topk: int,
              inter: int, n_hash: int, q_rank: int, o_groups: int, o_rank: int, idx_heads: int, idx_dim: int,
              idx_topk: int, rope_dim: int) -> dict:
    d_ = _v4_flash()
    d_.pop("quantization_config")
    d_.update(vocab_size=vocab, hidden_size=d, num_hidden_layers=len(layers), compress_ratios=layers + [0],
              num_attention_heads=heads, head_dim=head_dim, qk_rope_head_dim=rope_dim, q_lora_rank=q_rank,
              o_groups=o_groups, o_lora_rank=o_rank, index_n_heads=idx_heads, index_head_dim=idx_dim,
              index_topk=idx_topk, n_routed_experts=experts, num_experts_per_tok=topk,
              moe_intermediate_size=inter, num_hash_layers=n_hash, max_position_embeddings=65536,
              torch_dtype="float32", routed_scaling_factor=1.5)
    return d_


PRESETS: dict[str, Any] = {
    "v4-flash": _v4_flash,
    "v4-pro": _v4_pro,
    "v3-671b": _v3_671b,
    "v2-lite": _v2_lite,
    # Small models for a laptop CPU. Every V4 mechanism stays on: SWA, CSA (indexer top-k) and
    # HCA layers, hash-routed first layers, mHC with 4 streams, an MTP block.
    "nano": lambda: _small_v4(vocab=8192, d=256, layers=[0, 4, 128, 4, 128, 4], heads=4, head_dim=64,
                              experts=16, topk=2, inter=128, n_hash=2, q_rank=128, o_groups=2, o_rank=128,
                              idx_heads=4, idx_dim=32, idx_topk=64, rope_dim=16),
    "small": lambda: _small_v4(vocab=32768, d=512, layers=[0, 4, 128, 4, 128, 4, 128, 4], heads=8, head_dim=64,
                               experts=32, topk=4, inter=256, n_hash=2, q_rank=256, o_groups=4, o_rank=256,
                               idx_heads=8, idx_dim=64, idx_topk=128, rope_dim=32),
    # For tests: every layer type with a short window, so short inputs cross many boundaries.
    "debug": lambda: {
        **_small_v4(vocab=512, d=64, layers=[0, 4, 128, 4], heads=4, head_dim=32, experts=8, topk=2, inter=32,
                    n_hash=1, q_rank=32, o_groups=2, o_rank=16, idx_heads=8, idx_dim=16, idx_topk=8, rope_dim=8),
        "sliding_window": 16,
    },
    "debug-v3": lambda: {
        **_v3_671b(), "vocab_size": 512, "hidden_size": 64, "intermediate_size": 96, "moe_intermediate_size": 32,
        "num_hidden_layers": 3, "first_k_dense_replace": 1, "num_attention_heads": 4, "num_key_value_heads": 4,
        "q_lora_rank": 32, "kv_lora_rank": 32, "qk_nope_head_dim": 16, "qk_rope_head_dim": 8, "v_head_dim": 16,
        "n_routed_experts": 8, "num_experts_per_tok": 2, "n_group": 4, "topk_group": 2,
        "max_position_embeddings": 512, "torch_dtype": "float32",
        "rope_scaling": {"type": "yarn", "factor": 4, "original_max_position_embeddings": 128, "beta_fast": 32,
                         "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
        "quantization_config": None,
    },
    "debug-v2": lambda: {
        **_v2_lite(), "vocab_size": 512, "hidden_size": 64, "intermediate_size": 96, "moe_intermediate_size": 32,
        "num_hidden_layers": 3, "first_k_dense_replace": 1, "num_attention_heads": 4, "num_key_value_heads": 4,
        "kv_lora_rank": 32, "qk_nope_head_dim": 16, "qk_rope_head_dim": 8, "v_head_dim": 16,
        "n_routed_experts": 8, "num_experts_per_tok": 2, "n_shared_experts": 2, "max_position_embeddings": 512,
        "torch_dtype": "float32", "bos_token_id": 0, "eos_token_id": 1,
        "rope_scaling": {"type": "yarn", "factor": 4, "original_max_position_embeddings": 128, "beta_fast": 32,
                         "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707},
    },
}


def preset(name: str, **overrides) -> ModelArgs:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; available: {', '.join(sorted(PRESETS))}")
    d = PRESETS[name]()
    d.update(overrides)
    return ModelArgs.from_dict(d)

