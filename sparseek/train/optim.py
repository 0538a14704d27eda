"""DeepSeek-V4's optimizer setup: Muon with hybrid Newton-Schulz for the matrices, AdamW for the rest.

Muon, per logically independent matrix W (n x m), as in the V4 report (Alg. 1)::

    M_t = mu * M_{t-1} + G_t                      (mu = 0.95)
    O'  = HybridNS(mu * M_t + G_t)                (Nesterov form)
    O   = O' * sqrt(max(n, m)) * gamma            (gamma = 0.18: update RMS 0.18, so AdamW LRs carry over)
    W  <- W * (1 - lr * wd) - lr * O              (decoupled weight decay, wd = 0.1)

HybridNS normalizes by the Frobenius norm (+1e-7), then runs 10 iterations of
``X <- a X + b (X X^T) X + c (X X^T)^2 X``: (3.4445, -4.7750, 2.0315) eight times (fast growth of
small singular values), then (2, -1.5, 0.5) twice (a polish whose fixed point 1 has zero slope).
Tall matrices are transposed so that the Gram matrix is the small side. A stacked tensor
[E, n, m] (a layer's routed experts) is E independent matrices, orthogonalized in one batched call.

Who goes where (``describe_groups`` lists it for a model):

=================================================================  ================
the embedding, the output head                                     ``adamw``
RMSNorm weights; mHC static biases and gating factors               ``adamw_no_decay``
(``hc_*_base``, ``hc_*_scale``, including ``hc_head_*``); attention
sinks; compressor ``ape`` (2-D, but a positional bias table); any
other 0-D/1-D parameter
every other parameter of 2 or more dims: ``hc_*_fn``, attention,    ``muon``
compressor and indexer projections, router ``gate.weight``, routed
experts (per expert), shared experts, MTP ``e_proj``/``h_proj``
=================================================================  ================

Buffers (``gate.bias``, ``tid2eid``, rotary tables) are not parameters and are never touched.

Choices the report leaves open, made here:

* The report applies weight decay 0.1 to the AdamW parameters without qualification; we decay only
  the embedding and the head, and not norms, biases, gating scales, sinks or ``ape`` (decaying
  those pulls gains toward 0 and biases toward "off", which is the usual reason to exempt them).
* AdamW's epsilon defaults to the report's 1e-20, i.e. effectively none: a parameter whose
  gradient is tiny but non-zero moves by about a full ``lr`` per step (sign-like). Pass
  ``eps=1e-8`` for the conventional, more forgiving behaviour.
* ``attn_sink``, ``ape`` and the MTP projections are not placed by the report: sinks and ``ape``
  go to AdamW without decay, ``e_proj``/``h_proj`` (plain d x d matrices) to Muon.
* Muon's momentum buffer is kept in at least fp32 (for bf16/fp16 parameters too); the
  Newton-Schulz iterations run in ``ns_dtype`` (default bf16 on CUDA, fp32 elsewhere).
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Callable

import torch
from torch import nn

from sparseek.model.common import RMSNorm

# (a, b, c) of each Newton-Schulz iteration: 8 fast quintic steps, then 2 converging ones
HYBRID_NS_STEPS: tuple[tuple[float, float, float], ...] = (
    ((3.4445, -4.7750, 2.0315),) * 8 + ((2.0, -1.5, 0.5),) * 2
)

MUON, ADAMW, ADAMW_NO_DECAY = "muon", "adamw", "adamw_no_decay"

_HC_STATIC = re.compile(r"hc_\w*_(base|scale)")  # mHC static biases and gating factors
_HC_FN = re.compile(r"hc_\w*_fn")                # mHC mixing matrices
_OUTPUT_HEADS = ("head", "lm_head")


# ---------------------------------------------------------------------------- Newton-Schulz
def _ns_dtype(ns_dtype: torch.dtype | str | None, device: torch.device) -> torch.dtype:
    if ns_dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(ns_dtype, torch.dtype):
        return ns_dtype
    dt = getattr(torch, str(ns_dtype), None)
    if not isinstance(dt, torch.dtype) or not dt.is_floating_point:
        raise ValueError(f"ns_dtype must be a floating torch dtype or its name, got {ns_dtype!r}")
    return dt


def _dtype_name(ns_dtype: torch.dtype | str | None) -> str | None:
    """Kept in param groups as a plain string so that state dicts load with ``weights_only=True``."""
    if ns_dtype is None:
        return None
    return str(_ns_dtype(ns_dtype, torch.device("cpu"))).removeprefix("torch.")


def hybrid_newton_schulz(m: torch.Tensor, steps: Sequence[Sequence[float]] = HYBRID_NS_STEPS,
                         eps: float = 1e-7, dtype: torch.dtype | str | None = None) -> torch.Tensor:
    """Approximately orthogonalize ``m`` (its singular values pushed toward 1, U and V kept).

    ``m`` is one matrix [n, m] or a stack [..., n, m] of independent ones (each slice gets its own
    Frobenius normalization). The iterations run in ``dtype`` (default: bf16 on CUDA, fp32
    elsewhere) with batched matmuls; the result has m's shape and ``dtype``.
    """
    if m.ndim < 2:
        raise ValueError(f"Newton-Schulz needs a matrix, got shape {tuple(m.shape)}")
    dtype = _ns_dtype(dtype, m.device)
    shape = m.shape
    x = m.reshape(-1, shape[-2], shape[-1])
    x = x.to(torch.promote_types(x.dtype, torch.float32))
    x = x / (torch.linalg.matrix_norm(x, ord="fro", keepdim=True) + eps)
    x = x.to(dtype)
    tall = shape[-2] > shape[-1]
    if tall:  # iterate on X^T so that the Gram matrix X X^T is min(n, m) square
        x = x.mT
    for a, b, c in steps:
        gram = torch.bmm(x, x.mT)
        poly = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)  # b G + c G^2
        x = torch.baddbmm(x, poly, x, beta=a, alpha=1.0)         # a X + (b G + c G^2) X
    if tall:
        x = x.mT
    return x.reshape(shape)


# ---------------------------------------------------------------------------- Muon
class Muon(torch.optim.Optimizer):
    """Muon with Nesterov momentum, hybrid Newton-Schulz, RMS rescale and decoupled weight decay.

    Every parameter must have at least 2 dims; the last two are the matrix, leading dims index
    independent matrices (stacked experts [E, out, in]). Per group: ``lr``, ``momentum``,
    ``nesterov``, ``weight_decay``, ``rms_scale``, ``ns_steps`` (a sequence of (a, b, c)),
    ``ns_eps``, ``ns_dtype`` (None = bf16 on CUDA / fp32 elsewhere, or a dtype or its name).
    """

    def __init__(self, params: Iterable, lr: float = 2.7e-4, momentum: float = 0.95, nesterov: bool = True,
                 weight_decay: float = 0.1, rms_scale: float = 0.18,
                 ns_steps: Sequence[Sequence[float]] = HYBRID_NS_STEPS, ns_eps: float = 1e-7,
                 ns_dtype: torch.dtype | str | None = None):
        if lr < 0 or not 0 <= momentum < 1 or weight_decay < 0 or rms_scale <= 0 or ns_eps < 0:
            raise ValueError(f"invalid Muon hyperparameters: lr={lr} momentum={momentum} "
                             f"weight_decay={weight_decay} rms_scale={rms_scale} ns_eps={ns_eps}")
        defaults = dict(lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay,
                        rms_scale=rms_scale, ns_steps=self._steps(ns_steps), ns_eps=ns_eps,
                        ns_dtype=_dtype_name(ns_dtype))
        super().__init__(params, defaults)

    @staticmethod
    def _steps(ns_steps: Sequence[Sequence[float]]) -> tuple[tuple[float, float, float], ...]:
        steps = tuple(tuple(float(v) for v in abc) for abc in ns_steps)
        if not steps or any(len(abc) != 3 for abc in steps):
            raise ValueError("ns_steps must be a non-empty sequence of (a, b, c) triples")
        return steps  # type: ignore[return-value]

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        group["ns_steps"] = self._steps(group["ns_steps"])
        group["ns_dtype"] = _dtype_name(group["ns_dtype"])
        for p in group["params"]:
            if p.ndim < 2:
                raise ValueError(f"Muon optimizes matrices (or stacks of them); got a tensor of shape "
                                 f"{tuple(p.shape)}: give it to AdamW")

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, mu, wd = group["lr"], group["momentum"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("Muon does not support sparse gradients")
                state = self.state[p]
                if "momentum_buffer" not in state:
                    # sharded (FSDP2) matrices keep a full-size buffer: Newton-Schulz needs whole matrices
                    state["momentum_buffer"] = torch.zeros(
                        p.shape, dtype=torch.promote_types(p.dtype, torch.float32), device=_full(p).device)
                buf = state["momentum_buffer"]
                g = _full(p.grad).to(buf.dtype)
                buf.mul_(mu).add_(g)
                update = g.add(buf, alpha=mu) if group["nesterov"] else buf
                o = hybrid_newton_schulz(update, group["ns_steps"], group["ns_eps"], group["ns_dtype"])
                o = o.to(buf.dtype).mul_(math.sqrt(max(p.shape[-2], p.shape[-1])) * group["rms_scale"])
                if wd != 0:
                    p.mul_(1 - lr * wd)
                p.sub_(_like(p, (lr * o).to(p.dtype)))
        return loss


def _full(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's whole value (gathered on every rank); any other tensor as it is."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def _like(p: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    """``full`` laid out like ``p``: this rank's shard of it when ``p`` is sharded (every rank computed
    the same full update, so each keeps its own part without communicating)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(p, DTensor):
        return distribute_tensor(full, p.device_mesh, p.placements, src_data_rank=None)
    return full


# ---------------------------------------------------------------------------- one optimizer over several
class Combined(torch.optim.Optimizer):
    """Several optimizers over disjoint parameters behind one ``torch.optim.Optimizer``.

    ``param_groups`` is every child's groups (the same dicts, so setting ``lr`` here sets it
    there, and torch's LR schedulers work); ``state`` is a merged read-only view; ``step``,
    ``zero_grad``, ``state_dict`` and ``load_state_dict`` go to every child. The children stay
    reachable as ``optimizers[name]``.
    """

    def __init__(self, optimizers: Mapping[str, torch.optim.Optimizer]):
        if not optimizers:
            raise ValueError("Combined needs at least one optimizer")
        self.optimizers: dict[str, torch.optim.Optimizer] = dict(optimizers)
        self._ready = False
        super().__init__([g for opt in self.optimizers.values() for g in opt.param_groups], defaults={})
        self._ready = True

    @property
    def state(self) -> defaultdict:
        merged: defaultdict = defaultdict(dict)
        for opt in self.optimizers.values():
            merged.update(opt.state)
        return merged

    @state.setter
    def state(self, value) -> None:
        # Optimizer.__init__ / __setstate__ assign a (empty) state: the children own the real one
        if value:
            raise AttributeError("Combined.state is a view of its children's state; load a state_dict instead")

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if self._ready:
            raise TypeError("add the group to one of Combined.optimizers, which owns its algorithm")
        super().add_param_group(param_group)

    def _sync_groups(self) -> None:
        self.param_groups = [g for opt in self.optimizers.values() for g in opt.param_groups]

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for opt in self.optimizers.values():
            opt.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.optimizers.values():
            opt.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return {"optimizers": {name: opt.state_dict() for name, opt in self.optimizers.items()}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = state_dict["optimizers"]
        if set(saved) != set(self.optimizers):
            raise ValueError(f"state dict holds optimizers {sorted(saved)}, this one has {sorted(self.optimizers)}")
        for name, opt in self.optimizers.items():
            opt.load_state_dict(saved[name])
        self._sync_groups()  # the children rebuilt their group dicts

    def __getstate__(self) -> dict[str, Any]:
        return {"defaults": self.defaults, "optimizers": self.optimizers, "param_groups": self.param_groups,
                "_ready": True}

    def __repr__(self) -> str:
        return "Combined(\n" + "\n".join(f"  {k}: {v!r}" for k, v in self.optimizers.items()) + "\n)"


# ---------------------------------------------------------------------------- who goes where
def _kind(name: str, p: torch.Tensor, module: nn.Module) -> str:
    leaf = name.rsplit(".", 1)[-1]
    owner = name.rsplit(".", 2)[-2] if "." in name else ""
    if isinstance(module, nn.Embedding) or (owner in _OUTPUT_HEADS and isinstance(module, nn.Linear)):
        return ADAMW
    if isinstance(module, (RMSNorm, nn.LayerNorm, nn.RMSNorm)):
        return ADAMW_NO_DECAY
    if _HC_STATIC.fullmatch(leaf) or leaf == "ape" or p.ndim < 2:
        return ADAMW_NO_DECAY
    return MUON  # every other matrix or stack of matrices, hc_*_fn included


def _assignments(model: nn.Module) -> list[tuple[str, nn.Parameter, str]]:
    """(name, parameter, kind) of every trainable parameter, in model order, each once."""
    out = []
    for name, p in model.named_parameters():  # shared (tied) parameters appear once
        if not p.requires_grad:
            continue
        module = model.get_submodule(name.rpartition(".")[0])
        out.append((name, p, _kind(name, p, module)))
    return out


def describe_groups(model: nn.Module) -> dict[str, str]:
    """{parameter name: "muon" | "adamw" | "adamw_no_decay"} for every trainable parameter."""
    return {name: kind for name, _, kind in _assignments(model)}


def param_groups(model: nn.Module, lr: float, weight_decay: float = 0.1
                 ) -> tuple[list[nn.Parameter], list[dict[str, Any]]]:
    """(Muon's parameters, AdamW's param groups) by the rules above.

    AdamW gets up to two groups, ``kind`` "adamw" (with ``weight_decay``) and "adamw_no_decay"
    (weight decay 0); empty groups are left out.
    """
    assigned = _assignments(model)
    muon = [p for _, p, k in assigned if k == MUON]
    groups = []
    for kind, wd in ((ADAMW, weight_decay), (ADAMW_NO_DECAY, 0.0)):
        params = [p for _, p, k in assigned if k == kind]
        if params:
            groups.append({"params": params, "lr": lr, "weight_decay": wd, "kind": kind})
    return muon, groups


def build_optimizer(model: nn.Module, name: str = "muon", lr: float = 2.7e-4, weight_decay: float = 0.1,
                    betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-20, *, momentum: float = 0.95,
                    nesterov: bool = True, rms_scale: float = 0.18,
                    ns_steps: Sequence[Sequence[float]] = HYBRID_NS_STEPS,
                    ns_dtype: torch.dtype | str | None = None) -> torch.optim.Optimizer:
    """One optimizer for the whole model.

    ``name="muon"``: V4's setup, a :class:`Combined` of ``Muon`` (the matrices) and
    ``torch.optim.AdamW`` (embedding and head with decay; norms, mHC biases/scales, sinks, ``ape``
    without), all at the same ``lr``. ``name="adamw"``: a plain ``torch.optim.AdamW``, the Muon
    matrices joining the decayed group.
    """
    muon_params, adamw_groups = param_groups(model, lr, weight_decay)
    if name == "adamw":
        assigned = _assignments(model)
        groups = []
        decayed = [p for _, p, k in assigned if k in (MUON, ADAMW)]
        if decayed:
            groups.append({"params": decayed, "lr": lr, "weight_decay": weight_decay, "kind": ADAMW})
        groups += [g for g in adamw_groups if g["kind"] == ADAMW_NO_DECAY]
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    if name != "muon":
        raise ValueError(f"unknown optimizer {name!r}: use 'muon' or 'adamw'")
    opts: dict[str, torch.optim.Optimizer] = {}
    if muon_params:
        opts[MUON] = Muon([{"params": muon_params, "kind": MUON}], lr=lr, momentum=momentum, nesterov=nesterov,
                          weight_decay=weight_decay, rms_scale=rms_scale, ns_steps=ns_steps, ns_dtype=ns_dtype)
    if adamw_groups:
        opts[ADAMW] = torch.optim.AdamW(adamw_groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    return Combined(opts)


# ---------------------------------------------------------------------------- learning rate
def lr_schedule(step: int, warmup: int, total: int, peak: float, final: float,
                decay_start: int | None = None) -> float:
    """Linear warmup to ``peak``, then cosine decay to ``final`` at step ``total``.

    Step ``s < warmup`` gets ``peak * (s + 1) / warmup`` (so step 0 already moves and step
    ``warmup - 1`` reaches the peak). The cosine runs from ``decay_start`` (default: ``warmup``;
    V4 holds the peak for most of training, then decays) to ``total``; later steps stay at ``final``.
    """
    if warmup < 0 or total < 0:
        raise ValueError("warmup and total must be >= 0")
    if step < warmup:
        return peak * (step + 1) / warmup
    start = warmup if decay_start is None else max(decay_start, warmup)
    if step <= start:
        return peak
    if step >= total:
        return final
    progress = (step - start) / (total - start)
    return final + (peak - final) * 0.5 * (1.0 + math.cos(math.pi * progress))


def apply_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every group's ``lr`` to ``lr`` times the group's ``lr_scale`` (1 when absent)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


__all__ = ["HYBRID_NS_STEPS", "hybrid_newton_schulz", "Muon", "Combined", "describe_groups", "param_groups",
           "build_optimizer", "lr_schedule", "apply_lr"]
