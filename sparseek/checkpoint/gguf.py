"""GGUF, llama.cpp's one-file format: read and write DeepSeek V2 / V3 / R1 and V4.

The community publishes DeepSeek quantizations as GGUF (architecture ``deepseek2`` for V2 / V3 / R1,
``deepseek4`` for V4; often split into ``-00001-of-0000N.gguf`` parts). ``load_gguf`` builds the
model such a file describes and decodes each tensor, of any type gguf-py decodes (Q4_K, Q6_K,
IQ2_XXS, MXFP4, ...), into the compute dtype; its tokenizer comes from the file's vocabulary.
``save_gguf`` writes a sparseek model for llama.cpp in the types gguf-py encodes (F32, F16, BF16,
Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, MXFP4).

V4 (llama.cpp's conversion/deepseek.py): the official tensor names map one to one (``attn.wkv`` ->
``attn_kv``, ``hc_attn_fn`` -> ``hc_attn_fn.weight``, ``ffn.gate.tid2eid`` -> an I32 tensor ...), no
tensor is reshaped; the hyper-connection, compressor and indexer-weight tensors stay F32; the MTP
block goes to a separate draft file, so a model read from one has none. llama.cpp clamps V4's shared
expert at ``swiglu_clamp_shexp`` (0: not at all), which sparseek reads as ``clamp_shared_expert``.

What llama.cpp's converter does to DeepSeek V2 / V3, and so what this module undoes:
* ``kv_b_proj`` is split per head into ``attn_k_b`` [H, kv_lora, nope] (transposed: absorbed
  attention multiplies by it directly) and ``attn_v_b`` [H, v, kv_lora]; older files keep one
  ``attn_kv_b`` (and no ``key_length_mla``);
* routed experts are stacked, ``ffn_{gate,up}_exps`` [E, I, D] and ``ffn_down_exps`` [E, D, I]: our layout;
* the rope dims are not permuted (llama.cpp's "NORM" rope rotates adjacent pairs, as DeepSeek's own code);
* the MTP layer is dropped, so a model read from GGUF has none (speculative decoding needs safetensors);
* YaRN's ``mscale_all_dim`` is written as ``yarn_log_multiplier`` = 0.1 * mscale_all_dim, and
  ``mscale`` is not written (llama.cpp takes the two as equal, which DeepSeek's configs are).
Weights are not kept in GGUF's block formats in memory: sparseek has no kernels for them, so a
Q4_K file costs the memory of its dequantized weights (``quantize="fp8"|"fp4"`` shrinks it again).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import tempfile

import numpy as np
import torch
from torch import nn

from sparseek.checkpoint.io import CheckpointError, report_problems
from sparseek.config import CSA_RATIO, V2, V3, ModelArgs
from sparseek.model import build_model
from sparseek.model.common import Experts

log = logging.getLogger("sparseek")
ARCH, ARCH_V4 = "deepseek2", "deepseek4"

# model tensor (inside layer L) -> GGUF tensor (inside blk.L); wkv_b is two GGUF tensors, see above
_GLOBAL = {"embed.weight": "token_embd.weight", "norm.weight": "output_norm.weight", "head.weight": "output.weight"}
_LAYER = {
    "attn_norm.weight": "attn_norm.weight",
    "attn.wq.weight": "attn_q.weight",
    "attn.wq_a.weight": "attn_q_a.weight",
    "attn.q_norm.weight": "attn_q_a_norm.weight",
    "attn.wq_b.weight": "attn_q_b.weight",
    "attn.wkv_a.weight": "attn_kv_a_mqa.weight",
    "attn.kv_norm.weight": "attn_kv_a_norm.weight",
    "attn.wo.weight": "attn_output.weight",
    "ffn_norm.weight": "ffn_norm.weight",
    "ffn.w1.weight": "ffn_gate.weight",
    "ffn.w3.weight": "ffn_up.weight",
    "ffn.w2.weight": "ffn_down.weight",
    "ffn.gate.weight": "ffn_gate_inp.weight",
    "ffn.gate.bias": "exp_probs_b.bias",
    "ffn.experts.w1": "ffn_gate_exps.weight",
    "ffn.experts.w3": "ffn_up_exps.weight",
    "ffn.experts.w2": "ffn_down_exps.weight",
    "ffn.shared_experts.w1.weight": "ffn_gate_shexp.weight",
    "ffn.shared_experts.w3.weight": "ffn_up_shexp.weight",
    "ffn.shared_experts.w2.weight": "ffn_down_shexp.weight",
}
_KV_B = "attn.wkv_b.weight"
# DeepSeek-V4 (llama.cpp's conversion/deepseek.py): the official names one to one, no reshaping;
# hash layers carry tid2eid (I32) and no router bias, compressors / indexers only where the layer has them.
_GLOBAL_V4 = {**_GLOBAL, "hc_head_fn": "output_hc_fn.weight", "hc_head_base": "output_hc_base.weight",
              "hc_head_scale": "output_hc_scale.weight"}
_LAYER_V4 = {
    "attn_norm.weight": "attn_norm.weight",
    "attn.attn_sink": "attn_sinks.weight",
    "attn.wq_a.weight": "attn_q_a.weight",
    "attn.q_norm.weight": "attn_q_a_norm.weight",
    "attn.wq_b.weight": "attn_q_b.weight",
    "attn.wkv.weight": "attn_kv.weight",
    "attn.kv_norm.weight": "attn_kv_a_norm.weight",
    "attn.wo_a.weight": "attn_output_a.weight",
    "attn.wo_b.weight": "attn_output_b.weight",
    **{f"hc_{part}_{k}": f"hc_{part}_{k}.weight" for part in ("attn", "ffn") for k in ("fn", "base", "scale")},
    "attn.compressor.wkv.weight": "attn_compressor_kv.weight",
    "attn.compressor.wgate.weight": "attn_compressor_gate.weight",
    "attn.compressor.ape": "attn_compressor_ape.weight",
    "attn.compressor.norm.weight": "attn_compressor_norm.weight",
    "attn.indexer.weights_proj.weight": "indexer.proj.weight",
    "attn.indexer.wq_b.weight": "indexer.attn_q_b.weight",
    "attn.indexer.compressor.wkv.weight": "indexer_compressor_kv.weight",
    "attn.indexer.compressor.wgate.weight": "indexer_compressor_gate.weight",
    "attn.indexer.compressor.ape": "indexer_compressor_ape.weight",
    "attn.indexer.compressor.norm.weight": "indexer_compressor_norm.weight",
    "ffn.gate.tid2eid": "ffn_gate_tid2eid.weight",
    **{k: v for k, v in _LAYER.items() if k.startswith(("ffn_norm", "ffn.gate.", "ffn.experts", "ffn.shared"))},
}
# the big matrices: what a GGUF type other than F32 applies to (the rest stays F32, as the converter keeps them)
_QUANTIZABLE_V4 = ("token_embd.weight", "output.weight", "attn_q_a.weight", "attn_q_b.weight", "attn_kv.weight",
                   "attn_output_a.weight", "attn_output_b.weight", "indexer.attn_q_b.weight", "_exps.weight",
                   "_shexp.weight", "nextn.eh_proj.weight")
_SPLIT = re.compile(r"^(.*)-(\d{5})-of-(\d{5})\.gguf$")


def _gguf():
    try:
        import gguf
    except ImportError as e:  # a runtime dependency; only a broken install lacks it
        raise ImportError("GGUF files need the `gguf` package (pip install gguf)") from e
    return gguf


# ---------------------------------------------------------------------------- reading
class GGUFFile:
    """One GGUF model, possibly split into parts: its metadata and its tensors (memory-mapped)."""

    def __init__(self, path: str):
        gguf = _gguf()
        self.path = os.fspath(path)
        self.parts = split_parts(self.path)
        self.meta: dict = {}
        self.tensors: dict = {}
        for i, part in enumerate(self.parts):
            try:
                reader = gguf.GGUFReader(part)
            except (ValueError, OSError, IndexError) as e:
                raise CheckpointError(f"{part} is not a readable GGUF file: {e}") from None
            if i == 0:
                self.meta = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
            for t in reader.tensors:
                self.tensors[t.name] = t

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(int(n) for n in reversed(self.tensors[name].shape.tolist()))  # GGUF lists dims innermost first

    def type_name(self, name: str) -> str:
        return self.tensors[name].tensor_type.name

    def read(self, name: str, rows: slice | None = None) -> torch.Tensor:
        """The tensor decoded to float32, integers to int64 (``rows``: a slice of its outermost dim, e.g. some experts)."""
        gguf = _gguf()
        t = self.tensors[name]
        data = t.data if rows is None else t.data[rows]
        if t.tensor_type.name in ("I8", "I16", "I32", "I64"):  # V4's tid2eid: token -> expert ids
            return torch.from_numpy(np.array(data, dtype=np.int64))
        arr = np.ascontiguousarray(gguf.quants.dequantize(data, t.tensor_type), dtype=np.float32)
        return torch.from_numpy(arr if arr.flags.writeable else arr.copy())  # F32 tensors come back memory-mapped


def split_parts(path: str) -> list[str]:
    """The files of a split model, given its first part (``name-00001-of-00003.gguf``), else [path]."""
    m = _SPLIT.match(os.path.basename(path))
    if not m:
        return [path]
    if int(m.group(2)) != 1:
        raise CheckpointError(f"{path} is part {int(m.group(2))} of a split GGUF model: load its first part, "
                              f"{m.group(1)}-00001-of-{m.group(3)}.gguf")
    n = int(m.group(3))
    parts = [os.path.join(os.path.dirname(path), f"{m.group(1)}-{i:05d}-of-{m.group(3)}.gguf") for i in range(1, n + 1)]
    lost = [p for p in parts if not os.path.isfile(p)]
    if lost:
        raise CheckpointError(f"split GGUF model {path}: {len(lost)} of its {n} parts are missing: "
                              + ", ".join(os.path.basename(p) for p in lost))
    return parts


def find_gguf(directory: str) -> str | None:
    """The GGUF model in a folder without config.json (one file, or the first part of a split one)."""
    # a V4 model's MTP draft file and a vision projector (llama.cpp's mmproj) sit beside the model
    names = sorted(f for f in os.listdir(directory) if f.endswith(".gguf") and not f.startswith(("mtp-", "mmproj")))
    firsts = [f for f in names if not (m := _SPLIT.match(f)) or int(m.group(2)) == 1]
    if not firsts:
        return None
    if len(firsts) > 1:
        raise CheckpointError(f"{directory} holds several GGUF models ({', '.join(firsts)}): name one file")
    return os.path.join(directory, firsts[0])


def stored_dtype(meta: dict) -> str:
    """The dtype a GGUF file's weights decode to by default: float32 for an all-F32 file, else bf16."""
    return "float32" if int(meta.get("general.file_type", 1)) == 0 else "bfloat16"


def args_from_gguf(meta: dict, tensors) -> ModelArgs:
    """ModelArgs from a deepseek2 / deepseek4 GGUF's metadata (``tensors``: its tensor names, which tell a few
    things the metadata does not: the router's bias, a separate output head)."""
    arch = meta.get("general.architecture")
    if arch not in (ARCH, ARCH_V4):
        raise CheckpointError(f"GGUF architecture {arch!r} is not DeepSeek's ({ARCH!r}: V2, V3, R1 and their "
                              f"fine-tunes; {ARCH_V4!r}: V4); sparseek reads no other")
    missing = object()

    def key(name, default=missing):
        v = meta.get(f"{arch}.{name}", default)
        if v is missing:
            raise CheckpointError(f"GGUF metadata {arch}.{name} is missing")
        return v

    if arch == ARCH_V4:
        return _args_v4(meta, key)

    d = _read_keys(_V3_KEYS, key)
    rope = d["qk_rope_head_dim"]
    nope_mla, v_mla = key("attention.key_length_mla", None), key("attention.value_length_mla", None)
    if nope_mla is None:  # files from before the k_b / v_b split: key_length = nope + rope per head
        nope, v = int(key("attention.key_length")) - rope, int(key("attention.value_length"))
    else:
        nope, v = int(nope_mla) - rope, int(v_mla)
    sigmoid = int(key("expert_gating_func", 1)) == 2  # llama.cpp's default for V2 files: softmax
    n_group = int(key("expert_group_count", 1) or 1)
    biased = f"blk.{d['first_k_dense_replace']}.exp_probs_b.bias" in tensors
    tokens = meta.get("tokenizer.ggml.tokens")
    vocab = int(key("vocab_size", len(tokens) if tokens else 0))
    if not vocab:
        raise CheckpointError(f"GGUF metadata has neither {ARCH}.vocab_size nor tokenizer.ggml.tokens")
    q_rank = key("attention.q_lora_rank", None)
    d.update({
        "model_type": V3 if sigmoid else V2,
        "vocab_size": vocab,
        "num_key_value_heads": d["num_attention_heads"],
        "q_lora_rank": int(q_rank) if q_rank else None,
        "qk_nope_head_dim": nope,
        "v_head_dim": v,
        "n_group": n_group,
        "topk_group": int(key("expert_group_used_count", 1) or 1),
        "topk_method": "noaux_tc" if biased else ("group_limited_greedy" if n_group > 1 else "greedy"),
        "scoring_func": "sigmoid" if sigmoid else "softmax",
        "norm_topk_prob": bool(key("expert_weights_norm", False)),
        "num_nextn_predict_layers": 0,  # the converter drops the MTP layer
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
        "tie_word_embeddings": False,
        "torch_dtype": stored_dtype(meta),
    })
    scaling = key("rope.scaling.type", None)
    if scaling == "yarn":
        ms = round(float(key("rope.scaling.yarn_log_multiplier", 0.0)) / 0.1, 6)
        d["rope_scaling"] = {"type": "yarn", "factor": float(key("rope.scaling.factor")),
                             "original_max_position_embeddings": int(key("rope.scaling.original_context_length")),
                             "beta_fast": float(key("rope.scaling.yarn_beta_fast", 32.0)),
                             "beta_slow": float(key("rope.scaling.yarn_beta_slow", 1.0)),
                             "mscale": ms, "mscale_all_dim": ms}
    elif scaling not in (None, "none"):
        raise CheckpointError(f"GGUF rope scaling {scaling!r}: DeepSeek models use 'yarn' or none")
    return ModelArgs.from_dict(d)


# ModelArgs fields <-> GGUF keys ({arch}.key) in the value types llama.cpp's loaders check, with
# the default llama.cpp takes where a file has none (_REQUIRED: none)
_REQUIRED = object()
_SHARED_KEYS = [
    ("hidden_size", "embedding_length", int, _REQUIRED), ("num_hidden_layers", "block_count", int, _REQUIRED),
    ("max_position_embeddings", "context_length", int, _REQUIRED),
    ("num_attention_heads", "attention.head_count", int, _REQUIRED),
    ("qk_rope_head_dim", "rope.dimension_count", int, _REQUIRED), ("n_routed_experts", "expert_count", int, _REQUIRED),
    ("num_experts_per_tok", "expert_used_count", int, _REQUIRED),
    ("moe_intermediate_size", "expert_feed_forward_length", int, _REQUIRED),
    ("n_shared_experts", "expert_shared_count", int, 1), ("rope_theta", "rope.freq_base", float, 10000.0),
    ("rms_norm_eps", "attention.layer_norm_rms_epsilon", float, 1e-6),
    ("routed_scaling_factor", "expert_weights_scale", float, 1.0),
]
_V3_KEYS = _SHARED_KEYS + [
    ("intermediate_size", "feed_forward_length", int, _REQUIRED),
    ("first_k_dense_replace", "leading_dense_block_count", int, 0),
    ("kv_lora_rank", "attention.kv_lora_rank", int, _REQUIRED),
]
_V4_KEYS = _SHARED_KEYS + [
    ("head_dim", "attention.key_length", int, _REQUIRED), ("q_lora_rank", "attention.q_lora_rank", int, _REQUIRED),
    ("o_groups", "attention.output_group_count", int, _REQUIRED),
    ("o_lora_rank", "attention.output_lora_rank", int, _REQUIRED),
    ("sliding_window", "attention.sliding_window", int, _REQUIRED),
    ("index_n_heads", "attention.indexer.head_count", int, _REQUIRED),
    ("index_head_dim", "attention.indexer.key_length", int, _REQUIRED),
    ("index_topk", "attention.indexer.top_k", int, _REQUIRED), ("num_hash_layers", "hash_layer_count", int, _REQUIRED),
    ("hc_mult", "hyper_connection.count", int, _REQUIRED),
    ("hc_sinkhorn_iters", "hyper_connection.sinkhorn_iterations", int, _REQUIRED),
    ("compress_rope_theta", "attention.compress_rope_freq_base", float, _REQUIRED),
    ("hc_eps", "hyper_connection.epsilon", float, _REQUIRED), ("norm_topk_prob", "expert_weights_norm", bool, _REQUIRED),
]


def _read_keys(table, key) -> dict:
    return {field: kind(key(name) if default is _REQUIRED else key(name, default)) for field, name, kind, default in table}


def _write_keys(w, arch: str, table, args: ModelArgs) -> None:
    add = {int: w.add_uint32, float: w.add_float32, bool: w.add_bool}
    for field, name, kind, _ in table:
        add[kind](f"{arch}.{name}", kind(getattr(args, field)))


def _args_v4(meta: dict, key) -> ModelArgs:
    layers = int(key("block_count"))
    if int(key("expert_gating_func")) != 4:
        raise CheckpointError(f"GGUF {ARCH_V4}.expert_gating_func = {key('expert_gating_func')}: DeepSeek-V4 routes "
                              "with sqrtsoftplus (4)")
    if int(key("nextn_predict_layers", 0)):
        raise CheckpointError("this GGUF file holds DeepSeek-V4's MTP block (llama.cpp's --mtp draft file): load the "
                              "main model's file")
    clamp = [float(x) for x in np.atleast_1d(key("swiglu_clamp_exp"))]
    shexp = [float(x) for x in np.atleast_1d(key("swiglu_clamp_shexp", clamp))]
    if len(set(clamp)) > 1 or len(set(shexp)) > 1:
        raise CheckpointError(f"GGUF SwiGLU clamps differ by layer ({sorted(set(clamp))}); DeepSeek-V4 has one limit")
    ratios = [int(r) for r in key("attention.compress_ratios")]
    if len(ratios) < layers:
        raise CheckpointError(f"GGUF {ARCH_V4}.attention.compress_ratios has {len(ratios)} entries for {layers} layers")
    tokens = meta.get("tokenizer.ggml.tokens")
    d = _read_keys(_V4_KEYS, key)
    d.update({
        "model_type": "deepseek_v4",
        "vocab_size": int(key("vocab_size", len(tokens) if tokens else 0)) or None,
        "num_key_value_heads": 1,
        "compress_ratios": ratios[:layers],
        "scoring_func": "sqrtsoftplus",
        "topk_method": "noaux_tc",
        "swiglu_limit": clamp[0],
        # llama.cpp clamps the shared expert too unless its limit is 0
        "clamp_shared_expert": shexp[0] > 1e-6,
        "num_nextn_predict_layers": 0,  # the converter writes the MTP block to a separate file
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
        "torch_dtype": stored_dtype(meta),
    })
    if not d["vocab_size"]:
        raise CheckpointError(f"GGUF metadata has neither {ARCH_V4}.vocab_size nor tokenizer.ggml.tokens")
    if key("rope.scaling.type", None) == "yarn":
        d["rope_scaling"] = {"type": "yarn", "factor": float(key("rope.scaling.factor")),
                             "original_max_position_embeddings": int(key("rope.scaling.original_context_length")),
                             "beta_fast": float(key("rope.scaling.yarn_beta_fast", 32.0)),
                             "beta_slow": float(key("rope.scaling.yarn_beta_slow", 1.0))}
    return ModelArgs.from_dict(d)


def _layer_param(param: str) -> tuple[str, str] | None:
    m = re.match(r"^layers\.(\d+)\.(.*)$", param)
    return (m.group(1), m.group(2)) if m else None


# V4's MTP block in llama.cpp's draft file (``--mtp``): block num_hidden_layers, its e_proj and h_proj
# side by side in one eh_proj [D, 2D], its HC head as the file's output_hc_*
_MTP_V4 = {"enorm.weight": "nextn.enorm.weight", "hnorm.weight": "nextn.hnorm.weight",
           "norm.weight": "nextn.shared_head_norm.weight", "e_proj.weight": "nextn.eh_proj.weight",
           "h_proj.weight": "nextn.eh_proj.weight"}


def gguf_names(param: str, v4: bool = False, n_layers: int | None = None) -> list[str]:
    """The GGUF tensors that make up one model tensor (two for V3's ``wkv_b``, none when unknown);
    V4's ``mtp.0.*`` (given ``n_layers``) name tensors of llama.cpp's MTP draft file."""
    glob, layer_names = (_GLOBAL_V4, _LAYER_V4) if v4 else (_GLOBAL, _LAYER)
    if param in glob:
        return [glob[param]]
    m = re.match(r"^mtp\.0\.(.*)$", param)
    if m and v4 and n_layers is not None:
        rest = m.group(1)
        if rest in ("hc_head_fn", "hc_head_base", "hc_head_scale"):
            return [_GLOBAL_V4[rest]]
        name = _MTP_V4.get(rest) or layer_names.get(rest)
        return [f"blk.{n_layers}.{name}"] if name else []
    lp = _layer_param(param)
    if lp is None:
        return []
    layer, rest = lp
    if rest == _KV_B and not v4:
        return [f"blk.{layer}.attn_k_b.weight", f"blk.{layer}.attn_v_b.weight"]
    return [f"blk.{layer}.{layer_names[rest]}"] if rest in layer_names else []


def _mtp_file(f: GGUFFile, args: ModelArgs, mtp) -> "GGUFFile | None":
    """llama.cpp's V4 MTP draft file for the model in ``f`` (see ``load_gguf``), checked to fit it."""
    if mtp is False or not args.is_v4:
        if mtp not in (None, False):
            raise CheckpointError("an MTP draft file goes with a DeepSeek-V4 GGUF model (llama.cpp keeps V3's MTP nowhere)")
        return None
    if mtp is None or mtp is True:
        guess = os.path.join(os.path.dirname(f.path), "mtp-" + os.path.basename(f.path))
        if not os.path.isfile(guess):
            if mtp is True:
                raise CheckpointError(f"no MTP draft file beside {f.path} (looked for {guess})")
            return None
        mtp = guess
    draft = GGUFFile(mtp)
    n = args.num_hidden_layers
    meta = draft.meta
    if meta.get("general.architecture") != ARCH_V4 or int(meta.get(f"{ARCH_V4}.nextn_predict_layers", 0)) != 1 \
            or int(meta.get(f"{ARCH_V4}.block_count", 0)) != n + 1:
        raise CheckpointError(f"{mtp} is not the MTP draft file of this {n}-layer DeepSeek-V4 model (a deepseek4 "
                              f"file with nextn_predict_layers = 1 and block_count = {n + 1})")
    log.info("MTP block from %s", mtp)
    return draft


def _kv_b_shapes(args: ModelArgs) -> dict[str, tuple[int, ...]]:
    h, r = args.num_attention_heads, args.kv_lora_rank
    return {"attn_k_b": (h, r, args.qk_nope_head_dim), "attn_v_b": (h, args.v_head_dim, r),
            "attn_kv_b": (h * (args.qk_nope_head_dim + args.v_head_dim), r)}


def load_gguf(path: "str | GGUFFile", dtype: torch.dtype | None = None, device="cpu", overrides: dict | None = None,
              prepare=None, quantize: str | None = None, mtp: "str | bool | None" = None) -> nn.Module:
    """Build the model a deepseek2 / deepseek4 GGUF file describes and fill it, one tensor decoded at a time.

    ``prepare(model)`` runs on the meta device before any tensor is read, as for safetensors (an
    expert-sharded rank then decodes only its experts' rows). ``quantize="fp8"|"fp4"`` quantizes
    each layer as soon as it is decoded (``sparseek.quant``: FP8 linears, experts in that format),
    so the decoded model never exists whole; an MXFP4 file's experts keep their values exactly in FP4.
    ``mtp``: V4's MTP block from llama.cpp's draft file (its converter's ``--mtp``): a path, or by
    default the ``mtp-<name>`` file beside this one when there is one (False: none)."""
    f = path if isinstance(path, GGUFFile) else GGUFFile(path)
    path = f.path
    args = args_from_gguf(f.meta, f.tensors)
    draft = _mtp_file(f, args, mtp)
    if draft is not None:
        ratios = [int(r) for r in draft.meta[f"{ARCH_V4}.attention.compress_ratios"]]
        args = args.replace(num_nextn_predict_layers=1, compress_ratios=ratios[:args.num_hidden_layers + 1])
    if overrides:
        args = args.replace(**overrides)
    if dtype is None:
        dtype = getattr(torch, stored_dtype(f.meta))
    with torch.device("meta"):
        model = build_model(args, dtype=dtype)
    if prepare is not None:
        model = prepare(model) or model
    span = {f"{n}.{p}": (getattr(m, "first", 0), m.n) for n, m in model.named_modules() if isinstance(m, Experts)
            for p in ("w1", "w2", "w3")}
    expected = model.state_dict()
    want_kv_b = {} if args.is_v4 else _kv_b_shapes(args)
    used: dict[int, set] = {id(f): set(), id(draft): set()}
    missing, bad_shape, sources = [], [], {}
    for pname, ref in expected.items():
        src = draft if pname.startswith("mtp.") and draft is not None else f
        names = gguf_names(pname, args.is_v4, args.num_hidden_layers)
        if pname == "head.weight" and names[0] not in f.tensors and "token_embd.weight" in f.tensors:
            names = ["token_embd.weight"]  # no output tensor: llama.cpp ties the head to the embedding
        if len(names) == 2 and names[0] not in src.tensors:
            names = [names[0].replace("attn_k_b", "attn_kv_b")]  # before the split
        if not names or any(n not in src.tensors for n in names):
            missing.append(f"{pname} (GGUF {' + '.join(names) or '?'}{' in ' + src.path if src is draft else ''})")
            continue
        half = {"e_proj.weight": 0, "h_proj.weight": 1}.get(pname.removeprefix("mtp.0.")) if src is draft else None
        for n in names:
            kind = n.split(".")[2] if n.startswith("blk.") else None
            want = (None if args.is_v4 else want_kv_b.get(kind)) or tuple(ref.shape)
            if pname in span:
                want = (args.n_routed_experts, *ref.shape[1:])
            if half is not None:
                want = (ref.shape[0], 2 * ref.shape[1])
            if src.shape(n) != want:
                bad_shape.append(f"{n}: file {list(src.shape(n))} ({src.type_name(n)}), model expects {list(want)}")
        used[id(src)].update(names)
        sources[pname] = (src, names, half)
    unexpected = [n for n in f.tensors if n not in used[id(f)] and n != "rope_freqs.weight"]
    if draft is not None:  # the draft file repeats the embedding, the final norm and the head
        unexpected += [f"{n} in {draft.path}" for n in draft.tensors if n not in used[id(draft)]
                       and n not in ("token_embd.weight", "output_norm.weight", "output.weight")]
    if missing or unexpected or bad_shape:
        raise CheckpointError(report_problems(f"GGUF model {path}", missing, unexpected, bad_shape))

    def decoded(pname: str, ref: torch.Tensor) -> torch.Tensor:
        src, names, half = sources[pname]
        if pname in span:
            first = span[pname][0]
            t = src.read(names[0], slice(first, first + ref.shape[0]))
        elif len(names) == 2:  # k_b [H, r, nope] and v_b [H, v, r] back into kv_b [H * (nope + v), r]
            k_b, v_b = src.read(names[0]), src.read(names[1])
            t = torch.cat([k_b.transpose(1, 2), v_b], dim=1).reshape(ref.shape)
        else:
            t = src.read(names[0])
            if half is not None:  # e_proj | h_proj side by side
                t = t.chunk(2, dim=1)[half]
        return t.to(ref.dtype)

    # Layer by layer, so that with ``quantize`` one decoded layer at a time is ever held beside the
    # quantized model (a V4-Flash GGUF decoded whole would be ~570 GB in bf16).
    groups: dict[str, list[str]] = {}
    for pname in expected:
        lp = _layer_param(pname)
        block = re.match(r"^mtp\.\d+", pname)
        groups.setdefault(f"layers.{lp[0]}" if lp else block.group(0) if block else "", []).append(pname)
    fmt = None
    if quantize is not None:
        from sparseek.quant.modules import default_scale_format, quantize_model_

        fmt = default_scale_format(model)
    for prefix, pnames in groups.items():
        module = model.get_submodule(prefix) if prefix else model
        cut = len(prefix) + 1 if prefix else 0
        module.load_state_dict({p[cut:]: decoded(p, expected[p]) for p in pnames}, assign=True, strict=bool(prefix))
        if quantize is not None and prefix:
            quantize_model_(module, experts=quantize, linears="fp8", scale_fmt=fmt)
    left = [n for n, t in model.state_dict().items() if t.is_meta]
    if left:  # the checks above make this unreachable; a model with a tensor never filled must not run
        raise CheckpointError(f"GGUF model {path}: tensors left unfilled: {left[:8]}")
    model.gguf_types = {p: src.type_name(n[0]) for p, (src, n, _) in sources.items()}
    model = model.to(device)
    for m in model.modules():
        if isinstance(m, Experts):
            m.fuse_gate_up_()
    return model


# ---------------------------------------------------------------------------- tokenizer
# llama.cpp's pre-tokenizers (llama-vocab.cpp) as ``tokenizers`` splits: the names a GGUF gives in
# tokenizer.ggml.pre. DeepSeek V3 / R1 ("deepseek-v3"), V2 ("deepseek-llm"), GPT-2's ("gpt-2": ours).
_DEEPSEEK_V3_SPLITS = [
    r"\p{N}{1,3}",
    "[\u4e00-\u9fa5\u3040-\u309f\u30a0-\u30ff]+",
    # as DeepSeek's tokenizer.json writes it (literal CR / LF), so that detection compares strings
    "[!\"#$%&'()*+,\\-./:;<=>?@\\[\\\\\\]^_`{|}~][A-Za-z]+|[^\r\n\\p{L}\\p{P}\\p{S}]?[\\p{L}\\p{M}]+"
    "| ?[\\p{P}\\p{S}]+[\r\n]*|\\s*[\r\n]+|\\s+(?!\\S)|\\s+",
]
_DEEPSEEK_LLM_SPLITS = [  # llama-vocab.cpp's, in escapes: normalising its letters would break the ranges
    '[\r\n]',
    '\\s?[A-Za-z\xb5\xc0-\xd6\xd8-\xf6\xf8-\u01ba\u01bc-\u01bf\u01c4-\u0293\u0295-\u02af\u0370-\u0373'
    '\u0376\u0377\u037b-\u037d\u037f\u0386\u0388-\u038a\u038c\u038e-\u03a1\u03a3-\u03f5\u03f7-\u0481'
    '\u048a-\u052f\u0531-\u0556\u10a0-\u10c5\u13a0-\u13f5\u13f8-\u13fd\u1c90-\u1cba\u1cbd-\u1cbf\u1d00-'
    '\u1d2b\u1d6b-\u1d77\u1d79-\u1d9a\u1e00-\u1f15\u1f18-\u1f1d\u1f20-\u1f45\u1f48-\u1f4d\u1f50-\u1f57'
    '\u1f59\u1f5b\u1f5d\u1f5f-\u1f7d\u1f80-\u1fb4\u1fb6-\u1fbc\u1fbe\u1fc2-\u1fc4\u1fc6-\u1fcc\u1fd0-'
    '\u1fd3\u1fd6-\u1fdb\u1fe0-\u1fec\u1ff2-\u1ff4\u1ff6-\u1ffc\u2102\u2107\u210a-\u2113\u2115\u2119-'
    '\u211d\u2124\u2126\u2128\u212a-\u212d\u212f-\u2134\u2139\u213c-\u213f\u2145-\u2149\u214e\u2183'
    '\u2184\u2c00-\u2c7b\u2c7e-\u2ce4\u2ceb-\u2cee\u2cf2\u2cf3\ua640-\ua66d\ua680-\ua69b\ua722-\ua76f'
    '\ua771-\ua787\ua78b-\ua78e\uab70-\uabbf\ufb00-\ufb06\ufb13-\ufb17\uff21-\uff3a\uff41-\uff5a'
    '\U00010400-\U0001044f\U000104b0-\U000104d3\U000104d8-\U000104fb\U00010c80-\U00010cb2\U00010cc0-'
    '\U00010cf2\U000118a0-\U000118df\U0001e900-\U0001e943]+',
    '\\s?[!-/:-~\uff01-\uff0f\uff1a-\uff5e\u2018-\u201f\u3000-\u3002]+',
    '\\s+$',
    '[\u4e00-\u9fa5\u0800-\u4e00\uac00-\ud7ff]+',
    '\\p{N}+',
]
PRE_TOKENIZERS = {"deepseek-v3": _DEEPSEEK_V3_SPLITS, "deepseek-llm": _DEEPSEEK_LLM_SPLITS, "gpt-2": None}
# names llama.cpp gives the same splits (DeepSeek-V4's vocabulary hashes to "joyai-llm" in its converter)
_PRE_ALIASES = {"joyai-llm": "deepseek-v3"}
_CONTROL, _USER_DEFINED = 3, 4


def _pre_tokenizer(pre: str):
    from tokenizers import Regex, pre_tokenizers

    pre = _PRE_ALIASES.get(pre, pre)
    if pre not in PRE_TOKENIZERS:
        raise CheckpointError(f"GGUF pre-tokenizer {pre!r} is not one sparseek rebuilds ({', '.join(PRE_TOKENIZERS)}): "
                              "put the model's tokenizer.json beside the file")
    splits = PRE_TOKENIZERS[pre]
    if splits is None:
        return pre_tokenizers.ByteLevel(add_prefix_space=False)
    return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(s), behavior="isolated") for s in splits]
                                   + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


def tokenizer_from_gguf(meta: dict):
    """The byte-level BPE tokenizer a GGUF's vocabulary describes (tokens, merges, token types,
    BOS / EOS, chat template), or None when the file has none."""
    from tokenizers import AddedToken, decoders, models
    from tokenizers import Tokenizer as HFTokenizer

    from sparseek.tokenizer import Tokenizer

    kind = meta.get("tokenizer.ggml.model")
    if kind in (None, "none", "no_vocab"):
        return None
    if kind != "gpt2":
        raise CheckpointError(f"GGUF tokenizer model {kind!r}: sparseek rebuilds byte-level BPE ('gpt2') only; "
                              "put the model's tokenizer.json beside the file")
    tokens = list(meta["tokenizer.ggml.tokens"])
    types = list(meta.get("tokenizer.ggml.token_type") or [1] * len(tokens))
    vocab: dict[str, int] = {}
    for i, tok in enumerate(tokens):
        vocab.setdefault(tok, i)  # a duplicate keeps its first id, as llama.cpp's lookup does
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges") or []]
    tk = HFTokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    tk.pre_tokenizer = _pre_tokenizer(meta.get("tokenizer.ggml.pre", "gpt-2"))
    tk.decoder = decoders.ByteLevel()
    tk.add_special_tokens([AddedToken(t, special=True, normalized=False)
                           for t, ty in zip(tokens, types) if ty == _CONTROL])
    tk.add_tokens([AddedToken(t, special=False, normalized=False) for t, ty in zip(tokens, types) if ty == _USER_DEFINED])

    def token(key):
        i = meta.get(key)
        return tokens[int(i)] if i is not None and 0 <= int(i) < len(tokens) else None

    # V4's chat format is sparseek's own (thinking modes, DSML tool calls), not the file's Jinja rendering of it
    template = None if meta.get("general.architecture") == ARCH_V4 else meta.get("tokenizer.chat_template")
    return Tokenizer(tk, bos_token=token("tokenizer.ggml.bos_token_id"), eos_token=token("tokenizer.ggml.eos_token_id"),
                     chat_template=template)


def _pre_name(tk) -> str:
    """Which of llama.cpp's pre-tokenizers a ``tokenizers`` tokenizer uses (refused when none)."""
    pre = json.loads(tk.to_str()).get("pre_tokenizer") or {}
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2"
    if pre.get("type") == "Sequence":
        parts = pre.get("pretokenizers", [])
        regexes = [p.get("pattern", {}).get("Regex") for p in parts if p.get("type") == "Split"]
        for name, splits in PRE_TOKENIZERS.items():
            if splits == regexes and parts[-1].get("type") == "ByteLevel" and len(parts) == len(splits) + 1:
                return name
    raise CheckpointError("the tokenizer's pre-tokenizer is none of llama.cpp's that sparseek writes "
                          f"({', '.join(PRE_TOKENIZERS)}): {json.dumps(pre)[:200]}")


def _vocab_fields(tokenizer, vocab_size: int) -> dict:
    """tokenizer.ggml.* for a byte-level BPE tokenizer, padded to the model's vocabulary with
    unused tokens as llama.cpp's converter does ([PAD<id>])."""
    tk = tokenizer.tk
    j = json.loads(tk.to_str())
    if j["model"].get("type") != "BPE" or (j.get("decoder") or {}).get("type") != "ByteLevel":
        raise CheckpointError("GGUF export needs a byte-level BPE tokenizer")
    id_to_tok = {i: t for t, i in tk.get_vocab(with_added_tokens=True).items()}
    if max(id_to_tok) >= vocab_size:
        raise CheckpointError(f"the tokenizer has ids up to {max(id_to_tok)}, beyond the model's vocab_size {vocab_size}")
    added = {a["id"]: a for a in j.get("added_tokens", [])}
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in id_to_tok:
            tokens.append(f"[PAD{i}]")
            types.append(5)
        else:
            tokens.append(id_to_tok[i])
            types.append(1 if i not in added else _CONTROL if added[i].get("special") else _USER_DEFINED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in j["model"].get("merges", [])]
    return {"pre": _pre_name(tk), "tokens": tokens, "types": types, "merges": merges}


# ---------------------------------------------------------------------------- writing
GGUF_TYPES = ("f32", "f16", "bf16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0", "mxfp4")
# general.file_type (llama_ftype) of each; "mxfp4": routed experts in MXFP4 (V4's own format), other matrices Q8_0
_ENDS = ("token_embd.weight", "output.weight")
_FILE_TYPE = {"f32": 0, "f16": 1, "q4_0": 2, "q4_1": 3, "q8_0": 7, "q5_0": 8, "q5_1": 9, "bf16": 32, "mxfp4": 38}


def _tensor_type(name: str, shape: tuple[int, ...], qtype: str, v4: bool = False):
    """The GGML type one tensor is written in: 1-D tensors and the router in F32 (as llama.cpp's
    converter), for V4 also the hyper-connection, compressor and indexer-weight tensors; the output
    head no lower than Q8_0 (llama-quantize keeps it high too); rows that do not fill whole blocks
    in F16 (the converter's fallback)."""
    gguf = _gguf()
    T = gguf.GGMLQuantizationType
    if len(shape) == 1 or name.endswith(("ffn_gate_inp.weight", "exp_probs_b.bias")) or qtype == "f32":
        return T.F32
    if v4 and not name.endswith(_QUANTIZABLE_V4):
        return T.F32
    if qtype == "mxfp4":  # DeepSeek's own layout, as llama.cpp converts it: FP4 experts, FP8 linears, bf16 ends
        qtype = "mxfp4" if name.endswith("_exps.weight") else "bf16" if name in _ENDS else "q8_0"
    if name == "output.weight" and qtype.startswith(("q4", "q5")):  # llama-quantize keeps the head high too
        qtype = "q8_0"
    t = T[qtype.upper()]
    block = gguf.GGML_QUANT_SIZES[t][0]
    return t if shape[-1] % block == 0 else T.F16


def _decoders(model: nn.Module) -> dict:
    """Model tensor name -> (shape, a function giving it in float32, int32 for tid2eid): a
    layer kept quantized in memory (``sparseek.quant``: DeepSeek's FP8 / FP4) is decoded only when
    its turn to be written comes, so exporting never holds the model decoded whole."""
    from sparseek.quant.modules import QuantExperts, QuantLinear

    sd = model.state_dict()
    out = {}
    for mname, m in model.named_modules():
        if isinstance(m, QuantLinear):
            out[f"{mname}.weight"] = ((m.out_features, m.in_features), lambda m=m: m.dequantize(torch.float32))
        elif isinstance(m, QuantExperts):
            for w in m.shapes:
                out[f"{mname}.{w}"] = ((m.n, *m.shapes[w]), lambda m=m, w=w: m.decoded(w, torch.float32))
    quantized = {k for name in out for k in (name, name + "_scale", name.removesuffix(".weight") + ".scale")}
    for k, v in sd.items():
        if k not in quantized:
            out[k] = (tuple(v.shape), lambda v=v, k=k: v.detach().to(torch.int32 if k.endswith("tid2eid") else torch.float32))
    return out


def _gguf_tensors(model: nn.Module, decode: dict):
    """(GGUF name, shape, function giving the tensor) for every tensor of the model but its MTP
    block, in file order."""
    args: ModelArgs = model.args
    out = []
    for pname in sorted((p for p in decode if not p.startswith("mtp.")), key=_file_order):
        shape, get = decode[pname]
        if pname.endswith(_KV_B) and not args.is_v4:
            h, nope, v, r = args.num_attention_heads, args.qk_nope_head_dim, args.v_head_dim, args.kv_lora_rank

            def part(get=get, k: bool = True):
                kv = get().view(h, nope + v, r)
                return kv[:, :nope].transpose(1, 2) if k else kv[:, nope:]

            k_name, v_name = gguf_names(pname)
            out += [(k_name, (h, r, nope), lambda part=part: part(k=True)),
                    (v_name, (h, v, r), lambda part=part: part(k=False))]
            continue
        names = gguf_names(pname, args.is_v4)
        if not names:
            raise CheckpointError(f"{pname} has no GGUF name in llama.cpp's DeepSeek layout")
        out.append((names[0], shape, get))
    return out


def _gguf_mtp_tensors(model: nn.Module, decode: dict):
    """The tensors of llama.cpp's V4 MTP draft file: the embedding, final norm and head, the MTP
    block as block num_hidden_layers (its e_proj | h_proj as one eh_proj) and its HC head."""
    n = model.args.num_hidden_layers
    out = [(gguf_names(p, True)[0], *decode[p]) for p in ("embed.weight", "norm.weight", "head.weight")]
    for pname in sorted((p for p in decode if p.startswith("mtp.0.") and not p.endswith("h_proj.weight")),
                        key=_file_order):
        shape, get = decode[pname]
        if pname.endswith("e_proj.weight"):  # e first, as the converter
            shape = (shape[0], 2 * shape[1])
            get = lambda e=get, h=decode["mtp.0.h_proj.weight"][1]: torch.cat([e(), h()], dim=1)  # noqa: E731
        names = gguf_names(pname, True, n)
        if not names:
            raise CheckpointError(f"{pname} has no GGUF name in llama.cpp's DeepSeek-V4 MTP layout")
        out.append((names[0], shape, get))
    return out


def _file_order(pname: str):
    lp = _layer_param(pname)
    return (1, int(lp[0]), pname) if lp else (0 if pname.startswith("embed") else 2, 0, pname)


def save_gguf(model: nn.Module, path: str, tokenizer=None, qtype: str = "f16", name: str | None = None,
              split_max_bytes: int | None = None, mtp: bool = False) -> dict:
    """Write a DeepSeek model (and its tokenizer) as a GGUF file for llama.cpp, atomically: V2 / V3
    / R1 as ``deepseek2``, V4 as ``deepseek4``. ``split_max_bytes`` splits it into
    ``<stem>-0000i-of-0000N.gguf`` parts of at most that size (the hub takes files up to 50 GB).
    The MTP block is not in it (llama.cpp keeps V4's in a separate draft file, V3's nowhere); with
    ``mtp`` a V4 model's goes to ``mtp-<name>.gguf`` beside it, as llama.cpp's converter writes it
    (``--mtp``), which ``load_gguf`` then finds. Returns {"files": [paths], "types": {tensor:
    GGML type}}."""
    args: ModelArgs = model.args
    if qtype not in GGUF_TYPES:
        raise ValueError(f"unknown GGUF type {qtype!r}; use one of {GGUF_TYPES}")
    if mtp and not (args.is_v4 and len(model.mtp)):
        raise CheckpointError("mtp=True writes a DeepSeek-V4 model's MTP block, and this model has none")
    if args.is_v4 and (args.index_head_dim % 64 or CSA_RATIO not in args.compress_ratios[:args.num_hidden_layers]):
        log.warning("llama.cpp's deepseek4 rotates the lightning indexer's keys by Hadamard matrices of 64 and up and "
                    "keeps an indexer cache: it cannot run a model with index_head_dim=%d or without CSA (ratio-4) "
                    "layers (sparseek can)", args.index_head_dim)
    if not args.is_v4 and not args.q_lora_rank and args.num_hidden_layers not in (26, 27):
        log.warning("llama.cpp tells a V2 model without q_lora_rank (V2-Lite) by its 26 or 27 layers: it will "
                    "not load this %d-layer one (sparseek will)", args.num_hidden_layers)
    vocab = _vocab_fields(tokenizer, args.vocab_size) if tokenizer is not None else None
    if vocab is None:
        log.warning("no tokenizer: the GGUF file carries no vocabulary (llama.cpp can run it on token ids only)")
    path = os.path.abspath(os.fspath(path))
    if not path.endswith(".gguf"):
        raise ValueError(f"a GGUF file's name ends in .gguf: {path}")
    directory = os.path.dirname(path)
    os.makedirs(directory, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".sparseek-gguf-", dir=directory)  # files appear together or not at all
    types: dict[str, str] = {}
    try:
        decode = _decoders(model)
        out = [(os.path.basename(path), args, _gguf_tensors(model, decode), {})]
        if mtp:  # the draft file: L + 1 blocks, the last the MTP block
            draft_args = args.replace(num_hidden_layers=args.num_hidden_layers + 1, num_nextn_predict_layers=0)
            out.append(("mtp-" + os.path.basename(path), draft_args, _gguf_mtp_tensors(model, decode),
                        {f"{ARCH_V4}.nextn_predict_layers": 1}))
        for fname, file_args, tensors, extra in out:
            types.update(_write_file(os.path.join(tmp, fname), file_args, tensors, extra, qtype, name or "sparseek",
                                     vocab, tokenizer, split_max_bytes))
        files = []
        for f in sorted(os.listdir(tmp), key=lambda n: (n.startswith("mtp-"), n)):
            os.replace(os.path.join(tmp, f), os.path.join(directory, f))
            files.append(os.path.join(directory, f))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"files": files, "types": types}


def _write_file(path: str, args: ModelArgs, tensors, extra: dict, qtype: str, name: str, vocab, tokenizer,
                split_max_bytes: int | None) -> dict[str, str]:
    gguf = _gguf()
    w = gguf.GGUFWriter(path, ARCH_V4 if args.is_v4 else ARCH, split_max_size=split_max_bytes or 0)
    _write_general(w, qtype, name)
    (_write_metadata_v4 if args.is_v4 else _write_metadata)(w, args)
    for key, value in extra.items():
        w.add_uint32(key, value)
    if vocab is None:
        w.add_tokenizer_model("none")
    else:
        _write_vocab(w, vocab, tokenizer, args)
    # tensor infos first (shapes and types are known without decoding), then the data one tensor
    # at a time: only one decoded tensor is ever held
    plan = []
    T = gguf.GGMLQuantizationType
    for tname, shape, get in tensors:
        t = T.I32 if tname.endswith("tid2eid.weight") else _tensor_type(tname, shape, qtype, args.is_v4)
        block, size = gguf.GGML_QUANT_SIZES[t]
        nbytes = math.prod(shape) // block * size
        w.add_tensor_info(tname, shape, np.dtype(np.int32 if t == T.I32 else np.float32), nbytes,
                          raw_dtype=None if t in (T.F32, T.I32) else t)
        plan.append((tname, get, t))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    types = {}
    for tname, get, t in plan:
        arr = get().contiguous().numpy()
        if t in (T.F32, T.I32):
            data = arr
        elif t == T.F16:
            data = arr.astype(np.float16)
        else:
            data = gguf.quants.quantize(arr, t)
        w.write_tensor_data(data)
        types[tname] = t.name
    w.close()
    return types


def _write_general(w, qtype: str, name: str) -> None:
    gguf = _gguf()
    w.add_type(gguf.GGUFType.MODEL)
    w.add_name(name)
    w.add_file_type(_FILE_TYPE[qtype])
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _write_metadata(w, args: ModelArgs) -> None:
    gguf = _gguf()
    _write_keys(w, ARCH, _V3_KEYS, args)
    w.add_vocab_size(args.vocab_size)
    w.add_head_count_kv(1)  # MLA: one latent "head" shared by all
    if args.q_lora_rank:
        w.add_q_lora_rank(args.q_lora_rank)
    # MLA as llama.cpp runs it: MQA over the latent (key = latent + rope) ...
    w.add_key_length(args.kv_lora_rank + args.qk_rope_head_dim)
    w.add_value_length(args.kv_lora_rank)
    # ... decompressed per head by attn_k_b / attn_v_b
    w.add_key_length_mla(args.qk_nope_head_dim + args.qk_rope_head_dim)
    w.add_value_length_mla(args.v_head_dim)
    if args.norm_topk_prob:  # as the converter: absent means false
        w.add_expert_weights_norm(True)
    if args.scoring_func not in ("sigmoid", "softmax"):
        raise CheckpointError(f"scoring_func {args.scoring_func!r} has no GGUF gating function (sigmoid, softmax)")
    w.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID if args.scoring_func == "sigmoid"
                             else gguf.ExpertGatingFuncType.SOFTMAX)
    if args.n_group is not None:
        w.add_expert_group_count(args.n_group)
    if args.topk_group is not None:
        w.add_expert_group_used_count(args.topk_group)
    y = args.yarn()
    if y:
        ms, ms_all = y.get("mscale", 1.0), y.get("mscale_all_dim", 0.0)
        if ms and ms_all and abs(ms - ms_all) > 1e-6:
            raise CheckpointError(f"YaRN mscale {ms} != mscale_all_dim {ms_all}: GGUF stores one of them "
                                  "(llama.cpp takes them equal)")
        _write_yarn(w, y)
        w.add_rope_scaling_yarn_log_mul(0.1 * float(ms_all or 0.0))


def _write_yarn(w, y: dict) -> None:
    gguf = _gguf()
    w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
    w.add_rope_scaling_factor(float(y["factor"]))
    w.add_rope_scaling_orig_ctx_len(int(y["original_max_position_embeddings"]))
    w.add_rope_scaling_yarn_beta_fast(float(y.get("beta_fast", 32)))
    w.add_rope_scaling_yarn_beta_slow(float(y.get("beta_slow", 1)))


def _write_metadata_v4(w, args: ModelArgs) -> None:
    """llama.cpp's deepseek4 keys (conversion/deepseek.py), in the exact value types its loader
    checks (u32 / f32 / bool; the per-layer clamps as f32 arrays)."""
    k = f"{ARCH_V4}."
    n = args.num_hidden_layers
    if args.scoring_func != "sqrtsoftplus" or args.hc_mult != 4:
        raise CheckpointError("llama.cpp's deepseek4 runs sqrtsoftplus routing with 4 hyper-connection streams; this "
                              f"model has {args.scoring_func!r} and hc_mult={args.hc_mult}")
    _write_keys(w, ARCH_V4, _V4_KEYS, args)
    for name, v in (("attention.head_count_kv", 1), ("expert_gating_func", 4),
                    ("attention.value_length", args.head_dim), ("embedding_length_out", args.hidden_size * args.hc_mult)):
        w.add_uint32(k + name, int(v))
    limit = float(args.swiglu_limit or 0.0)
    w.add_array(k + "swiglu_clamp_exp", [limit] * n)
    # llama.cpp clamps the shared expert at this limit, or not at all at 0 (DeepSeek's reference leaves it unclamped)
    w.add_array(k + "swiglu_clamp_shexp", [limit if args.clamp_shared_expert else 0.0] * n)
    w.add_array(k + "attention.compress_ratios", [int(r) for r in args.compress_ratios])
    y = args.yarn()
    if y:
        _write_yarn(w, y)


def _write_vocab(w, vocab: dict, tokenizer, args: ModelArgs) -> None:
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(vocab["pre"])
    w.add_token_list(vocab["tokens"])
    w.add_token_types(vocab["types"])
    w.add_token_merges(vocab["merges"])
    if tokenizer.bos_id is not None:
        w.add_bos_token_id(tokenizer.bos_id)
    if tokenizer.eos_id is not None:
        w.add_eos_token_id(tokenizer.eos_id)
        w.add_pad_token_id(args.pad_token_id if args.pad_token_id is not None else tokenizer.eos_id)
    # DeepSeek's tokenizer_config asks for BOS, and sparseek's engine adds it by default too
    w.add_add_bos_token(tokenizer.bos_id is not None)
    w.add_add_eos_token(False)
    if tokenizer.chat_template:
        w.add_chat_template(tokenizer.chat_template)
    elif args.is_v4:  # V4's format as Jinja, for llama.cpp's chat and the apps built on it
        from sparseek.tokenizer.chat import v4_jinja_template

        w.add_chat_template(v4_jinja_template())
