"""Routed experts kept in host memory beside a GPU (llama.cpp's ``--cpu-moe`` / ``--n-cpu-moe N``,
KTransformers' hybrid inference).

A fine-grained MoE reads a few percent of its routed experts per token, and those experts are
most of its bytes (V4-Flash: ~95%): with them in host memory, a GPU that holds only the rest (the
attention, the shared experts, the embeddings) runs a model many times its size. Each decode step
sends its rows to the CPU, which runs the picked experts while the GPU runs the shared expert
(``MoE._offloaded``), and a long forward (a prefill chunk of ``MoE.stream_tokens`` tokens or more)
copies each layer's experts to the GPU instead. Placement only: the model's code is the same, it
runs the experts where their weights are.
"""

from __future__ import annotations

import torch
from torch import nn

from sparseek.model import common
from sparseek.model.common import Experts, MoE, mapped
from sparseek.quant.modules import QuantExperts


def moe_layers(model: nn.Module) -> list[MoE]:
    """The model's MoE blocks in order (the MTP block's last)."""
    return [m for m in model.modules() if isinstance(m, MoE)]


def offload_experts_(model: nn.Module, device, layers: int | bool | None = None, experts_device="cpu",
                     pin: bool | None = None, stream_tokens: int | None = MoE.stream_tokens) -> nn.Module:
    """Move ``model`` to ``device`` except the routed experts of its first ``layers`` MoE blocks
    (None or True, as ``cpu_moe=True`` says: all of them, the MTP block's included), which go to
    (or stay in) ``experts_device``.

    ``pin`` (default: when ``device`` is a GPU) pins the kept experts' host memory, so that the
    copies of a streamed forward run at full PCIe speed without staging. ``stream_tokens``: the
    forward size from which a layer's experts are copied to ``device`` instead of computed where
    they are (None: never; ``MoE.stream_tokens``). Returns the model (moved in place)."""
    device, experts_device = torch.device(device), torch.device(experts_device)
    blocks = moe_layers(model)
    layers = None if layers is True else layers
    if layers is not None and not 0 <= layers <= len(blocks):
        raise ValueError(f"the model has {len(blocks)} MoE blocks: cannot keep the experts of {layers} of them "
                         f"on {experts_device}")
    kept = blocks if layers is None else blocks[:layers]
    if pin is None:
        pin = device.type == "cuda" and experts_device.type == "cpu"
    held = [b.experts for b in kept]
    for b in kept:
        b._modules["experts"] = None  # out of the tree while the rest moves
    try:
        model.to(device)
    finally:
        for b, ex in zip(kept, held):
            b._modules["experts"] = ex
    for b, ex in zip(kept, held):
        ex.to(experts_device)
    for m in model.modules():
        if isinstance(m, Experts):
            m.fuse_gate_up_()  # moving splits w1 and w3 into two tensors: one buffer again
    for b in kept:
        ex = b.experts
        if pin and not ex.w2.is_pinned():
            b._modules["experts"] = mapped(ex, lambda t: t.pin_memory())
        b.stream_tokens = stream_tokens
    return model


def experts_devices(model: nn.Module) -> dict[str, int]:
    """How many MoE blocks keep their routed experts on each device (e.g. ``{"cpu": 43}``)."""
    out: dict[str, int] = {}
    for b in moe_layers(model):
        d = str(b.experts.w2.device)
        out[d] = out.get(d, 0) + 1
    return out


def compile_host_experts() -> None:
    """Run the host's part of a split decode step compiled where that pays (process-wide, as
    ``compile_hot_paths``; ``LLM(compile=True, cpu_moe=...)`` calls it): quantized experts, up to
    ``FUSED_ROWS`` rows. Each (token, slot) then gathers its expert's FP8 / FP4 codes into fused
    GEMVs that read them a word at a time where they lie (the CPU decode step's form); eager code
    decodes the picked experts' matrices whole into fresh memory first, several times slower.
    bf16 experts stay eager: their library GEMMs already stream the picked experts at ~0.8 of the
    copy bandwidth, and the gathered form is slower from a few rows
    (``benchmarks/results/cpu-moe-flash-layer.txt``). One compiled graph per row count serves
    every layer (the experts module is an argument, not a constant)."""
    if common.host_experts is not _eager_host:
        return
    from sparseek.model.fuse import FUSED_ROWS, fusing_backend
    from sparseek.model.v4 import _recompile_limit

    static = torch.compile(_static, dynamic=False, backend=fusing_backend(False, FUSED_ROWS), **_recompile_limit())

    def host(experts, x_ND, weights_NK, idx_NK):
        if (isinstance(experts, QuantExperts) and x_ND.device.type == "cpu" and x_ND.shape[0] <= FUSED_ROWS
                and not torch.is_grad_enabled()):
            return static(experts, x_ND, weights_NK, idx_NK)
        return _eager_host(experts, x_ND, weights_NK, idx_NK)

    common.host_experts = host


def _static(experts, x_ND, weights_NK, idx_NK):
    return experts.forward_static(x_ND, weights_NK, idx_NK)


_eager_host = common.host_experts
