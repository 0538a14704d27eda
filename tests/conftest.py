"""Shared test helpers: random-but-sane weights for any model (ours or transformers')."""

from __future__ import annotations

import math
import os

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))


def randomize_(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Fill every parameter and persistent buffer so that no mechanism is trivially off.

    Matrices get 1/sqrt(fan_in) scale so activations stay O(1); sinks, ape/position biases, mHC
    biases and router biases get non-zero values; hash tables get distinct random experts.
    """
    g = torch.Generator().manual_seed(seed)
    persistent = dict(model.state_dict(keep_vars=True))
    with torch.no_grad():
        for name, t in persistent.items():
            leaf = name.rsplit(".", 1)[-1]
            if "tid2eid" in name:
                n_exp = _n_experts(model)
                t.copy_(torch.rand(t.shape[0], n_exp, generator=g).topk(t.shape[1], dim=-1).indices)
            elif not t.is_floating_point():
                continue
            elif leaf in ("ape", "position_bias"):
                t.copy_(torch.randn(t.shape, generator=g) * 0.5)
            elif t.dim() >= 2:
                fan_in = t.shape[-1]
                t.copy_(torch.randn(t.shape, generator=g) / math.sqrt(fan_in))
            elif "sink" in leaf:
                t.copy_(torch.randn(t.shape, generator=g))
            elif leaf.endswith("scale"):
                t.copy_(0.5 + torch.rand(t.shape, generator=g))
            elif leaf.endswith("base"):
                t.copy_(torch.randn(t.shape, generator=g) * 0.5)
            elif "bias" in leaf:
                t.copy_(torch.randn(t.shape, generator=g) * 0.1)
            else:  # norm weights
                t.copy_(1.0 + 0.1 * torch.randn(t.shape, generator=g))
    return model


def _n_experts(model) -> int:
    cfg = getattr(model, "args", None) or getattr(model, "config")
    return cfg.n_routed_experts


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp(min=1e-12))


@pytest.fixture
def seed_all():
    torch.manual_seed(0)
