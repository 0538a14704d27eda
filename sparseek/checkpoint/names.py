"""State-dict adapters: checkpoint tensor names <-> the model's parameter names.

Inside sparseek every weight has DeepSeek's official name (``layers.3.attn.wq_a.weight``) except
the routed experts, which are stacked per layer (``layers.3.ffn.experts.w1`` [E, I, D]).

Names we read:
* V4 official (the published checkpoint, what ``save`` writes): ``embed.weight``,
  ``layers.L.attn.kv_norm.weight``, ``layers.L.ffn.experts.E.w1.weight``, ``hc_head_fn``, ``mtp.0.*``;
* V4 as transformers writes it (``model.`` prefix, ``embed_tokens``, ``attn.norm`` ...) and as it
  names modules (``self_attn.q_a_proj``, ``compressor.indexer.scorer.weights_proj``, fused
  ``experts.gate_up_proj`` ...);
* V3/V2 hub names (``model.layers.L.self_attn.kv_a_proj_with_mqa.weight``, ``mlp.experts.E.gate_proj``),
  which is also what ``save`` writes for those families (the format transformers loads). V3's MTP
  layer sits after the main ones (``model.layers.61.*`` in V3 / R1: ``enorm``, ``hnorm``, ``eh_proj``,
  ``shared_head.norm``, a decoder layer, and copies of the embedding and head) and is ``mtp.0.*``
  here (``shared_head.norm`` -> ``mtp.0.norm``).
Quantization companions (``.scale``, ``.weight_scale_inv``) follow their weight.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_V4_RULES = [
    (r"^model\.", ""),
    (r"^embed_tokens\.", "embed."),
    (r"^lm_head\.", "head."),
    (r"^hc_head\.hc_(fn|base|scale)$", r"hc_head_\1"),
    (r"\.self_attn\.", ".attn."),
    (r"\.mlp\.", ".ffn."),
    (r"\.attn\.compressor\.indexer\.q_b_proj\.", ".attn.indexer.wq_b."),
    (r"\.attn\.compressor\.indexer\.scorer\.weights_proj\.", ".attn.indexer.weights_proj."),
    (r"\.attn\.compressor\.indexer\.", ".attn.indexer.compressor."),
    (r"\.compressor\.kv_proj\.", ".compressor.wkv."),
    (r"\.compressor\.gate_proj\.", ".compressor.wgate."),
    (r"\.compressor\.position_bias$", ".compressor.ape"),
    (r"\.compressor\.kv_norm\.", ".compressor.norm."),
    (r"\.attn\.q_a_proj\.", ".attn.wq_a."),
    (r"\.attn\.q_a_norm\.", ".attn.q_norm."),
    (r"\.attn\.q_b_proj\.", ".attn.wq_b."),
    (r"\.attn\.kv_proj\.", ".attn.wkv."),
    (r"\.attn\.o_a_proj\.", ".attn.wo_a."),
    (r"\.attn\.o_b_proj\.", ".attn.wo_b."),
    (r"\.attn\.sinks$", ".attn.attn_sink"),
    (r"\.attn\.norm\.weight$", ".attn.kv_norm.weight"),  # how transformers writes kv_norm back
    (r"\.input_layernorm\.", ".attn_norm."),
    (r"\.post_attention_layernorm\.", ".ffn_norm."),
    (r"\.(attn|ffn)_hc\.(fn|base|scale)$", r".hc_\1_\2"),
    (r"\.gate\.e_score_correction_bias$", ".gate.bias"),
    (r"\.(shared_experts|experts\.\d+)\.gate_proj\.", r".\1.w1."),
    (r"\.(shared_experts|experts\.\d+)\.up_proj\.", r".\1.w3."),
    (r"\.(shared_experts|experts\.\d+)\.down_proj\.", r".\1.w2."),
    (r"weight_scale_inv$", "scale"),
]

# V3/V2: hub (transformers) names -> DeepSeek's inference names, and back for saving.
_V3_PAIRS = [
    ("self_attn.q_proj", "attn.wq"),
    ("self_attn.q_a_proj", "attn.wq_a"),
    ("self_attn.q_a_layernorm", "attn.q_norm"),
    ("self_attn.q_b_proj", "attn.wq_b"),
    ("self_attn.kv_a_proj_with_mqa", "attn.wkv_a"),
    ("self_attn.kv_a_layernorm", "attn.kv_norm"),
    ("self_attn.kv_b_proj", "attn.wkv_b"),
    ("self_attn.o_proj", "attn.wo"),
    ("input_layernorm", "attn_norm"),
    ("post_attention_layernorm", "ffn_norm"),
    ("mlp.gate.e_score_correction_bias", "ffn.gate.bias"),
    ("mlp.gate", "ffn.gate"),
    ("mlp.gate_proj", "ffn.w1"),
    ("mlp.up_proj", "ffn.w3"),
    ("mlp.down_proj", "ffn.w2"),
    ("mlp.shared_experts.gate_proj", "ffn.shared_experts.w1"),
    ("mlp.shared_experts.up_proj", "ffn.shared_experts.w3"),
    ("mlp.shared_experts.down_proj", "ffn.shared_experts.w2"),
]
_EXPERT_RE = re.compile(r"^(.*\.ffn\.experts)\.(\d+)\.(w[123])\.(weight|scale)$")
_FUSED_RE = re.compile(r"^(.*\.experts)\.(gate_up_proj|down_proj)$")


@dataclass(frozen=True)
class Target:
    """Where one checkpoint tensor goes in the model."""

    param: str  # model parameter/buffer name
    expert: int | None = None  # slice of a stacked expert tensor
    part: str = "weight"  # "weight" or "scale" (quantization companion)
    fused: str | None = None  # "gate_up" / "down": transformers' fused [E, ...] expert tensors


def canonical_v4(name: str) -> str:
    for pat, rep in _V4_RULES:
        name = re.sub(pat, rep, name)
    return name


def canonical_v3(name: str, mtp_start: int | None = None) -> str:
    """``mtp_start``: the first MTP layer's index (``num_hidden_layers``); its layers become ``mtp.K``."""
    name = re.sub(r"^model\.", "", name)
    name = re.sub(r"^embed_tokens\.", "embed.", name)
    name = re.sub(r"^lm_head\.", "head.", name)
    m = re.match(r"^layers\.(\d+)\.(.*)$", name)
    if m:
        layer, rest = int(m.group(1)), m.group(2)
        rest = re.sub(r"^mlp\.experts\.(\d+)\.gate_proj\.", r"ffn.experts.\1.w1.", rest)
        rest = re.sub(r"^mlp\.experts\.(\d+)\.up_proj\.", r"ffn.experts.\1.w3.", rest)
        rest = re.sub(r"^mlp\.experts\.(\d+)\.down_proj\.", r"ffn.experts.\1.w2.", rest)
        rest = re.sub(r"^mlp\.experts\.", "ffn.experts.", rest)
        for hf, ours in sorted(_V3_PAIRS, key=lambda p: -len(p[0])):
            if rest == hf or rest.startswith(hf + "."):
                rest = ours + rest[len(hf):]
                break
        if mtp_start is not None and layer >= mtp_start:
            rest = re.sub(r"^shared_head\.norm\.", "norm.", rest)
            name = f"mtp.{layer - mtp_start}.{rest}"
        else:
            name = f"layers.{layer}.{rest}"
    return re.sub(r"weight_scale_inv$", "scale", name)


def hub_name_v3(name: str, mtp_start: int | None = None) -> str:
    """Inverse of ``canonical_v3`` for saving (per-expert names, transformers' layout)."""
    if name in ("embed.weight",):
        return "model.embed_tokens.weight"
    if name == "head.weight":
        return "lm_head.weight"
    if name == "norm.weight":
        return "model.norm.weight"
    m = re.match(r"^(layers\.\d+)\.(.*)$", name)
    k = re.match(r"^mtp\.(\d+)\.(.*)$", name)
    if k and mtp_start is not None:
        head, rest = f"layers.{mtp_start + int(k.group(1))}", k.group(2)
        if re.match(r"^(enorm|hnorm|eh_proj|embed_tokens|shared_head)\.", rest):
            return f"model.{head}.{rest}"
        if rest.startswith("norm."):
            return f"model.{head}.shared_head.{rest}"
    elif m:
        head, rest = m.groups()
    else:
        raise KeyError(name)
    e = re.match(r"^ffn\.experts\.(\d+)\.(w[123])\.(.*)$", rest)
    if e:
        proj = {"w1": "gate_proj", "w2": "down_proj", "w3": "up_proj"}[e.group(2)]
        return f"model.{head}.mlp.experts.{e.group(1)}.{proj}.{e.group(3)}"
    for hf, ours in sorted(_V3_PAIRS, key=lambda p: -len(p[1])):
        if rest == ours or rest.startswith(ours + "."):
            return f"model.{head}.{hf}{rest[len(ours):]}"
    raise KeyError(name)


def target_of(name: str, family_v4: bool, stacked: set[str], mtp_start: int | None = None) -> Target:
    """Map a checkpoint tensor name onto the model (``stacked``: names of stacked expert params;
    ``mtp_start``: V3's first MTP layer index)."""
    canon = canonical_v4(name) if family_v4 else canonical_v3(name, mtp_start)
    f = _FUSED_RE.match(canon)
    if f and f.group(1).replace(".mlp.", ".ffn.") + ".w1" in stacked:
        base = f.group(1).replace(".mlp.", ".ffn.")
        return Target(base + (".w1" if f.group(2) == "gate_up_proj" else ".w2"), fused=f.group(2))
    e = _EXPERT_RE.match(canon)
    if e and f"{e.group(1)}.{e.group(3)}" in stacked:
        return Target(f"{e.group(1)}.{e.group(3)}", expert=int(e.group(2)), part=e.group(4))
    if canon.endswith(".scale") and not canon.endswith(("_scale", "hc_head_scale")):
        return Target(canon[: -len(".scale")] + ".weight", part="scale")
    return Target(canon)


def checkpoint_names(param: str, shape: tuple[int, ...], stacked: set[str], family_v4: bool,
                     mtp_start: int | None = None) -> list[tuple[str, int | None]]:
    """The published tensor names of one model tensor: (name, expert index or None)."""
    if param in stacked:
        prefix, w = param.rsplit(".", 1)
        part = "weight"
        if w.endswith("_scale"):  # a quantized stack's scales (sparseek.quant.QuantExperts)
            w, part = w[: -len("_scale")], "scale"
        names = [(f"{prefix}.{e}.{w}.{part}", e) for e in range(shape[0])]
    else:
        names = [(param, None)]
    if not family_v4:
        # V3 / V2 checkpoints name a weight's scale `weight_scale_inv` (it multiplies all the same)
        names = [(re.sub(r"\.scale$", ".weight_scale_inv", hub_name_v3(n, mtp_start)), e) for n, e in names]
    return names
