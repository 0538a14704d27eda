"""Parallelism, applied to a finished single-device model from outside (the model knows none of it).

Training:

* Expert parallelism: every rank keeps ``E / world`` of each layer's routed experts; tokens travel
  to their experts' rank and back with two all-to-alls (``torch.distributed``, differentiable).
* FSDP2 (``fully_shard``) for everything else: each block's dense parameters are sharded across
  ranks and gathered just in time; gradients are reduce-scattered.

Inference (``shard_experts_``): every rank keeps ``E / world`` routed experts and the rest whole,
and runs the same engine loop on the same requests; a layer's ranks each run their experts for the
tokens that picked them and one all-reduce sums the parts, so the experts' memory is split ``world``
ways and every rank samples the same tokens.

Launch with ``torchrun --nproc-per-node N -m sparseek.cli train|generate|eval ...`` (NCCL on GPUs,
gloo on CPUs).
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import nn

from sparseek.model.common import Experts, gate_up_view, grouped_ffn
from sparseek.model.multi_lora import MultiLoRAExperts
from sparseek.quant.modules import QuantExperts


def init_distributed() -> tuple[int, int, torch.device]:
    """(rank, world size, device) from torchrun's environment; (0, 1, default) without it."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank = dist.get_rank()
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return rank, world, torch.device("cuda", local)
    return rank, world, torch.device("cpu")


class EPExperts(nn.Module):
    """This rank's slice of a layer's routed experts, with all-to-all token dispatch."""

    def __init__(self, experts: Experts, group=None):
        super().__init__()
        self.group = group
        self.world = dist.get_world_size(group)
        rank = dist.get_rank(group)
        if experts.n % self.world:
            raise ValueError(f"{experts.n} experts cannot be split evenly over {self.world} ranks")
        self.n, self.n_local = experts.n, experts.n // self.world
        self.first = rank * self.n_local
        self.limit, self.act_fp8 = experts.limit, experts.act_fp8
        sl = slice(self.first, self.first + self.n_local)
        for name in ("w1", "w2", "w3"):
            setattr(self, name, nn.Parameter(getattr(experts, name)[sl].detach().clone()))

    def forward(self, x_ND: torch.Tensor, weights_NK: torch.Tensor, idx_NK: torch.Tensor,
                batched: bool | None = None) -> torch.Tensor:
        import warnings

        with warnings.catch_warnings():  # the autograd-aware all-to-all; its successor is private API
            warnings.simplefilter("ignore", FutureWarning)
            from torch.distributed.nn.functional import all_to_all_single

        N, K = idx_NK.shape
        flat = idx_NK.reshape(-1)
        order = flat.argsort(stable=True)  # (token, slot) pairs grouped by expert, hence by rank
        token_of = order // K
        expert = flat[order]
        send = torch.bincount(expert // self.n_local, minlength=self.world)
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv, send, group=self.group)
        s, r = send.tolist(), recv.tolist()
        x_recv = all_to_all_single(x_ND.new_empty(sum(r), x_ND.shape[1]), x_ND[token_of], r, s, group=self.group)
        e_recv = torch.empty(sum(r), dtype=expert.dtype, device=expert.device)
        dist.all_to_all_single(e_recv, expert.contiguous(), r, s, group=self.group)
        local = e_recv - self.first
        o2 = local.argsort(stable=True)
        # (with act_fp8, w2's input is rounded before the routing weight, not after as elsewhere)
        y_sorted = grouped_ffn(x_recv[o2], local[o2], self.w1, self.w2, self.w3, self.limit, act=self.act_fp8)
        y_recv = y_sorted[torch.argsort(o2)]  # back to the order the rows arrived in
        y_back = all_to_all_single(x_ND.new_empty(sum(s), x_ND.shape[1]), y_recv, s, r, group=self.group)
        # the routing weight multiplies after w2 here (equal by linearity), on the token's own rank
        y_back = y_back * weights_NK.reshape(-1)[order].unsqueeze(-1).to(y_back.dtype)
        return torch.zeros_like(x_ND).index_add_(0, token_of, y_back)


class _Sharded:
    """This rank's ``E / world`` of a layer's routed experts, for inference. Every rank sees every
    token (each runs the same engine loop on the same requests), runs its experts for the (token,
    expert) pairs that are its own, and one all-reduce sums the ranks' parts: each rank reads
    ``1 / world`` of the experts' bytes per step and ends with the same bits as every other (the
    all-reduce hands all of them one sum), so their sampled tokens agree without being sent around.
    Training uses ``EPExperts`` instead (tokens split over ranks, all-to-all, autograd)."""

    def _place(self, experts: Experts, group) -> slice:
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        if experts.n % world:
            raise ValueError(f"{experts.n} experts cannot be split evenly over {world} ranks")
        self.group, self.total, self.first = group, experts.n, rank * (experts.n // world)
        return slice(self.first, self.first + experts.n // world)

    def forward(self, x_ND: torch.Tensor, weights_NK: torch.Tensor, idx_NK: torch.Tensor,
                batched: bool | None = None) -> torch.Tensor:
        k = idx_NK.shape[1]
        local = idx_NK.reshape(-1) - self.first
        mine = ((local >= 0) & (local < self.n)).nonzero().squeeze(1)  # (token, slot) pairs of this rank
        order = local[mine].argsort(stable=True)
        pos = mine[order]
        if pos.numel():
            y = self.pairs(x_ND, pos // k, local[pos], weights_NK.reshape(-1)[pos],
                           gate_up_view(self.w1, self.w3), batched)
        else:
            y = torch.zeros_like(x_ND)
        return self._sum(y)

    def forward_static(self, x_ND: torch.Tensor, weights_NK: torch.Tensor, idx_NK: torch.Tensor) -> torch.Tensor:
        # fixed shapes: another rank's picks run on expert 0 here with weight 0 (adding nothing)
        local = idx_NK - self.first
        mine = (local >= 0) & (local < self.n)
        return self._sum(super().forward_static(x_ND, torch.where(mine, weights_NK, 0), local.clamp(0, self.n - 1)))

    def _sum(self, y_ND: torch.Tensor) -> torch.Tensor:
        y = y_ND.float()  # summed in fp32 (and gloo takes no bf16 everywhere)
        dist.all_reduce(y, group=self.group)
        return y.to(y_ND.dtype)


class ShardedExperts(_Sharded, Experts):
    __doc__ = _Sharded.__doc__

    def __init__(self, experts: Experts, group=None):
        nn.Module.__init__(self)
        sl = self._place(experts, group)
        self.n, self.limit, inter = sl.stop - sl.start, experts.limit, experts.w1.shape[1]
        self.act_fp8 = experts.act_fp8
        with torch.no_grad():  # w1 and w3 as halves of one buffer, as Experts keeps them
            gate_up = torch.cat([experts.w1[sl], experts.w3[sl]], dim=1)
            self.w1, self.w3 = nn.Parameter(gate_up[:, :inter]), nn.Parameter(gate_up[:, inter:])
            self.w2 = nn.Parameter(experts.w2[sl].clone())


class ShardedMultiLoRAExperts(_Sharded, MultiLoRAExperts):
    """This rank's share of a layer's experts with per-row LoRA adapters (``sparseek.model.multi_lora``,
    attached to a ``ShardedExperts``): each rank adds its own experts' adapted outputs, the
    all-reduce sums them, as without adapters."""

    def __init__(self, base: "ShardedExperts", pairs, rows):
        MultiLoRAExperts.__init__(self, base, pairs, rows)
        self.group, self.total, self.first = base.group, base.total, base.first


ShardedExperts.multi_lora_class = ShardedMultiLoRAExperts


class ShardedQuantExperts(_Sharded, QuantExperts):
    """``ShardedExperts`` for experts kept quantized (``sparseek.quant``): this rank's share of the
    FP8 / FP4 bytes, decoded where picked."""

    def __init__(self, experts: QuantExperts, group=None):
        nn.Module.__init__(self)
        sl = self._place(experts, group)
        self.n, self.limit, self.fmt, self.scale_fmt = sl.stop - sl.start, experts.limit, experts.fmt, experts.scale_fmt
        self.act_fp8 = experts.act_fp8
        self.shapes = dict(experts.shapes)
        for name in self.shapes:
            for buf in (name, f"{name}_scale"):
                self.register_buffer(buf, getattr(experts, buf)[sl].clone())


def shard_experts_(model: nn.Module, group=None) -> nn.Module:
    """Keep only this rank's share of every layer's routed experts (``ShardedExperts``, or
    ``ShardedQuantExperts`` for quantized ones), in place; every rank must then run the same
    forwards (the same engine calls, the same requests)."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, _Sharded) or not isinstance(child, Experts):
                continue
            if type(child) is Experts:
                setattr(parent, name, ShardedExperts(child, group))
            elif type(child) is QuantExperts:
                setattr(parent, name, ShardedQuantExperts(child, group))
            else:
                raise ValueError(f"expert sharding takes plain or quantized routed experts, not "
                                 f"{type(child).__name__} (LoRA experts are not built for it)")
    return model


def expert_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for m in model.modules() if isinstance(m, EPExperts) for p in (m.w1, m.w2, m.w3)]


def apply_expert_parallel(model: nn.Module, group=None) -> nn.Module:
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, Experts):
                setattr(parent, name, EPExperts(child, group))
    return model


def apply_fsdp(model: nn.Module, mesh=None) -> nn.Module:
    """FSDP2 on every block and the root; expert-parallel parameters stay local to their rank."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    if mesh is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        mesh = init_device_mesh(device, (dist.get_world_size(),))
    experts = set(expert_parameters(model))
    for block in list(model.layers) + list(getattr(model, "mtp", [])):
        fully_shard(block, mesh=mesh, ignored_params={p for p in block.parameters() if p in experts})
    fully_shard(model, mesh=mesh, ignored_params=experts)
    if hasattr(model, "forward_mtp"):  # the MTP loss runs through a second entry point of the root
        register_fsdp_forward_method(model, "forward_mtp")
    return model


def parallelize(model: nn.Module) -> nn.Module:
    """Expert parallelism over all ranks + FSDP2 for the dense parameters."""
    return apply_fsdp(apply_expert_parallel(model))


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def clip_grad_norm_(params, max_norm: float, device: torch.device) -> torch.Tensor:
    """Global gradient norm of ``params`` (the same list on every rank) over FSDP shards and expert
    slices (each element counted once), clipped to ``max_norm``."""
    params = [p for p in params if p.grad is not None]
    sq = torch.zeros((), device=device, dtype=torch.float32)
    for p in params:
        sq += local_tensor(p.grad).float().pow(2).sum()
    dist.all_reduce(sq)
    norm = sq.sqrt()
    coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
    for p in params:
        local_tensor(p.grad).mul_(coef)
    return norm


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's tensors on every rank: FSDP shards gathered, expert slices concatenated."""
    from torch.distributed.tensor import DTensor

    ep = {}
    for name, m in model.named_modules():
        if isinstance(m, EPExperts):
            for p in ("w1", "w2", "w3"):
                ep[f"{name}.{p}"] = m
    out = {}
    for k, v in model.state_dict().items():
        if k in ep:
            parts = [torch.empty_like(v) for _ in range(ep[k].world)]
            dist.all_gather(parts, v.detach().contiguous(), group=ep[k].group)
            out[k] = torch.cat(parts)
        elif isinstance(v, DTensor):
            out[k] = v.full_tensor()
        else:
            out[k] = v
    return {k: v.detach().cpu() for k, v in out.items()}
