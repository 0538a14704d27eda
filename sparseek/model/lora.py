"""LoRA adapters as module swaps: on attention projections and on every routed expert.

``add_lora(model, rank, alpha, targets)`` freezes the model and swaps the targeted ``nn.Linear``
modules for ``LoRALinear`` and the ``Experts`` modules for ``LoRAExperts`` (one low-rank pair per
expert and matrix, stacked like the experts themselves). ``merge_lora`` folds them into the base
weights and swaps the plain modules back in, so a merged model is an ordinary checkpoint again.
Saving, loading and merging adapters from files: ``sparseek.checkpoint.adapters``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from sparseek.model.common import Experts

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
        self.n, self.limit, self.act_fp8 = base.n, base.limit, base.act_fp8
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
        return Experts.wrap(self.w1, self.w2, self.w3, self.limit, self.act_fp8)


def lora_targets(model: nn.Module, targets) -> list[tuple[nn.Module, str, nn.Module, str]]:
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


def check_unquantized(model: nn.Module) -> None:
    from sparseek.quant.modules import QuantExperts, QuantLinear

    if any(isinstance(m, (QuantLinear, QuantExperts)) for m in model.modules()):
        # they keep FP8/FP4 bytes, which adapters cannot sit on (QLoRA is not built)
        raise ValueError("LoRA needs the model's weights unquantized: load it without quantize=... "
                         "(sparseek.load(..., lora=..., quantize='fp8'|'fp4') quantizes after merging)")


def add_lora(model: nn.Module, rank: int = 8, alpha: float = 16.0, targets=DEFAULT_TARGETS) -> nn.Module:
    """Freeze the model and attach adapters; returns the model (changed in place)."""
    for p in model.parameters():
        p.requires_grad_(False)
    check_unquantized(model)
    swaps = lora_targets(model, set(targets))
    if not swaps:
        raise ValueError(f"no module matches the LoRA targets {list(targets)}")
    for parent, name, child, _ in swaps:
        new = LoRAExperts(child, rank, alpha) if isinstance(child, Experts) else LoRALinear(child, rank, alpha)
        setattr(parent, name, new)
    model.lora_config = {"rank": rank, "alpha": alpha, "targets": list(targets)}
    return model


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items() if "lora_" in k}


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


__all__ = ["LoRALinear", "LoRAExperts", "add_lora", "merge_lora", "adapter_state", "count_trainable", "lora_targets",
           "check_unquantized",
           "DEFAULT_TARGETS"]
