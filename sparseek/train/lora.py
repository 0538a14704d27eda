"""LoRA adapters as module swaps: on attention projections and on every routed expert.

``add_lora(model, rank, alpha, targets)`` freezes the model and swaps the targeted ``nn.Linear``
modules for ``LoRALinear`` and the ``Experts`` modules for ``LoRAExperts`` (one low-rank pair per
expert and matrix, stacked like the experts themselves). ``save_adapters`` writes only the adapter
tensors (safetensors + JSON config); ``load_adapters`` puts them back on a fresh model;
``merge_lora`` folds them into the base weights and swaps the plain modules back in, so a merged
model is an ordinary checkpoint again.
"""

from __future__ import annotations

import json
import math
import os

import torch
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
        with torch.no_grad():
            self.base.weight.copy_(self.weight)
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
                getattr(self, name).add_(self.scale * torch.bmm(b, a))
        return Experts.wrap(self.w1, self.w2, self.w3, self.limit)


def _targets(model: nn.Module, targets) -> list[tuple[nn.Module, str, nn.Module]]:
    found = []
    for parent_name, parent in model.named_modules():
        for name, child in parent.named_children():
            if isinstance(child, Experts) and not isinstance(child, LoRAExperts) and "experts" in targets:
                found.append((parent, name, child))
            elif isinstance(child, nn.Linear) and name in targets and ".attn" in f".{parent_name}".replace(
                    "self_attn", "attn") and "compressor" not in parent_name and "indexer" not in parent_name:
                found.append((parent, name, child))
    return found


def add_lora(model: nn.Module, rank: int = 8, alpha: float = 16.0, targets=DEFAULT_TARGETS) -> nn.Module:
    """Freeze the model and attach adapters; returns the model (changed in place)."""
    for p in model.parameters():
        p.requires_grad_(False)
    from sparseek.quant.modules import QuantExperts, QuantLinear

    if any(isinstance(m, (QuantLinear, QuantExperts)) for m in model.modules()):
        # they keep FP8/FP4 bytes, which adapters cannot sit on (QLoRA is not built)
        raise ValueError("LoRA needs the model's weights unquantized: load it without quantize=...")
    swaps = _targets(model, set(targets))
    if not swaps:
        raise ValueError(f"no module matches the LoRA targets {list(targets)}")
    for parent, name, child in swaps:
        new = LoRAExperts(child, rank, alpha) if isinstance(child, Experts) else LoRALinear(child, rank, alpha)
        setattr(parent, name, new)
    model.lora_config = {"rank": rank, "alpha": alpha, "targets": list(targets)}
    return model


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items() if "lora_" in k}


def save_adapters(model: nn.Module, directory: str) -> None:
    os.makedirs(directory, exist_ok=True)
    save_file(adapter_state(model), os.path.join(directory, ADAPTER_FILE))
    with open(os.path.join(directory, ADAPTER_CONFIG), "w", encoding="utf-8") as f:
        json.dump({"peft_type": "LORA", "r": model.lora_config["rank"], "lora_alpha": model.lora_config["alpha"],
                   "target_modules": model.lora_config["targets"]}, f, indent=2)


def load_adapters(model: nn.Module, directory: str) -> nn.Module:
    with open(os.path.join(directory, ADAPTER_CONFIG), encoding="utf-8") as f:
        cfg = json.load(f)
    add_lora(model, cfg["r"], cfg["lora_alpha"], cfg["target_modules"])
    state = load_file(os.path.join(directory, ADAPTER_FILE))
    missing = [k for k in adapter_state(model) if k not in state]
    unexpected = [k for k in state if k not in adapter_state(model)]
    if missing or unexpected:
        raise ValueError(f"adapters do not fit this model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.load_state_dict(state, strict=False)
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
           "adapter_state", "count_trainable"]
