"""Weight-quantized layers as module swaps: the model's code is unchanged, its linear layers and
routed experts keep DeepSeek's FP8 / FP4 storage and decode it inside the forward.

* ``QuantLinear`` replaces an ``nn.Linear``: ``y = x @ dequantize(W)^T``, decoded in the input's
  dtype per call. Its state is ``weight`` + ``scale`` under the checkpoint's own names.
* ``QuantExperts`` replaces a layer's ``Experts``: a decode step (``forward_static``) decodes only
  the experts its tokens picked, a forward over many tokens decodes the experts that got any and
  runs them as the dense ``Experts`` do (grouped GEMMs), in groups of experts where a layer's
  would exceed ``DECODE_BUDGET_BYTES`` decoded, so memory holds at most that, transiently.

Memory is what this buys (V4's FP4 experts: 4.25 bits per weight instead of 16); the products run
on decoded weights in the activations' dtype, which is the same arithmetic as loading the
checkpoint dequantized (tests: equal logits). Compiled on a CPU, the products of a few rows (a
decode step's) read the codes a 32-bit word at a time instead (``formats.word_product``: the
same products in fp32, 4-9x faster there than decoding byte by byte); the forwards over many
tokens decode whole matrices inside a compiled graph, or by one compiled kernel per call once
``formats.compile_decoders()`` ran (``formats.decode``: 0.17-0.28 ns per weight into bf16 for
``small``'s experts instead of 2.2-4.4 eager).
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F
from torch import nn

from sparseek.model.common import Experts, gate_up_view, swiglu
from sparseek.quant.formats import (FORMATS, SCALE_FORMATS, check_shape, decode, packed_shape, published, quantize,
                                    scale_shape, word_planes_ok, word_product)

log = logging.getLogger("sparseek")

# products of up to this many rows decode the weight a 32-bit word at a time inside a compiled
# CPU step (``formats.word_product``): FP8 0.04-0.05 ns per weight against 0.47-0.50 through
# byte loads, FP4 0.08-0.12 against 0.43-1.0 (the bf16 GEMV: 0.05; `benchmarks/quant_gemv.py`,
# `benchmarks/results/cpu-quant-gemv.txt`); each row re-decodes the weight, as the fused bf16
# products re-read it (``model.fuse.FUSED_ROWS``)
WORD_ROWS = 8
# a forward over many tokens decodes at most this many bytes of a layer's experts at once (more
# experts than that run in groups, each decoded into the same buffers)
DECODE_BUDGET_BYTES = 1 << 30


def _by_words(x: torch.Tensor, fmt: str, raw: torch.Tensor, rows: int | None = WORD_ROWS) -> bool:
    """Whether a product of ``x`` with ``raw`` takes ``word_product``: compiling, on a CPU, whole
    words and scale blocks, at most ``rows`` rows of x (None: any)."""
    return (torch.compiler.is_compiling() and x.device.type == "cpu" and word_planes_ok(fmt, raw)
            and (rows is None or x.shape[:-1].numel() <= rows))

# the linear layers DeepSeek's checkpoints store quantized (spec 7.2); the LM head, the router, the
# compressors and the indexer's head weights stay in bf16 / fp32
QUANTIZED_LINEARS = ("wq", "wq_a", "wq_b", "wkv", "wkv_a", "wkv_b", "wo", "wo_a", "wo_b", "w1", "w2", "w3",
                     "e_proj", "h_proj")


def _check(fmt: str, scale_fmt: str) -> None:
    if fmt not in FORMATS:
        raise ValueError(f"unknown weight format {fmt!r}; use one of {FORMATS}")
    if scale_fmt not in SCALE_FORMATS:
        raise ValueError(f"unknown scale format {scale_fmt!r}; use one of {SCALE_FORMATS}")


class QuantLinear(nn.Module):
    """A bias-free linear layer whose weight stays FP8 (or FP4) with its block scales."""

    def __init__(self, in_features: int, out_features: int, fmt: str = "fp8", scale_fmt: str = "e8m0",
                 device=None):
        super().__init__()
        _check(fmt, scale_fmt)
        if why := check_shape(fmt, out_features, in_features):
            raise ValueError(why)
        self.in_features, self.out_features = in_features, out_features
        self.fmt, self.scale_fmt = fmt, scale_fmt
        self.register_buffer("weight", torch.empty(packed_shape(fmt, out_features, in_features), dtype=torch.uint8,
                                                   device=device))
        self.register_buffer("scale", torch.empty(scale_shape(fmt, scale_fmt, out_features, in_features),
                                                  dtype=torch.uint8, device=device))

    @classmethod
    def from_linear(cls, linear: nn.Linear, fmt: str = "fp8", scale_fmt: str = "e8m0") -> "QuantLinear":
        if linear.bias is not None:
            raise ValueError("QuantLinear has no bias")
        q = cls(linear.in_features, linear.out_features, fmt, scale_fmt, device=linear.weight.device)
        q.weight, q.scale = quantize(linear.weight.detach(), fmt, scale_fmt)
        return q

    def dequantize(self, dtype: torch.dtype = torch.float32, scratch: str | None = None) -> torch.Tensor:
        """The weight decoded into ``dtype`` (``scratch``: see ``formats.decode``)."""
        return decode([(self.weight, self.scale)], self.fmt, self.scale_fmt, self.in_features, dtype,
                      scratch=scratch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _by_words(x, self.fmt, self.weight):
            return word_product(x, self.weight, self.scale, self.fmt, self.scale_fmt, self.out_features,
                                self.in_features).to(x.dtype)
        return F.linear(x, self.dequantize(x.dtype, scratch="linear"))

    def published(self) -> dict[str, torch.Tensor]:
        """``weight`` and ``scale`` in the checkpoint's dtypes (e4m3 / int8, e8m0 / fp32)."""
        return {"weight": published(self.weight, self.fmt), "scale": published(self.scale, self.scale_fmt)}

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.fmt}, scale {self.scale_fmt}"


class QuantExperts(Experts):
    """A layer's routed experts as quantized stacks ``w1``/``w2``/``w3`` [E, out, stored] with
    ``w1_scale``/``w2_scale``/``w3_scale``; saved under DeepSeek's per-expert names
    (``experts.E.w1.weight`` / ``.scale``)."""

    def __init__(self, n: int, dim: int, inter: int, limit: float | None, fmt: str = "fp4", scale_fmt: str = "e8m0",
                 device=None, act: str | None = None):
        nn.Module.__init__(self)
        _check(fmt, scale_fmt)
        self.n, self.limit, self.act_fp8 = n, limit, act
        self.fmt, self.scale_fmt = fmt, scale_fmt
        self.shapes = {"w1": (inter, dim), "w2": (dim, inter), "w3": (inter, dim)}
        for name, (o, i) in self.shapes.items():
            if why := check_shape(fmt, o, i):
                raise ValueError(f"experts.{name}: {why}")
            self.register_buffer(name, torch.empty(n, *packed_shape(fmt, o, i), dtype=torch.uint8, device=device))
            self.register_buffer(f"{name}_scale", torch.empty(n, *scale_shape(fmt, scale_fmt, o, i),
                                                              dtype=torch.uint8, device=device))

    @classmethod
    def from_experts(cls, experts: Experts, fmt: str = "fp4", scale_fmt: str = "e8m0") -> "QuantExperts":
        n, inter, dim = experts.w1.shape
        q = cls(n, dim, inter, experts.limit, fmt, scale_fmt, device=experts.w1.device, act=experts.act_fp8)
        for name in q.shapes:
            w = getattr(experts, name).detach()
            parts = [quantize(w[e], fmt, scale_fmt) for e in range(n)]
            setattr(q, name, torch.stack([p[0] for p in parts]))
            setattr(q, f"{name}_scale", torch.stack([p[1] for p in parts]))
        return q

    def fuse_gate_up_(self) -> "QuantExperts":
        return self

    def decoded(self, name: str | tuple[str, ...], dtype: torch.dtype, idx: torch.Tensor | None = None) -> torch.Tensor:
        """Matrix ``name`` of the experts ``idx`` (all: None) in ``dtype``: [len(idx), out, in];
        several names: their matrices concatenated along the rows."""
        names = (name,) if isinstance(name, str) else name
        mats = [(getattr(self, n), getattr(self, f"{n}_scale")) for n in names]
        return decode(mats, self.fmt, self.scale_fmt, self.shapes[names[0]][1], dtype, idx)

    def dense(self, idx: torch.Tensor, dtype: torch.dtype) -> Experts:
        """The experts ``idx`` decoded into plain ``Experts`` (w1 and w3 in one buffer: one GEMM).
        Into fresh memory: a kept buffer (``formats.decode``'s ``scratch``) is slower here, the
        compiled kernel that gathers some experts into a given buffer ran ~1.3x slower than into
        its own output (a scratch timing of a 1 GB group of FP4 experts, not a committed command)."""
        gate_up = self.decoded(("w1", "w3"), dtype, idx)
        inter = self.shapes["w1"][0]
        return Experts.wrap(gate_up[:, :inter], self.decoded("w2", dtype, idx), gate_up[:, inter:], self.limit,
                            self.act_fp8)

    def pairs(self, x_ND: torch.Tensor, token_of: torch.Tensor, e_sorted: torch.Tensor, w_sorted: torch.Tensor,
              w13: torch.Tensor | None = None, batched: bool | None = None) -> torch.Tensor:
        # decode only the experts some pair names; their local numbering keeps the order
        hit, local = torch.unique(e_sorted, return_inverse=True)
        per_expert = sum(math.prod(self.shapes[n]) for n in ("w1", "w2", "w3")) * x_ND.dtype.itemsize
        step = max(1, DECODE_BUDGET_BYTES // per_expert)
        if self.n <= step:  # the whole layer fits: one pass (inside a compiled graph too)
            dense = self.dense(hit, x_ND.dtype)
            return dense.pairs(x_ND, token_of, local, w_sorted, gate_up_view(dense.w1, dense.w3), batched)
        return self._in_groups(x_ND, token_of, hit, local, w_sorted, step, batched)

    @torch.compiler.disable
    def _in_groups(self, x_ND, token_of, hit, local, w_sorted, step: int, batched) -> torch.Tensor:
        """A big layer (a real model's hundreds of experts: GBs decoded) in groups of ``step``
        experts, so that memory holds at most DECODE_BUDGET_BYTES of decoded experts. Outside any
        compiled graph (whose decoded buffers would all be alive at once); the decoding itself is
        compiled once ``compile_decoders`` ran."""
        y_ND = torch.zeros_like(x_ND)
        ends = torch.searchsorted(local, torch.arange(step, len(hit) + step, step, device=local.device)).tolist()
        start = 0
        for g, end in enumerate(ends):
            part = slice(start, end)
            dense = self.dense(hit[g * step:(g + 1) * step], x_ND.dtype)
            y_ND += dense.pairs(x_ND, token_of[part], local[part] - g * step, w_sorted[part],
                                gate_up_view(dense.w1, dense.w3), batched)
            del dense  # before the next group decodes: one group's weights alive at a time
            start = end
        return y_ND

    def proj(self, x: torch.Tensor, e: int, name: str) -> torch.Tensor:
        return x @ self.decoded(name, x.dtype, torch.tensor([e], device=x.device))[0].t()

    def gathered(self, name: str, e_N: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        # the fixed-shape decode step (Experts.forward_static) decodes only each token's experts; a
        # compiled step fuses the decoding into its products
        return self.decoded(name, dtype, e_N)

    def forward_static(self, x_ND: torch.Tensor, weights_NK: torch.Tensor, idx_NK: torch.Tensor) -> torch.Tensor:
        # compiled on a CPU: every (token, slot) pair's matrices read a word at a time, all slots in
        # one product per matrix (each pair has its own weight: no row re-decodes another's)
        if not all(_by_words(x_ND, self.fmt, getattr(self, w), rows=None) for w in self.shapes):
            return super().forward_static(x_ND, weights_NK, idx_NK)
        N, K = idx_NK.shape

        def product(x, name):  # x [N, K, 1, in] -> [N, K, 1, out]
            out, inp = self.shapes[name]
            # gathered as words: the product reads each pair's codes in place (gathered as bytes,
            # the step would first copy them out, uint8 lane by lane)
            words = getattr(self, name).view(torch.int32)[idx_NK]
            return word_product(x, words, getattr(self, f"{name}_scale")[idx_NK], self.fmt, self.scale_fmt, out, inp)

        x = x_ND[:, None, None, :].expand(N, K, 1, x_ND.shape[-1])
        h = swiglu(product(x, "w1").to(x_ND.dtype), product(x, "w3").to(x_ND.dtype), self.limit,
                   weights_NK[:, :, None, None], x_ND.dtype, self.act_fp8)
        return product(h, "w2").sum((1, 2)).to(x_ND.dtype)

    def published(self) -> dict[str, torch.Tensor]:
        out = {}
        for name in self.shapes:
            out[name] = published(getattr(self, name), self.fmt)
            out[f"{name}_scale"] = published(getattr(self, f"{name}_scale"), self.scale_fmt)
        return out

    def extra_repr(self) -> str:
        return f"n={self.n}, {self.fmt}, scale {self.scale_fmt}"


def quantizable(name: str, module: nn.Module) -> bool:
    """Whether DeepSeek's checkpoints store this linear layer quantized (``name``: its full name)."""
    leaf = name.rsplit(".", 1)[-1]
    return (isinstance(module, nn.Linear) and leaf in QUANTIZED_LINEARS and module.bias is None
            and ".compressor" not in f".{name}")


def default_scale_format(model: nn.Module) -> str:
    """V4 checkpoints carry e8m0 ``.scale``; V3 / V2 fp32 ``weight_scale_inv``."""
    return "e8m0" if model.args.is_v4 else "f32"


def quantize_model_(model: nn.Module, experts: str | None = "fp4", linears: str | None = "fp8",
                    scale_fmt: str | None = None) -> nn.Module:
    """Swap the model's linear layers (spec 7.2's list) and routed experts for quantized ones, in
    place. ``experts="fp4"`` is V4's layout (FP8 everywhere else); ``"fp8"`` stores the experts in
    FP8 as V3 does; None leaves a kind unquantized. A matrix FP4 cannot hold (input dim not a
    multiple of 32) is stored in FP8, with a warning."""
    scale_fmt = scale_fmt or default_scale_format(model)
    for fmt in (experts, linears):
        if fmt is not None:
            _check(fmt, scale_fmt)
    fell_back = 0
    for parent_name, parent in list(model.named_modules()):
        for name, child in list(parent.named_children()):
            full = f"{parent_name}.{name}" if parent_name else name
            if experts and type(child) is Experts:
                fmt = experts
                if any(check_shape(fmt, o, i) for o, i in ((child.w1.shape[1], child.w1.shape[2]),
                                                           (child.w2.shape[1], child.w2.shape[2]))):
                    fmt, fell_back = "fp8", fell_back + 1
                setattr(parent, name, QuantExperts.from_experts(child, fmt, scale_fmt))
            elif linears and quantizable(full, child):
                fmt = linears if not check_shape(linears, child.out_features, child.in_features) else "fp8"
                setattr(parent, name, QuantLinear.from_linear(child, fmt, scale_fmt))
    if fell_back:
        log.warning("%d expert layers stored in FP8: their matrices' input dims are not multiples of 32 (FP4's "
                    "block)", fell_back)
    return model


def quantized_bytes(model: nn.Module) -> tuple[int, int]:
    """(bytes of quantized storage, bytes of everything else) among the model's tensors."""
    q = other = 0
    quant_ids = set()
    for m in model.modules():
        if isinstance(m, (QuantLinear, QuantExperts)):
            for b in m.buffers(recurse=False):
                quant_ids.add(id(b))
                q += b.numel() * b.element_size()
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) not in quant_ids:
            other += t.numel() * t.element_size()
    return q, other
