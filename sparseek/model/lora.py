"""LoRA adapters as module swaps: on attention projections and on every routed expert.

``add_lora(model, rank, alpha, targets)`` freezes the model and swaps the targeted ``nn.Linear``
modules for ``LoRALinear`` and the ``Experts`` modules for ``LoRAExperts`` (one low-rank pair per
expert and matrix, stacked like the experts themselves). ``save_adapters`` writes only the adapter
tensors (safetensors + JSON config); ``load_adapters`` puts them back on a fresh model;
``merge_lora`` folds them into the base weights and swaps the plain modules back in, so a merged
model is an ordinary checkpoint again.

An adapter directory names its base model (``base_model_name_or_path``, PEFT's field), so
``sparseek.load(adapter_dir)`` (and every CLI verb's ``-m adapter_dir``) loads the base and merges
the adapters: inference then runs at the base model's speed, with no adapter math per token.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from sparseek.model.common import Experts

ADAPTER_FILE = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
# attention projections by DeepSeek's names (V4 and V3/MLA); "experts" means all routed experts
DEFAULT_TARGETS = ("wq_a", "wq_b", "wkv", "wo_a", "wo_b", "wq", "wkv_a", "wkv_b", "wo", "experts")


class LoRALinear(nn.Module):
    """y = base(x) + scale * (x A^T) B^T, with B initialized to zero (so training starts from base)."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__()
        self.base = base
        self.scale = alpha / rank
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, dtype=base.weight.dtype,
                                               device=base.weight.device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, dtype=base.weight.dtype,
                                               device=base.weight.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    @property
    def weight(self) -> torch.Tensor:
        # code that reads `.weight` directly (the grouped output projection) sees the adapted matrix
        return self.base.weight + self.scale * self.lora_B @ self.lora_A

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.scale * ((x @ self.lora_A.t()) @ self.lora_B.t())

    def merged(self) -> nn.Linear:
        with torch.no_grad():  # the update summed in fp32 and rounded once, whatever the base dtype
            w = self.base.weight
            w.copy_(w.float() + self.scale * (self.lora_B.float() @ self.lora_A.float()))
        return self.base


class LoRAExperts(Experts):
    """Routed experts with one low-rank update per expert and matrix."""

    def __init__(self, base: Experts, rank: int, alpha: float):
        nn.Module.__init__(self)
        self.n, self.limit = base.n, base.limit
        self.w1, self.w2, self.w3 = base.w1, base.w2, base.w3
        self.scale = alpha / rank
        for name in ("w1", "w2", "w3"):
            w = getattr(base, name)
            a = torch.empty(self.n, rank, w.shape[2], dtype=w.dtype, device=w.device)
            for e in range(self.n):
                nn.init.kaiming_uniform_(a[e], a=math.sqrt(5))
            setattr(self, f"lora_A_{name}", nn.Parameter(a))
            setattr(self, f"lora_B_{name}", nn.Parameter(torch.zeros(self.n, w.shape[1], rank, dtype=w.dtype,
                                                                     device=w.device)))

    def proj(self, x: torch.Tensor, e: int, name: str) -> torch.Tensor:
        a, b = getattr(self, f"lora_A_{name}")[e], getattr(self, f"lora_B_{name}")[e]
        return super().proj(x, e, name) + self.scale * ((x @ a.t()) @ b.t())

    def merged(self) -> Experts:
        with torch.no_grad():
            for name in ("w1", "w2", "w3"):
                a, b = getattr(self, f"lora_A_{name}"), getattr(self, f"lora_B_{name}")
                w = getattr(self, name)
                w.copy_(w.float() + self.scale * torch.bmm(b.float(), a.float()))
        return Experts.wrap(self.w1, self.w2, self.w3, self.limit)


def _targets(model: nn.Module, targets) -> list[tuple[nn.Module, str, nn.Module, str]]:
    """(parent, attribute, module, qualified name) of every module the targets name."""
    found = []
    for parent_name, parent in model.named_modules():
        for name, child in parent.named_children():
            qualified = f"{parent_name}.{name}" if parent_name else name
            if isinstance(child, Experts) and not isinstance(child, LoRAExperts) and "experts" in targets:
                found.append((parent, name, child, qualified))
            elif isinstance(child, nn.Linear) and name in targets and ".attn" in f".{parent_name}".replace(
                    "self_attn", "attn") and "compressor" not in parent_name and "indexer" not in parent_name:
                found.append((parent, name, child, qualified))
    return found


def _refuse_quantized(model: nn.Module) -> None:
    from sparseek.quant.modules import QuantExperts, QuantLinear

    if any(isinstance(m, (QuantLinear, QuantExperts)) for m in model.modules()):
        # they keep FP8/FP4 bytes, which adapters cannot sit on (QLoRA is not built)
        raise ValueError("LoRA needs the model's weights unquantized: load it without quantize=... "
                         "(sparseek.load(..., lora=..., quantize='fp8'|'fp4') quantizes after merging)")


def add_lora(model: nn.Module, rank: int = 8, alpha: float = 16.0, targets=DEFAULT_TARGETS) -> nn.Module:
    """Freeze the model and attach adapters; returns the model (changed in place)."""
    for p in model.parameters():
        p.requires_grad_(False)
    _refuse_quantized(model)
    swaps = _targets(model, set(targets))
    if not swaps:
        raise ValueError(f"no module matches the LoRA targets {list(targets)}")
    for parent, name, child, _ in swaps:
        new = LoRAExperts(child, rank, alpha) if isinstance(child, Experts) else LoRALinear(child, rank, alpha)
        setattr(parent, name, new)
    model.lora_config = {"rank": rank, "alpha": alpha, "targets": list(targets)}
    return model


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items() if "lora_" in k}


def save_adapters(model: nn.Module, directory: str, base: str | None = None, tokenizer=None) -> None:
    """Write the adapters (safetensors + PEFT-style JSON config naming ``base``, the base model's
    directory or preset) into ``directory``; each file is written aside and renamed into place, so
    an interrupted save leaves the previous adapters whole."""
    os.makedirs(directory, exist_ok=True)
    cfg = {"peft_type": "LORA", "r": model.lora_config["rank"], "lora_alpha": model.lora_config["alpha"],
           "target_modules": model.lora_config["targets"]}
    if base is not None:
        cfg["base_model_name_or_path"] = os.path.abspath(base) if os.path.isdir(base) else base
    tmp = tempfile.mkdtemp(prefix=".adapters-", dir=directory)
    try:
        save_file(adapter_state(model), os.path.join(tmp, ADAPTER_FILE))
        with open(os.path.join(tmp, ADAPTER_CONFIG), "w", encoding="utf-8") as f:
            json.dump(cfg, f, indent=2)
        if tokenizer is not None:
            tokenizer.save(tmp)
        # the weights first: a config in place always describes the weights beside it or newer ones
        names = [ADAPTER_FILE] + sorted(n for n in os.listdir(tmp) if n != ADAPTER_FILE)
        for name in names:
            os.replace(os.path.join(tmp, name), os.path.join(directory, name))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def is_adapter_dir(path: str) -> bool:
    """An adapter directory: adapters without a model of their own (no config.json)."""
    return os.path.isfile(os.path.join(path, ADAPTER_CONFIG)) and not os.path.isfile(os.path.join(path, "config.json"))


def adapter_base(directory: str) -> str:
    """The base model an adapter directory was trained on (a checkpoint directory or a preset)."""
    cfg = _adapter_config(directory)
    base = cfg.get("base_model_name_or_path")
    if not base:
        raise ValueError(f"{directory}/{ADAPTER_CONFIG} names no base model (base_model_name_or_path): load the "
                         f"base and pass the adapters separately (sparseek.load(base, lora={directory!r}), --lora)")
    if not os.path.isabs(base) and not os.path.exists(base) and os.path.isdir(os.path.join(directory, base)):
        base = os.path.join(directory, base)  # a path relative to the adapters
    return base


def _adapter_config(directory: str) -> dict:
    path = os.path.join(directory, ADAPTER_CONFIG)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{directory} holds no LoRA adapters ({ADAPTER_CONFIG} is missing)")
    with open(path, encoding="utf-8") as f:
        cfg = json.load(f)
    if cfg.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{path}: peft_type {cfg['peft_type']!r} is not LoRA")
    for key in ("r", "lora_alpha", "target_modules"):
        if key not in cfg:
            raise ValueError(f"{path} lacks {key!r}")
    return cfg


def load_adapters(model: nn.Module, directory: str) -> nn.Module:
    """Attach the adapters saved in ``directory`` to ``model`` (unmerged: training can go on);
    refuses, by name, adapters whose tensors do not fit the model."""
    cfg = _adapter_config(directory)
    add_lora(model, cfg["r"], cfg["lora_alpha"], cfg["target_modules"])
    state = load_file(os.path.join(directory, ADAPTER_FILE))
    own = adapter_state(model)
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k}: adapters {list(state[k].shape)}, model {list(v.shape)}"
              for k, v in own.items() if k in state and state[k].shape != v.shape]
    if missing or unexpected or shapes:
        raise ValueError(f"the adapters in {directory} do not fit this model: {len(missing)} missing "
                         f"{missing[:3]}, {len(unexpected)} unexpected {unexpected[:3]}, {len(shapes)} of another "
                         f"shape {shapes[:3]}")
    model.load_state_dict(state, strict=False)
    return model


def merge_adapters(model: nn.Module, directory: str) -> nn.Module:
    """Fold the adapters saved in ``directory`` straight into ``model``'s weights (W += alpha / r *
    B A, summed in fp32 from the file's tensors and rounded once to the model's dtype), with no
    module swaps: the model stays plain, so every fast path (grouped experts, compiled decode)
    serves the fine-tune. Refuses, by name, adapters that do not fit the model."""
    cfg = _adapter_config(directory)
    _refuse_quantized(model)
    scale = cfg["lora_alpha"] / cfg["r"]
    r = cfg["r"]
    weights: dict[str, tuple[torch.Tensor, int | None]] = {}  # adapter key stem -> (weight, first expert or None)
    shapes: dict[str, tuple[int, ...]] = {}
    for _, _, child, q in _targets(model, set(cfg["target_modules"])):
        if isinstance(child, Experts):
            # a stack holding part of a layer's experts (expert-sharded ranks) takes its part of the adapters
            first, total = getattr(child, "first", 0), getattr(child, "total", None) or child.n
            for w in ("w1", "w2", "w3"):
                t = getattr(child, w)
                weights[f"{q}.lora_{{}}_{w}"] = (t, first)
                shapes[f"{q}.lora_A_{w}"], shapes[f"{q}.lora_B_{w}"] = (total, r, t.shape[2]), (total, t.shape[1], r)
        else:
            weights[f"{q}.lora_{{}}"] = (child.weight, None)
            shapes[f"{q}.lora_A"], shapes[f"{q}.lora_B"] = (r, child.in_features), (child.out_features, r)
    path = os.path.join(directory, ADAPTER_FILE)
    with safe_open(path, "pt") as f:
        keys = set(f.keys())
        missing = sorted(k for k in shapes if k not in keys)
        unexpected = sorted(k for k in keys if k not in shapes)
        bad = [f"{k}: adapters {f.get_slice(k).get_shape()}, model {list(shapes[k])}"
               for k in sorted(keys & shapes.keys()) if tuple(f.get_slice(k).get_shape()) != shapes[k]]
        if missing or unexpected or bad:
            raise ValueError(f"the adapters in {directory} do not fit this model: {len(missing)} missing "
                             f"{missing[:3]}, {len(unexpected)} unexpected {unexpected[:3]}, {len(bad)} of another "
                             f"shape {bad[:3]}")
        with torch.no_grad():
            for stem, (w, first) in weights.items():
                a = f.get_tensor(stem.format("A")).to(w.device, torch.float32)
                b = f.get_tensor(stem.format("B")).to(w.device, torch.float32)
                for e in range(w.shape[0]) if first is not None else [None]:  # one expert at a time: no [E, out, in] fp32 copy
                    dst = w if e is None else w[e]
                    dst.copy_(dst.float() + scale * (b @ a if e is None else b[first + e] @ a[first + e]))
    return model


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weights and restore the plain modules."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, (LoRALinear, LoRAExperts)):
                setattr(parent, name, child.merged())
    for p in model.parameters():
        p.requires_grad_(True)
    model.__dict__.pop("lora_config", None)
    return model


def count_trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


__all__ = ["LoRALinear", "LoRAExperts", "add_lora", "save_adapters", "load_adapters", "merge_lora",
           "adapter_state", "count_trainable", "is_adapter_dir", "adapter_base", "merge_adapters"]
