"""Pieces shared by the V4 and V3 model files: norms, RoPE with YaRN, routed experts, the router."""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import nn

from sparseek.config import ModelArgs
from sparseek.model import cpu_kernels
from sparseek.model.qat import act_round


def fp32_region():
    """Where DeepSeek computes in fp32 (router logits, mHC mixing, compressor): keep it so under a
    training loop's bf16 autocast (a GPU's; a CPU's too, which benchmarks use to see a GPU's
    tensors)."""
    on = [d for d in ("cuda", "cpu") if torch.is_autocast_enabled(d)]
    if not on:
        return contextlib.nullcontext()
    stack = contextlib.ExitStack()
    for d in on:
        stack.enter_context(torch.autocast(device_type=d, enabled=False))
    return stack


class RMSNorm(nn.Module):
    """Weighted RMSNorm. The weight stays fp32 (as in DeepSeek's code) whatever the model dtype."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if recomputing(x, self.weight):
            return _RMSNorm.apply(x, self.weight, self.eps)
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.square().mean(-1, keepdim=True) + self.eps)
        return (self.weight * x32).to(x.dtype)


def rms_unweighted(x: torch.Tensor, eps: float) -> torch.Tensor:
    if recomputing(x):
        return _RMSNorm.apply(x, None, eps)
    return x * torch.rsqrt(x.float().square().mean(-1, keepdim=True) + eps).to(x.dtype)


# Training on half-precision activations (bf16 autocast, as on a GPU) keeps the inputs of the
# pointwise chains that compute in fp32 (SwiGLU, RMSNorm; in v4, mHC's two sides) and recomputes
# them in backward instead of keeping their fp32 copies and intermediates: at V4-Flash sizes 572
# instead of 1,234 KiB kept per token and layer (``benchmarks/results/cpu-flash-train-saved.txt``).
# fp32 activations have no copies to save: there it would only cost the recomputation.
# False: plain autograd (the reference).
recompute_pointwise = True


def recomputing(x: torch.Tensor, *more) -> bool:
    """Whether a pointwise chain over ``x`` (half precision) and ``more`` runs through its
    recomputing autograd function."""
    return (recompute_pointwise and x.dtype != torch.float32 and torch.is_grad_enabled()
            and any(t is not None and t.requires_grad for t in (x, *more)))


class _SumRows(torch.autograd.Function):
    """``zeros(n, ...).index_add_(0, index, src)`` keeping only the index for backward (whose
    gradient is ``grad[index]``). torch's index_add keeps ``src`` too: the experts' [token x
    expert, hidden] outputs, 48 KiB a token per MoE layer at V4-Flash sizes in bf16."""

    @staticmethod
    def forward(ctx, index, src, n: int):
        ctx.save_for_backward(index)
        return src.new_zeros((n, *src.shape[1:])).index_add_(0, index, src)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        index, = ctx.saved_tensors
        return None, grad.index_select(0, index), None


class _RMSNorm(torch.autograd.Function):
    """RMSNorm (``weight`` None: ``rms_unweighted``, scaled in x's dtype) keeping x and one fp32
    factor per row for backward. Plain autograd keeps x in fp32 and the normalized x beside it: for
    a bf16 x under autocast 3x x's bytes more (V4-Flash's queries: 128 KiB per token per layer)."""

    @staticmethod
    def forward(ctx, x, weight, eps: float):
        r = torch.rsqrt(x.float().square().mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(x, weight, r)
        if weight is None:
            return x * r.to(x.dtype)
        return (weight * (x.float() * r)).to(x.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        x, weight, r = ctx.saved_tensors
        xn = x.float() * r
        dxn = dy.float() if weight is None else dy.float() * weight
        dw = None
        if weight is not None and ctx.needs_input_grad[1]:
            dw = (dy.float() * xn).flatten(0, -2).sum(0).to(weight.dtype)
        # d(x r)/dx with r = (mean(x^2) + eps)^-1/2: r (dxn - xn mean(dxn xn))
        dx = r * (dxn - xn * (dxn * xn).mean(-1, keepdim=True))
        return dx.to(x.dtype), dw, None


# ---------------------------------------------------------------------------- RoPE
def rope_inv_freq(dim: int, base: float, yarn: dict | None) -> torch.Tensor:
    """Inverse frequencies of the ``dim`` rotary dims; YaRN blends in ``freq / factor`` below a ramp."""
    freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    if yarn is None:
        return freqs
    factor = float(yarn["factor"])
    orig = yarn["original_max_position_embeddings"]
    beta_fast, beta_slow = yarn.get("beta_fast") or 32, yarn.get("beta_slow") or 1

    def correction_dim(n_rot: float) -> float:
        return dim * math.log(orig / (n_rot * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(correction_dim(beta_fast)), 0)
    high = min(math.ceil(correction_dim(beta_slow)), dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    # ramp 0 -> keep the original (high-frequency) dims; ramp 1 -> interpolate by `factor`
    return freqs / factor * ramp + freqs * (1 - ramp)


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


class Rotary(nn.Module):
    """cos/sin of the rotary angles at given positions, computed on the fly (a 1M-row table would be big)."""

    def __init__(self, dim: int, base: float, yarn: dict | None, attention_factor: float = 1.0):
        super().__init__()
        self.dim, self.base, self.yarn = dim, base, yarn
        self.attention_factor = attention_factor
        self.register_buffer("inv_freq", self.make_inv_freq(), persistent=False)

    def make_inv_freq(self) -> torch.Tensor:
        # built on the CPU even under a meta-device context (the table is tiny and must hold
        # numbers), then moved to the ambient device (a `with torch.device("cuda")` build)
        ambient = torch.empty(0).device
        with torch.device("cpu"):
            f = rope_inv_freq(self.dim, self.base, self.yarn)
        return f if ambient.type == "meta" else f.to(ambient)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions: any shape of int -> cos, sin of shape [*positions.shape, dim/2], fp32."""
        angles = positions.to(torch.float32).unsqueeze(-1) * self.inv_freq
        return angles.cos() * self.attention_factor, angles.sin() * self.attention_factor


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """Rotate adjacent pairs (2i, 2i+1) of the *trailing* ``2*cos.shape[-1]`` dims of x.

    ``cos``/``sin`` broadcast against ``x[..., ::2]``'s leading dims (callers unsqueeze the head dim).
    DeepSeek lays each head out as [nope | rope] and treats every pair as one complex number.
    """
    rd = 2 * cos.shape[-1]
    if inverse:
        sin = -sin
    rope = x[..., -rd:].float()
    re, im = rope[..., 0::2], rope[..., 1::2]
    out = torch.stack((re * cos - im * sin, re * sin + im * cos), dim=-1).flatten(-2).to(x.dtype)
    if rd == x.shape[-1]:
        return out
    return torch.cat((x[..., :-rd], out), dim=-1)


# ---------------------------------------------------------------------------- MoE
def score_fn(logits: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "sqrtsoftplus":
        return F.softplus(logits).sqrt()
    if kind == "sigmoid":
        return logits.sigmoid()
    return logits.softmax(dim=-1)


class Gate(nn.Module):
    """Router: scores every expert, selects top-k (or looks the choice up for hash layers).

    The correction ``bias`` only steers *selection* (aux-loss-free balancing); the weights use the
    unbiased scores. It is a buffer: the trainer moves it, never the gradient.
    """

    def __init__(self, args: ModelArgs, hash_routed: bool = False, with_bias: bool = True):
        super().__init__()
        self.topk = args.num_experts_per_tok
        self.n_experts = args.n_routed_experts
        self.score_func = args.scoring_func
        self.route_scale = args.routed_scaling_factor
        self.norm_topk = args.norm_topk_prob
        self.n_group = args.n_group or 1
        self.topk_group = args.topk_group or 1
        self.group_limited = self.n_group > 1 and args.topk_method in ("noaux_tc", "group_limited_greedy")
        self.weight = nn.Parameter(torch.empty(args.n_routed_experts, args.hidden_size))
        self.hash_routed = hash_routed
        if hash_routed:
            self.register_buffer("tid2eid", torch.zeros(args.vocab_size, self.topk, dtype=torch.int64))
            self.bias = None
        elif with_bias:
            self.register_buffer("bias", torch.zeros(args.n_routed_experts, dtype=torch.float32))
        else:
            self.bias = None

    def forward(self, x_ND: torch.Tensor, input_ids_N: torch.Tensor | None = None):
        """Returns (weights [N, k] fp32, indices [N, k] int64, scores [N, E] fp32 for balancing stats)."""
        with fp32_region():
            logits = F.linear(x_ND.float(), self.weight.float())
        scores = score_fn(logits, self.score_func)
        if self.hash_routed:
            if input_ids_N is None:
                raise ValueError("hash-routed MoE layers need the token ids")
            idx = self.tid2eid[input_ids_N]
        else:
            choice = scores if self.bias is None else scores + self.bias
            if self.group_limited:
                choice = self._limit_groups(choice)
            idx = choice.topk(self.topk, dim=-1).indices
        w = scores.gather(-1, idx)
        if self.norm_topk:
            w = w / (w.sum(dim=-1, keepdim=True) + 1e-20)
        return w * self.route_scale, idx, scores

    def _limit_groups(self, choice: torch.Tensor) -> torch.Tensor:
        n = choice.shape[0]
        grouped = choice.view(n, self.n_group, -1)
        # V3 ranks groups by the sum of their two best (biased) scores; V2 by the best one.
        group_score = grouped.topk(2, dim=-1).values.sum(-1) if self.bias is not None else grouped.amax(-1)
        keep = group_score.topk(self.topk_group, dim=-1).indices
        mask = torch.ones_like(group_score, dtype=torch.bool).scatter_(1, keep, False)
        return grouped.masked_fill(mask.unsqueeze(-1), float("-inf")).view(n, -1)


def swiglu(gate: torch.Tensor, up: torch.Tensor, limit: float | None, scale: torch.Tensor | None = None,
           dtype: torch.dtype | None = None, act: str | None = None) -> torch.Tensor:
    """silu(gate) * up in fp32 (DeepSeek clamps both at ``limit``), times ``scale`` (the routing
    weights, applied before w2), cast to ``dtype``, then rounded as w2's FP8 input with ``act``
    (``act_fp8``'s scale format). One function for the whole chain, so that ``compile_hot_paths``
    fuses it into one pass. Under autograd through ``_SwiGLU``, which keeps only its inputs."""
    if recomputing(gate, up, scale):
        return act_round(_SwiGLU.apply(gate, up, scale, limit, dtype), act)
    return act_round(_swiglu(gate, up, limit, scale, dtype), act)


def _swiglu(gate, up, limit, scale, dtype):
    gate, up = gate.float(), up.float()
    if limit:
        up = up.clamp(-limit, limit)
        gate = gate.clamp(max=limit)
    h = F.silu(gate) * up
    if scale is not None:
        h = h * scale
    return h if dtype is None else h.to(dtype)


class _SwiGLU(torch.autograd.Function):
    """``_swiglu`` keeping its inputs (the products' outputs, in their dtype) for backward and
    recomputing the rest there: plain autograd keeps the fp32 gate and up, both clamps and
    silu(gate) * up -- at V4-Flash sizes under bf16 autocast ~290 KiB per token per MoE layer, a
    fifth of everything a layer keeps (``benchmarks/results/cpu-flash-train-saved.txt``)."""

    @staticmethod
    def forward(ctx, gate, up, scale, limit, dtype):
        ctx.save_for_backward(gate, up, scale)
        ctx.limit = limit
        return _swiglu(gate, up, limit, scale, dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dh):
        gate, up, scale = ctx.saved_tensors
        g, u, lim = gate.float(), up.float(), ctx.limit
        if lim:  # clamp passes the gradient inside [min, max], bounds included (as torch's)
            keep_g, keep_u = g <= lim, (u >= -lim) & (u <= lim)
            g, u = g.clamp(max=lim), u.clamp(-lim, lim)
        sig = torch.sigmoid(g)
        silu = g * sig
        d = dh.float()
        dscale = None
        if scale is not None:
            dscale = (d * (silu * u)).sum_to_size(scale.shape).to(scale.dtype) if ctx.needs_input_grad[2] else None
            d = d * scale
        dg = d * u * (sig * (1 + g * (1 - sig)))
        du = d * silu
        if lim:
            dg, du = dg * keep_g, du * keep_u
        return dg.to(gate.dtype), du.to(up.dtype), dscale, None, None


def linear_weight(m: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """The [out, in] matrix of a linear layer, for code that uses it other than as ``m(x)`` (the
    grouped output projection, V3's absorbed attention): a weight-quantized layer
    (``sparseek.quant``) decodes its storage."""
    dequantize = getattr(m, "dequantize", None)
    return m.weight if dequantize is None else dequantize(dtype)


def expert_ffn(mm, x: torch.Tensor, gate_up: list[torch.Tensor], w2: torch.Tensor, limit: float | None,
               scale: torch.Tensor | None, dtype: torch.dtype, dim: int = -1, act: str | None = None) -> torch.Tensor:
    """The routed experts' SwiGLU FFN with the products done by ``mm(x, w)``: ``gate_up`` is [w1, w3]
    or their [E, 2I, D] concatenation, split along ``dim`` of its product; ``act``: see ``swiglu``
    (``x`` arrives rounded: the MoE rounds each token once for all its experts)."""
    parts = [mm(x, w) for w in gate_up]
    gate, up = parts if len(parts) == 2 else parts[0].split(w2.shape[-1], dim)
    if dim == -1:
        return mm(swiglu(gate, up, limit, scale, dtype, act), w2)
    # features along ``dim``: the rounding's blocks run along them
    return mm(act_round(swiglu(gate, up, limit, scale, dtype).movedim(dim, -1), act).movedim(-1, dim), w2)


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters, same state dict) whose bf16 CPU inference products of a few
    rows run through the AMX kernel where the CPU has one (``cpu_kernels.linear_fits``): oneDNN
    packs the weight anew on every call, which is most of a call at a short prompt's rows."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bias is None and cpu_kernels.linear_fits(x, self.weight):
            return cpu_kernels.linear(x, self.weight)
        return F.linear(x, self.weight, self.bias)


class MLP(nn.Module):
    """Dense SwiGLU FFN (the shared expert, and V3's first dense layers)."""

    def __init__(self, dim: int, inter: int, limit: float | None = None, dtype=None, act: str | None = None):
        super().__init__()
        self.w1 = Linear(dim, inter, bias=False, dtype=dtype)
        self.w2 = Linear(inter, dim, bias=False, dtype=dtype)
        self.w3 = Linear(dim, inter, bias=False, dtype=dtype)
        self.limit = limit
        self.act_fp8 = act  # ModelArgs.act_scale_fmt: the FP8 rounding of each GEMM's input

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = act_round(x, self.act_fp8)
        return self.w2(swiglu(self.w1(x), self.w3(x), self.limit, dtype=x.dtype, act=self.act_fp8))


@torch.compiler.disable
def _grouped_mm_eager(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    return torch._grouped_mm(a, b, offs=offs)


def _grouped_mm(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    # CPUs with AMX: a kernel that does not re-pack each expert's weights per call (cpu_kernels.py)
    w = b.transpose(-2, -1)
    if cpu_kernels.grouped_mm_fits(a, w):
        return cpu_kernels.grouped_mm(a, w, offs)
    # The shape function torch.compile traces with admits bf16 only, the CPU kernel any float
    # dtype: other dtypes leave the compiled graph for this call. On a GPU the compiled grouped
    # GEMM serves the CUDA-graphed decode step (timed on an H200); its compiled backward is
    # untimed there, so training keeps the eager kernel, as before it was compiled at all.
    if torch.compiler.is_compiling() and (
            a.dtype != torch.bfloat16 or (a.device.type != "cpu" and torch.is_grad_enabled())):
        return _grouped_mm_eager(a, b, offs)
    return torch._grouped_mm(a, b, offs=offs)


def gate_up_view(w1: torch.Tensor, w3: torch.Tensor) -> torch.Tensor | None:
    """w1 and w3 read as one [E, 2I, D] matrix without a copy, where they are the two halves of one
    buffer (as ``Experts`` allocates them); None where they are not, under a compiler (which cannot
    ask where a tensor's storage lies), or where autograd must see them apart.

    Why: a small expert GEMM costs a fixed ~20-30 us in the CPU library (weight packing, setup)
    besides its FLOPs, so one GEMM with twice the columns beats two: 4-7% of a 128-512-token
    prefill of the ``small`` preset (``benchmarks/results/cpu-small-bf16-gate-up-ab.txt``)."""
    if torch.compiler.is_compiling() or w1.shape != w3.shape or w1.dim() != 3 or w1.dtype != w3.dtype:
        return None
    if torch.is_grad_enabled() and (w1.requires_grad or w3.requires_grad):
        return None
    if type(w1.data) is not torch.Tensor or type(w3.data) is not torch.Tensor or w1.device.type == "meta":
        return None  # DTensor shards, fake tensors
    E, I, D = w1.shape
    strides = (2 * I * D, D, 1)
    if (w1.stride() != strides or w3.stride() != strides or w1.device != w3.device
            or w1.untyped_storage().data_ptr() != w3.untyped_storage().data_ptr()
            or w3.storage_offset() != w1.storage_offset() + I * D):
        return None
    return w1.detach().as_strided((E, 2 * I, D), strides)


def grouped_ffn(xs_MD: torch.Tensor, expert_M: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor,
                limit: float | None, scale_M: torch.Tensor | None = None, pad: bool | None = None,
                w13: torch.Tensor | None = None, batched: bool | None = None, act: str | None = None) -> torch.Tensor:
    """Rows ``xs`` sorted by expert (``expert_M`` non-decreasing) through their experts' SwiGLU FFNs
    (``w*`` stacked [E, out, in]; ``scale_M`` multiplies before w2), as three grouped GEMMs, or two
    given ``w13`` (``gate_up_view(w1, w3)``: w1 and w3 as one matrix).

    Nothing here waits for the host: with ``pad`` (default on any device but the CPU, whose
    kernel is a loop of GEMMs) each expert's rows are placed in a buffer of fixed size M + 7E
    with every group starting at a multiple of 8 rows (the grouped kernel's 16-byte alignment),
    padding rows are zero. So the same code serves prefill, training and a CUDA-graphed decode
    step. Rows past the last group are never written by the kernel and never
    read back; under autograd the last group runs to the end of the buffer anyway, so that no
    gradient ever meets an unwritten row. CPU inference (no padding, no autograd) runs
    ``experts_batched`` instead, which may wait for the host: by default outside a compiled graph
    only (inside one, the grouped GEMMs let the SwiGLU between them fuse, a few percent of a compiled
    prefill), with ``batched`` also in a compiled decode step (1.25x faster at batch 32,
    ``benchmarks/results/cpu-small-bf16-experts-op.txt``).
    """
    M, E = xs_MD.shape[0], w1.shape[0]
    dev, out_dtype = xs_MD.device, xs_MD.dtype
    if torch.is_autocast_enabled(dev.type):  # autocast does not know the grouped GEMM: cast as it would
        xs_MD = xs_MD.to(torch.get_autocast_dtype(dev.type))
    gate_up = [t.to(xs_MD.dtype) for t in ((w13,) if w13 is not None else (w1, w3))]
    w2 = w2.to(xs_MD.dtype)
    if pad is None:
        pad = dev.type != "cpu"
    if batched is None:
        batched = not torch.compiler.is_compiling()
    if (batched and not pad and dev.type == "cpu" and not torch.is_grad_enabled() and CPU_BATCHED_EXPERTS
            and not cpu_kernels.grouped_mm_fits(xs_MD, gate_up[0])):  # the AMX kernel beats both
        return torch.ops.sparseek.experts_batched(xs_MD, expert_M, gate_up, w2, scale_M, limit, act).to(out_dtype)
    counts = torch.zeros(E, dtype=torch.long, device=dev).scatter_add_(0, expert_M, torch.ones_like(expert_M))
    if not pad:
        buf, offs, dest, scale_P1 = xs_MD, counts.cumsum(0).to(torch.int32), None, None
        if scale_M is not None:
            scale_P1 = scale_M.float()[:, None]
    else:
        padded = (counts + 7) // 8 * 8
        first = counts.cumsum(0) - counts
        dest = (padded.cumsum(0) - padded)[expert_M] + torch.arange(M, device=dev) - first[expert_M]
        P = M + 7 * E
        offs = padded.cumsum(0).to(torch.int32)
        if torch.is_grad_enabled():
            offs[-1] = P
        buf = xs_MD.new_zeros(P, xs_MD.shape[1]).index_copy(0, dest, xs_MD)
        scale_P1 = None
        if scale_M is not None:
            scale_P1 = torch.zeros(P, 1, dtype=torch.float32, device=dev).index_copy(0, dest, scale_M.float()[:, None])
    out = expert_ffn(lambda a, w: _grouped_mm(a, w.transpose(-2, -1), offs), buf, gate_up, w2, limit, scale_P1,
                     xs_MD.dtype, act=act)
    return (out if dest is None else out[dest]).to(out_dtype)


# CPU inference runs `experts_batched` (benchmarks switch it off to time the grouped GEMMs it replaced)
CPU_BATCHED_EXPERTS = True
# A CPU decode step gathers each slot's expert matrices into fused GEMVs up to this many (token,
# expert) slots per expert, then runs `experts_batched`. Compiled `small` bf16 steps, alternating
# in one process (`--ab-experts` in `benchmarks/results/cpu-small-bf16-experts-op.txt`): the
# gathers take 0.63x the op's time at batch 8 (1 slot per expert), 1.02x at 32 (4 per expert),
# 1.09x at 64. A layer's experts (25 MB there) fit in this CPU's 32 MB L3, so slots that share an
# expert read it from cache after the first; experts too big for it move the crossover down.
CPU_GATHER_SLOTS_PER_EXPERT = 2

# The cost model of `experts_batched`, in microseconds per expert for the `small` preset's experts
# (bf16, 2 cores, weights read from memory as in a model, not from cache), fitted to
# `benchmarks/profile_decode.py --expert-costs` (`benchmarks/results/cpu-small-bf16-experts-op.txt`):
# one expert's gate/up and down products cost ~55 us as library GEMM calls (oneDNN's per-call
# set-up) + 0.8 us per row; as its slice of a `bmm`, x @ W^T costs ~29 us + 0.8 us per row and the
# transposed W @ x^T a flat ~55 us up to 32 rows + 0.7 us per row past them (oneDNN runs the first
# twice as fast at a few rows, the second faster past ~32: the op takes the cheaper); each padded
# slot adds ~0.8 us of copies and SwiGLU around the bmm (the table's last column). Other sizes and
# machines shift the crossovers, not which side a decode step (few rows per expert) falls on.
_CALL_US, _CALL_ROW_US, _SLOT_US = 55, 0.8, 0.8
_XW_US, _XW_ROW_US, _WX_US, _WX_FREE_ROWS, _WX_ROW_US = 29, 0.8, 55, 32, 0.7


def _bmm_costs(L: int) -> tuple[float, float]:
    """One expert's slice of the padded bmm at L rows: (as x @ W^T, as W @ x^T)."""
    return _XW_US + _XW_ROW_US * L, _WX_US + _WX_ROW_US * max(0, L - _WX_FREE_ROWS)


def _bmm_us(L: int) -> float:
    return min(_bmm_costs(L))


def _x_first(L: int) -> bool:
    """Whether the padded bmm runs as x @ W^T (else W @ x^T) at L rows per expert."""
    xw, wx = _bmm_costs(L)
    return xw <= wx


def batched_rows(counts: list[int]) -> int:
    """How many rows of each expert ``experts_batched`` runs in its one ``bmm`` (0: none): the
    cheapest split by the cost model above, between padding every expert to L rows and one GEMM
    call per expert for the rows past L."""
    E, best, best_cost = len(counts), 0, None
    for L in sorted({0, *counts}):
        cost = E * (_bmm_us(L) + _SLOT_US * L) if L else 0
        cost += sum(_CALL_US + _CALL_ROW_US * (c - L) for c in counts if c > L)
        if best_cost is None or cost < best_cost:
            best, best_cost = L, cost
    return best


@torch.library.custom_op("sparseek::experts_batched", mutates_args=())
def experts_batched(xs_MD: torch.Tensor, expert_M: torch.Tensor, gate_up: list[torch.Tensor], w2: torch.Tensor,
                    scale_M: torch.Tensor | None, limit: float | None, act: str | None = None) -> torch.Tensor:
    """``grouped_ffn`` for CPU inference: up to L rows of every expert in one batched GEMM per
    matrix (``bmm``, padding rows zero), the rows past L (crowded experts) one library GEMM per
    expert (``batched_rows`` picks L).

    Why: the CPU's grouped GEMM is a loop of library calls with a fixed cost each (~55 us per
    expert against ~30 us as its slice of one ``bmm`` at a few rows, cost model above), so where
    experts see a handful of rows each (a batched decode step) the calls cost more than the
    products. An opaque op (the host reads the row counts),
    so a compiled decode step calls it as one node; there it also finds w1 and w3 as one matrix,
    which a compiler cannot (``gate_up_view``)."""
    M, D = xs_MD.shape
    E = w2.shape[0]
    if len(gate_up) == 2 and (w13 := gate_up_view(*gate_up)) is not None:
        gate_up = [w13]
    counts = torch.bincount(expert_M, minlength=E)
    L = batched_rows(counts.tolist())
    scale_M1 = None if scale_M is None else scale_M.float()[:, None]
    if L == 0:
        return _grouped_rows(xs_MD, counts, gate_up, w2, scale_M1, limit, act)
    rank_M = torch.arange(M) - (counts.cumsum(0) - counts)[expert_M]
    rest = (rank_M >= L).nonzero().squeeze(1) if L < int(counts.max()) else None
    batched = (rank_M < L).nonzero().squeeze(1) if rest is not None else None

    def pick(t):
        return t if batched is None else t[batched]
    slot = pick(expert_M * L + rank_M)
    x_ELD = xs_MD.new_zeros(E * L, D).index_copy_(0, slot, pick(xs_MD)).view(E, L, D)
    scale_EL1 = None
    if scale_M1 is not None:
        scale_EL1 = scale_M1.new_zeros(E * L).index_copy_(0, slot, pick(scale_M1[:, 0])).view(E, L, 1)
    if _x_first(L):
        out_ELD = expert_ffn(lambda a, w: torch.bmm(a, w.transpose(1, 2)), x_ELD, gate_up, w2, limit, scale_EL1,
                             xs_MD.dtype, act=act)
    else:  # the transposed product W @ x^T (columns = rows of x)
        scale_E1L = None if scale_EL1 is None else scale_EL1.transpose(1, 2)
        out_ELD = expert_ffn(lambda a, w: torch.bmm(w, a), x_ELD.transpose(1, 2).contiguous(), gate_up, w2, limit,
                             scale_E1L, xs_MD.dtype, dim=1, act=act).transpose(1, 2)
    out_MD = out_ELD.reshape(E * L, D)[slot]
    if rest is None:
        return out_MD
    full = torch.empty_like(xs_MD)
    full[batched] = out_MD
    full[rest] = _grouped_rows(xs_MD[rest], (counts - L).clamp(min=0), gate_up, w2,
                               None if scale_M1 is None else scale_M1[rest], limit, act)
    return full


def _grouped_rows(xs_MD, counts, gate_up, w2, scale_M1, limit, act):
    """Rows sorted by expert (``counts`` per expert) through one library GEMM per expert and matrix."""
    offs = counts.cumsum(0).to(torch.int32)
    return expert_ffn(lambda a, w: torch._grouped_mm(a, w.transpose(-2, -1), offs=offs), xs_MD, gate_up, w2, limit,
                      scale_M1, xs_MD.dtype, act=act)


@experts_batched.register_fake
def _(xs_MD, expert_M, gate_up, w2, scale_M, limit, act=None):
    return torch.empty_like(xs_MD)


class Experts(nn.Module):
    """All routed experts of one layer as three stacked tensors [E, out, in].

    Stacking (rather than E small Linears) lets every expert run as one slice of a grouped
    computation and lets parallelism shard the E axis. Checkpoints keep DeepSeek's per-expert
    names; the state-dict adapter splits and stacks.
    """

    # ModelArgs.act_scale_fmt: w2's input rounded to FP8 (act_fp8); the MoE rounds x before them
    act_fp8: str | None = None

    def __init__(self, n: int, dim: int, inter: int, limit: float | None, dtype=None, act: str | None = None):
        super().__init__()
        self.n, self.act_fp8 = n, act
        gate_up = torch.empty(n, 2 * inter, dim, dtype=dtype)  # w1 and w3 as halves: see gate_up_view
        self.w1 = nn.Parameter(gate_up[:, :inter])
        self.w2 = nn.Parameter(torch.empty(n, dim, inter, dtype=dtype))
        self.w3 = nn.Parameter(gate_up[:, inter:])
        self.limit = limit

    @classmethod
    def wrap(cls, w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor, limit: float | None,
             act: str | None = None) -> "Experts":
        """Experts over existing stacks (no allocation): a merged LoRA, decoded quantized experts."""
        out = cls.__new__(cls)
        nn.Module.__init__(out)
        out.n, out.limit, out.act_fp8 = w1.shape[0], limit, act
        out.w1, out.w2, out.w3 = w1, w2, w3
        return out

    def fuse_gate_up_(self) -> "Experts":
        """Move w1 and w3 into the two halves of one buffer (in place; values unchanged), as
        ``__init__`` allocates them: loading a checkpoint or casting the module makes them
        separate tensors, and inference then runs one more GEMM per expert."""
        w1, w3 = self.w1, self.w3
        if w1.shape != w3.shape or w1.device.type == "meta" or type(w1.data) is not torch.Tensor:
            return self
        with torch.no_grad():
            if gate_up_view(w1, w3) is None:  # no_grad: autograd does not keep them apart here
                inter = w1.shape[1]
                gate_up = torch.cat([w1, w3], dim=1)
                w1.data, w3.data = gate_up[:, :inter], gate_up[:, inter:]
        return self

    # one grouped GEMM per matrix instead of a Python loop over experts (torch >= 2.8); tests
    # switch it off to compare with the loop, which stays the reference and the LoRA path
    grouped = hasattr(torch, "_grouped_mm")

    def forward(self, x_ND: torch.Tensor, weights_NK: torch.Tensor, idx_NK: torch.Tensor,
                batched: bool | None = None) -> torch.Tensor:
        """``batched``: how CPU inference runs the experts (``grouped_ffn``)."""
        # where w1 and w3 lie is asked here, outside the compiled `compute` (a compiler cannot ask)
        return self.compute(x_ND, weights_NK, idx_NK, gate_up_view(self.w1, self.w3), batched)

    def compute(self, x_ND: torch.Tensor, weights_NK: torch.Tensor, idx_NK: torch.Tensor,
                w13: torch.Tensor | None = None, batched: bool | None = None) -> torch.Tensor:
        k = idx_NK.shape[1]
        flat_idx = idx_NK.reshape(-1)
        order = flat_idx.argsort(stable=True)
        # which token each sorted (token, slot) pair belongs to
        return self.pairs(x_ND, order // k, flat_idx[order], weights_NK.reshape(-1)[order], w13, batched)

    def pairs(self, x_ND: torch.Tensor, token_of: torch.Tensor, e_sorted: torch.Tensor, w_sorted: torch.Tensor,
              w13: torch.Tensor | None = None, batched: bool | None = None) -> torch.Tensor:
        """Sum over (token, expert, weight) pairs, sorted by expert, of weight * expert(x[token])."""
        if self.grouped and type(self).proj is Experts.proj:
            out = grouped_ffn(x_ND[token_of], e_sorted, self.w1, self.w2, self.w3, self.limit, w_sorted,
                              w13=w13, batched=batched, act=self.act_fp8)
        else:
            out = self._forward_loop(x_ND[token_of], e_sorted, w_sorted.unsqueeze(-1))
        if torch.is_grad_enabled() and out.requires_grad:
            return _SumRows.apply(token_of, out, x_ND.shape[0])
        return torch.zeros_like(x_ND).index_add_(0, token_of, out)

    def _forward_loop(self, x_sorted: torch.Tensor, flat_idx: torch.Tensor, w_sorted: torch.Tensor) -> torch.Tensor:
        counts = torch.bincount(flat_idx, minlength=self.n).tolist()
        out = torch.empty_like(x_sorted)
        start = 0
        for e, c in enumerate(counts):
            if c == 0:
                continue
            xs = x_sorted[start:start + c]
            # the routing weight multiplies before w2, as in DeepSeek's code (equal by linearity)
            h = swiglu(self.proj(xs, e, "w1"), self.proj(xs, e, "w3"), self.limit, w_sorted[start:start + c],
                       x_sorted.dtype, self.act_fp8)
            out[start:start + c] = self.proj(h, e, "w2")
            start += c
        return out

    def proj(self, x: torch.Tensor, e: int, name: str) -> torch.Tensor:
        """x @ W_e^T for expert e's matrix ``name`` (the hook LoRA adapters override)."""
        return x @ getattr(self, name)[e].t()

    def forward_static(self, x_ND: torch.Tensor, weights_NK: torch.Tensor, idx_NK: torch.Tensor) -> torch.Tensor:
        """The same function with fixed shapes: each (token, slot) gathers its expert's matrices.
        Right for the few tokens of a decode step (it reads k experts per token), wrong for prefill.
        One slot at a time: each product then reduces along a contiguous weight row, which a
        compiler turns into a streaming GEMV (~5x faster on a CPU than one [N, k, ...] contraction
        whose w2 reduction runs across slots)."""
        y_ND = torch.zeros_like(x_ND, dtype=torch.float32)
        for j in range(idx_NK.shape[1]):
            e_N = idx_NK[:, j]
            gate, up = self.gathered_mv(x_ND, "w1", e_N), self.gathered_mv(x_ND, "w3", e_N)
            h = swiglu(gate, up, self.limit, weights_NK[:, j, None], x_ND.dtype, self.act_fp8)
            y_ND = y_ND + self.gathered_mv(h, "w2", e_N).float()
        return y_ND.to(x_ND.dtype)

    def gathered_mv(self, x_NI: torch.Tensor, name: str, e_N: torch.Tensor) -> torch.Tensor:
        """Row n of x times expert e_N[n]'s matrix ``name``: [N, out]."""
        return torch.einsum("ni,noi->no", x_NI, self.gathered(name, e_N, x_NI.dtype))

    def gathered(self, name: str, e_N: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Matrix ``name`` of expert e_N[n] for each n: [N, out, in] (quantized experts decode it)."""
        return getattr(self, name)[e_N]


def mapped(experts: nn.Module, fn) -> nn.Module:
    """A shallow copy of an expert stack (plain or quantized) whose tensors are ``fn(tensor)``
    (moved, pinned), the original left as it is; w1 and w3 stay halves of one buffer."""
    import copy

    out = copy.copy(experts)
    with torch.no_grad():  # (gate_up_view hides the buffer from autograd)
        w13 = gate_up_view(experts.w1, experts.w3) if isinstance(experts, Experts) else None
    fused = ("w1", "w3") if w13 is not None else ()  # mapped as their one buffer below
    out._parameters = {k: None if v is None else nn.Parameter(fn(v.detach()), requires_grad=False)
                       for k, v in experts._parameters.items() if k not in fused}
    out._buffers = {k: None if v is None else fn(v) for k, v in experts._buffers.items()}
    if w13 is not None:
        gate_up, inter = fn(w13), experts.w1.shape[1]
        out.w1, out.w3 = (nn.Parameter(gate_up[:, :inter], requires_grad=False),
                          nn.Parameter(gate_up[:, inter:], requires_grad=False))
    return out


def host_experts(experts: nn.Module, x_ND: torch.Tensor, weights_NK: torch.Tensor, idx_NK: torch.Tensor
                 ) -> torch.Tensor:
    """The split forward's part where the experts live (``MoE._offloaded``);
    ``sparseek.parallel.offload.compile_host_experts`` swaps in a compiled one."""
    return experts(x_ND, weights_NK, idx_NK)


def routed_params(model: nn.Module) -> int:
    """Parameters of the routed experts, the MTP block's included: what ``--cpu-moe`` keeps in
    host memory."""
    return sum(p.numel() for m in model.modules() if isinstance(m, MoE) for p in m.experts.parameters())


class MoE(nn.Module):
    def __init__(self, args: ModelArgs, hash_routed: bool, dtype=None, with_bias: bool = True):
        super().__init__()
        self.gate = Gate(args, hash_routed=hash_routed, with_bias=with_bias)
        act = args.act_scale_fmt
        self.experts = Experts(args.n_routed_experts, args.hidden_size, args.moe_intermediate_size,
                               args.swiglu_limit, dtype=dtype, act=act)
        self.shared_experts = None
        if args.n_shared_experts:
            shared_limit = args.swiglu_limit if args.clamp_shared_expert else None
            self.shared_experts = MLP(args.hidden_size, args.moe_intermediate_size * args.n_shared_experts,
                                      shared_limit, dtype=dtype, act=act)
        # Routing statistics of the last forward, for the balancing update and the sequence-wise
        # loss (train/): set only when `record_routing` is on, so inference pays nothing.
        self.record_routing = False
        self.last_routing: tuple[torch.Tensor, torch.Tensor] | None = None

    def _gathers(self, x: torch.Tensor, idx: torch.Tensor) -> bool:
        """How a fixed-shape step runs its experts: gathering each (token, slot)'s matrices costs a
        copy of them, so on a GPU the grouped GEMM (which reads them in place) always wins where
        it has a fast bf16 kernel (elsewhere it would wait for the host, breaking the CUDA graph).
        On a CPU, inductor fuses the gather into its GEMV, which streams weights faster than a
        library GEMM and reads an expert that several slots share from cache after the first: it
        wins at a few slots per expert, ``experts_batched`` (one ``bmm`` over all experts) from
        ~4 (``CPU_GATHER_SLOTS_PER_EXPERT``)."""
        if not self.experts.grouped:
            return True
        if x.is_cuda:
            return x.dtype != torch.bfloat16
        return idx.numel() <= CPU_GATHER_SLOTS_PER_EXPERT * self.experts.n

    def forward(self, x_BTD: torch.Tensor, input_ids_BT: torch.Tensor | None = None, static: bool = False
                ) -> torch.Tensor:
        shape = x_BTD.shape
        x = x_BTD.reshape(-1, shape[-1])
        ids = input_ids_BT.reshape(-1) if input_ids_BT is not None else None
        w, idx, scores = self.gate(x, ids)
        if self.record_routing:
            self.last_routing = (idx.view(*shape[:-1], -1), scores.view(*shape[:-1], -1))
        # the router reads x as it is; the experts' first GEMMs read it rounded (act_fp8), each token
        # once for all its experts (the shared expert rounds its own input)
        xr = act_round(x, self.experts.act_fp8)
        if self._experts_elsewhere(x):
            return self._offloaded(x, xr, w, idx).view(shape)
        if static and self._gathers(x, idx):
            y = self.experts.forward_static(xr, w, idx)
        else:
            y = self.experts(xr, w, idx, batched=True if static else None)
        if self.shared_experts is not None:
            y = y + self.shared_experts(x)
        return y.view(shape)

    # Offloaded experts (``--cpu-moe``) run on the GPU for a forward of at least this many tokens:
    # their bytes cross PCIe once per layer instead of the CPU computing every token (llama.cpp
    # offloads CPU-held weights' products to the GPU from 32 rows by default, as here). None: never.
    stream_tokens: int | None = 32

    def _experts_elsewhere(self, x: torch.Tensor) -> bool:
        """Whether the routed experts' weights are in other memory than x (``sparseek.parallel.offload``)."""
        return self.experts.w2.device != x.device

    def _offloaded(self, x_ND: torch.Tensor, xr_ND: torch.Tensor, w_NK: torch.Tensor, idx_NK: torch.Tensor
                   ) -> torch.Tensor:
        """The routed experts where their weights live (host memory beside a GPU, KTransformers'
        and llama.cpp's ``--cpu-moe``), the shared expert on x's device meanwhile.

        Order matters on a GPU: the rows' copy to the host is queued first and an event marks its
        end, then the shared expert's kernels are queued behind it, and the host waits only for
        the copy, so the GPU runs the shared expert while the CPU runs the routed ones. A forward
        of ``stream_tokens`` tokens or more (a prefill chunk) copies the layer's experts to x's
        device instead and runs them there: bytes of the experts once, not FLOPs of every token on
        the CPU."""
        if self.stream_tokens is not None and x_ND.shape[0] >= self.stream_tokens and not any(self.experts.children()):
            y = mapped(self.experts, lambda t: t.to(x_ND.device, non_blocking=True))(xr_ND, w_NK, idx_NK)
            return y if self.shared_experts is None else y + self.shared_experts(x_ND)
        dev = self.experts.w2.device
        sent = [t.to(dev, non_blocking=x_ND.is_cuda) for t in (xr_ND, w_NK, idx_NK)]
        done = None
        if x_ND.is_cuda:  # the host must not read the rows before their copy lands
            done = torch.cuda.Event()
            done.record()
        shared = self.shared_experts(x_ND) if self.shared_experts is not None else None
        if done is not None:
            done.synchronize()
        y = host_experts(self.experts, *sent).to(x_ND.device)
        return y if shared is None else y + shared
