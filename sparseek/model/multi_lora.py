"""Several LoRA adapters served at once, each batch row with its own (vLLM's multi-LoRA).

``attach_adapters(model, adapters)`` swaps the targeted modules for ones that hold every adapter's
pair, stacked: slot 0 is "no adapter" (zeros), slot k the k-th adapter, its scale folded into B,
ranks padded to the largest with zeros (which add nothing). It returns an ``AdapterRows``: a
forward over a cache takes each row's slot from ``cache.adapter`` (the engine writes it when a
sequence takes a row); without a cache the caller sets ``rows.slots`` ([B] long; None: all base).
Every swapped module adds its row's update:

* linear layers: y = W x + B_k (A_k x) for the tokens of rows with adapter k, one pair of small
  GEMMs per adapter present (a batch rarely holds more than a few);
* the grouped output projection (V4's ``wo_a``, read as a weight by the attention):
  ``grouped_delta``, the same update per head group;
* routed experts (the SwiGLU takes the adapted gate and up projections, so the update cannot be
  added after the FFN): prefill runs the experts one by one, each its rows' adapters as above;
  the fixed-shape decode step gathers each (token, slot)'s expert pair as it gathers the weights.

A batch whose rows all run the base model takes the plain paths (grouped GEMMs). Under
torch.compile (the engine's compiled decode step, ``LLM(compile=True)``) every token gathers its
own slot's pair instead (punica's BGMV: fixed shapes, no host synchronization, slot 0 adding
zeros), so the step compiles to one graph and can be captured as a CUDA graph. Adapters come
from ``sparseek finetune --lora-rank`` directories (``sparseek.checkpoint.adapters``).
"""

from __future__ import annotations

import torch
from torch import nn

from sparseek.model.common import Experts, swiglu


class AdapterRows:
    """Which adapter slot each batch row of the next forward runs with (shared by the modules)."""

    def __init__(self, names: list[str]):
        self.names = list(names)  # slot k + 1 holds names[k]
        self.slots: torch.Tensor | None = None
        self.adapters: dict[str, tuple[dict, dict]] = {}  # what attach_adapters stacked, by name
        self._undo: list = []  # (parent, attribute, module swapped out), for detach_adapters
        self._hook = None
        self._attn_impl: str | None = None

    def slot(self, name: str | None) -> int:
        if name is None:
            return 0
        if name not in self.names:
            raise ValueError(f"unknown LoRA adapter {name!r} (loaded: {', '.join(self.names) or 'none'})")
        return self.names.index(name) + 1

    def per_token(self, n_tokens: int) -> torch.Tensor | None:
        """The slot of each of ``n_tokens`` flattened tokens (rows' tokens are contiguous), or None
        when every row runs the base model."""
        s = self.slots
        if s is None or (not torch.compiler.is_compiling() and not bool(s.any())):
            return None
        if n_tokens % s.shape[0]:
            raise RuntimeError(f"{n_tokens} tokens do not split into {s.shape[0]} adapter rows")
        return s.repeat_interleave(n_tokens // s.shape[0])


def _stack(pairs: list[tuple[torch.Tensor, torch.Tensor, float] | None], lead: tuple, fan_in: int, fan_out: int,
           like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A [K + 1, *lead, r, in] and B [K + 1, *lead, out, r] (slot 0 and absent adapters zero, B
    times its adapter's scale, ranks zero-padded to the largest)."""
    r = max((p[0].shape[-2] for p in pairs if p is not None), default=1)
    A = torch.zeros(len(pairs) + 1, *lead, r, fan_in, dtype=like.dtype, device=like.device)
    B = torch.zeros(len(pairs) + 1, *lead, fan_out, r, dtype=like.dtype, device=like.device)
    for k, p in enumerate(pairs, start=1):
        if p is not None:
            a, b, scale = p
            A[k, ..., :a.shape[-2], :] = a
            B[k, ..., :b.shape[-1]] = b.float() * scale
    return A, B


def _add_updates(y: torch.Tensor, x: torch.Tensor, slots: torch.Tensor, A: torch.Tensor, B: torch.Tensor) -> None:
    """y[t] += B[s_t] (A[s_t] x[t]) for every token t (flattened [N, ...]), one adapter at a time
    (compiled: each token its gathered pair)."""
    if torch.compiler.is_compiling():
        y += torch.einsum("nr,nor->no", torch.einsum("nd,nrd->nr", x, A[slots]), B[slots]).to(y.dtype)
        return
    for k in slots.unique().tolist():
        if k:
            rows = (slots == k).nonzero().squeeze(1)
            y.index_add_(0, rows, ((x[rows] @ A[k].t()) @ B[k].t()).to(y.dtype))


class MultiLoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, pairs, rows: AdapterRows):
        super().__init__()
        self.base, self.rows = base, rows
        A, B = _stack(pairs, (), base.in_features, base.out_features, base.weight)
        self.register_buffer("A", A, persistent=False)
        self.register_buffer("B", B, persistent=False)

    @property
    def weight(self) -> torch.Tensor:
        # code that reads the weight itself (the grouped output projection) adds grouped_delta
        return self.base.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d = self.delta(x)
        return self.base(x) if d is None else self.base(x) + d

    def delta(self, x: torch.Tensor) -> torch.Tensor | None:
        """The rows' updates B_k A_k x alone (None: every row on the base model), for code that
        multiplies by the weight itself (MLA's naive form expanding the cached latents)."""
        slots = self.rows.per_token(x.shape[:-1].numel())
        if slots is None:
            return None
        y = torch.zeros(x.shape[:-1].numel(), self.base.out_features, dtype=x.dtype, device=x.device)
        _add_updates(y, x.reshape(-1, x.shape[-1]), slots, self.A, self.B)
        return y.view(*x.shape[:-1], -1)

    def grouped_delta(self, o_BTGI: torch.Tensor, n_groups: int) -> torch.Tensor | None:
        """The update of ``einsum("btgi,gri->btgr", o, W.view(G, R, I))`` (V4's grouped output
        projection): group g's output rows of B_k times A_k o_g."""
        slots = self.rows.per_token(o_BTGI.shape[:2].numel())
        if slots is None:
            return None
        B, T, G, I = o_BTGI.shape
        o = o_BTGI.reshape(B * T, G, I)
        if torch.compiler.is_compiling():
            t = torch.einsum("ngi,nri->ngr", o, self.A[slots])
            Bs = self.B[slots].view(B * T, G, -1, self.B.shape[-1])
            return torch.einsum("ngr,ngor->ngo", t, Bs).to(o.dtype).view(B, T, G, -1)
        out = torch.zeros(B * T, G, self.B.shape[1] // G, dtype=o.dtype, device=o.device)
        for k in slots.unique().tolist():
            if k:
                rows = (slots == k).nonzero().squeeze(1)
                t = torch.einsum("ngi,ri->ngr", o[rows], self.A[k])
                out[rows] = torch.einsum("ngr,gor->ngo", t, self.B[k].view(G, -1, self.B.shape[-1])).to(o.dtype)
        return out.view(B, T, G, -1)


class MultiLoRAExperts(Experts):
    def __init__(self, base: Experts, pairs: dict[str, list], rows: AdapterRows):
        nn.Module.__init__(self)
        self.n, self.limit, self.act_fp8 = base.n, base.limit, base.act_fp8
        self.w1, self.w2, self.w3 = base.w1, base.w2, base.w3
        self.rows = rows
        for name in ("w1", "w2", "w3"):
            w = getattr(base, name)
            A, B = _stack(pairs[name], (w.shape[0],), w.shape[2], w.shape[1], w)
            self.register_buffer(f"A_{name}", A, persistent=False)
            self.register_buffer(f"B_{name}", B, persistent=False)

    def forward(self, x_ND, weights_NK, idx_NK, batched=None):
        if torch.compiler.is_compiling():
            # a compiled step (decode, a speculative verify): each (token, slot) gathers its expert
            # and adapter pair, fixed shapes, no break out of the graph
            return self.forward_static(x_ND, weights_NK, idx_NK)
        return super().forward(x_ND, weights_NK, idx_NK, batched)

    @torch.compiler.disable  # prefill's experts one by one (data-dependent shapes) stay eager
    def pairs(self, x_ND, token_of, e_sorted, w_sorted, w13=None, batched=None):
        slots = self.rows.per_token(x_ND.shape[0])
        if slots is None:
            return super().pairs(x_ND, token_of, e_sorted, w_sorted, w13, batched)
        x_sorted, s_sorted = x_ND[token_of], slots[token_of]
        out = torch.empty_like(x_sorted)
        start = 0
        for e, c in enumerate(torch.bincount(e_sorted, minlength=self.n).tolist()):
            if c == 0:
                continue
            xs, ss = x_sorted[start:start + c], s_sorted[start:start + c]
            h = swiglu(self._proj(xs, e, "w1", ss), self._proj(xs, e, "w3", ss), self.limit,
                       w_sorted[start:start + c, None], x_ND.dtype, self.act_fp8)
            out[start:start + c] = self._proj(h, e, "w2", ss)
            start += c
        return torch.zeros_like(x_ND).index_add_(0, token_of, out)

    def _proj(self, x, e: int, name: str, slots) -> torch.Tensor:
        y = x @ getattr(self, name)[e].t()
        _add_updates(y, x, slots, getattr(self, f"A_{name}")[:, e], getattr(self, f"B_{name}")[:, e])
        return y

    def forward_static(self, x_ND, weights_NK, idx_NK):
        slots = self.rows.per_token(x_ND.shape[0])
        if slots is None:
            return super().forward_static(x_ND, weights_NK, idx_NK)
        y_ND = torch.zeros_like(x_ND, dtype=torch.float32)
        for j in range(idx_NK.shape[1]):
            e_N = idx_NK[:, j]

            def proj(x, name):
                a, b = getattr(self, f"A_{name}")[slots, e_N], getattr(self, f"B_{name}")[slots, e_N]
                return (self.gathered_mv(x, name, e_N)
                        + torch.einsum("nr,nir->ni", torch.einsum("nd,nrd->nr", x, a), b))

            h = swiglu(proj(x_ND, "w1"), proj(x_ND, "w3"), self.limit, weights_NK[:, j, None], x_ND.dtype,
                       self.act_fp8)
            y_ND = y_ND + proj(h, "w2").float()
        return y_ND.to(x_ND.dtype)


def attach_adapters(model: nn.Module, adapters: dict[str, tuple[dict, dict]]) -> AdapterRows:
    """Swap the modules any of ``adapters`` ({name: (adapter_config, state)} in sparseek's layout,
    ``sparseek.checkpoint.adapters.read_adapters``) has tensors for -- any linear layer (attention,
    indexer, compressor, shared and dense FFNs, MTP projections) and routed-expert stacks; returns
    the rows selector. Tensors for modules the model lacks, or cannot adapt, are refused by name."""
    from sparseek.model.lora import check_unquantized

    check_unquantized(model)
    rows = AdapterRows(list(adapters))
    rows.adapters = dict(adapters)
    rows._attn_impl = getattr(model, "attn_impl", None)
    keys = set().union(*(set(state) for _, state in adapters.values())) if adapters else set()
    used: set[str] = set()
    for q, child in list(model.named_modules()):
        if not q:
            continue

        def pair(cfg, state, key_a, key_b):
            if key_a not in state:
                return None
            used.update((key_a, key_b))
            return state[key_a].to(child_device(child)), state[key_b].to(child_device(child)), \
                cfg["lora_alpha"] / cfg["r"]
        parent_name, attr = q.rpartition(".")[::2]
        parent = model.get_submodule(parent_name) if parent_name else model
        if isinstance(child, Experts) and any(f"{q}.lora_A_{w}" in keys for w in ("w1", "w2", "w3")):
            # a stack holding experts [first, first + n) of the layer (an expert-sharded rank) takes
            # their pairs; its class may say how it serves adapters (``multi_lora_class``)
            first, total = getattr(child, "first", 0), getattr(child, "total", None) or child.n

            def part(p):
                if p is not None and p[0].shape[0] != total:
                    raise ValueError(f"{q}: adapters for {p[0].shape[0]} experts, the layer has {total}")
                return None if p is None else (p[0][first:first + child.n], p[1][first:first + child.n], p[2])
            pairs = {w: [part(pair(cfg, st, f"{q}.lora_A_{w}", f"{q}.lora_B_{w}")) for cfg, st in adapters.values()]
                     for w in ("w1", "w2", "w3")}
            setattr(parent, attr, getattr(child, "multi_lora_class", MultiLoRAExperts)(child, pairs, rows))
            rows._undo.append((parent, attr, child))
        elif isinstance(child, nn.Linear) and f"{q}.lora_A" in keys:
            pairs = [pair(cfg, st, f"{q}.lora_A", f"{q}.lora_B") for cfg, st in adapters.values()]
            setattr(parent, attr, MultiLoRALinear(child, pairs, rows))
            rows._undo.append((parent, attr, child))
            if attr == "wkv_b" and hasattr(model, "attn_impl"):
                # MLA's absorbed form reads wkv_b as a matrix; the naive form runs it per token
                model.attn_impl = "naive"
    if keys - used:
        detach_adapters(model, rows)
        left = sorted(keys - used)
        raise ValueError(f"{len(left)} adapter tensors name no linear layer or expert stack of this model "
                         f"(e.g. {left[:3]}); serve such adapters merged (--lora / -m)")

    def follow_cache(module, args, kwargs):
        # a forward over a cache runs each row with the adapter the cache row holds (Cache.adapter);
        # without one, rows.slots stays as the caller set it
        cache = args[1] if len(args) > 1 else kwargs.get("cache")
        if cache is not None:
            rows.slots = cache.adapter

    rows._hook = model.register_forward_pre_hook(follow_cache, with_kwargs=True)
    return rows


def detach_adapters(model: nn.Module, rows: AdapterRows) -> None:
    """Undo ``attach_adapters``: the swapped modules go back, the model runs as before."""
    for parent, attr, child in reversed(rows._undo):
        setattr(parent, attr, child)
    rows._undo.clear()
    if rows._hook is not None:
        rows._hook.remove()
        rows._hook = None
    if rows._attn_impl is not None:
        model.attn_impl = rows._attn_impl


def child_device(m: nn.Module) -> torch.device:
    return next(m.parameters()).device


__all__ = ["AdapterRows", "MultiLoRALinear", "MultiLoRAExperts", "attach_adapters", "detach_adapters"]
