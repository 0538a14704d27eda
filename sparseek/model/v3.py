"""DeepSeek-V3 / R1 and V2-Lite: multi-head latent attention (MLA) + DeepSeekMoE, DeepSeek's names.

MLA caches one normalized latent c_kv (kv_lora_rank) and one shared rope key k_pe per token.
Two equivalent ways to attend:

* naive: expand every cached latent through ``wkv_b`` into per-head keys and values;
* absorbed: fold ``wkv_b``'s key half into the query (q~ = q_nope W_k, a kv_lora_rank-dim query
  per head), attend over the latents directly, and apply ``wkv_b``'s value half after the sum.
  This reads 576 numbers per cached token instead of H * 256, which is what decoding wants.

``attn_impl`` picks one ("naive", "absorb") or lets the length decide ("auto": absorb for short
chunks against a cache, naive for long prompts).

V3 / R1 ship one multi-token-prediction layer (DeepSeek-V3 report §2.2; ``model.layers.61`` in the
checkpoint, ``mtp.0`` here): ``MTPBlock`` reads the main model's last hidden state at t and the
embedding of token t+1 and predicts token t+2 through one more decoder layer and the shared head.
The engine drafts with it (speculative decoding); training adds its loss.
"""

from __future__ import annotations

import torch
from torch import nn

from sparseek.config import ModelArgs
from sparseek.model.cache import Cache
from sparseek.model.common import (MLP, Linear, MoE, RMSNorm, Rotary, apply_rope, linear_weight, routed_params,
                                   yarn_mscale)
from sparseek.model.qat import act_round
from sparseek.model.base import DecoderLM, _check_ids, attn_block_budget, init_params, logit_positions


def _rope_layout(args: ModelArgs) -> bool:
    """DeepSeek's code rotates interleaved pairs; transformers checkpoints may say otherwise."""
    return bool(args.extra.get("rope_interleave", True))


def apply_rope_half(x, cos, sin):
    """Rotation of (x[:d/2], x[d/2:]) pairs, for checkpoints stored with rope_interleave = false."""
    rd = 2 * cos.shape[-1]
    rope = x[..., -rd:].float()
    a, b = rope[..., : rd // 2], rope[..., rd // 2:]
    out = torch.cat((a * cos - b * sin, b * cos + a * sin), dim=-1).to(x.dtype)
    return torch.cat((x[..., :-rd], out), dim=-1) if rd < x.shape[-1] else out


class MLA(nn.Module):
    def __init__(self, args: ModelArgs, dtype=None):
        super().__init__()
        self.n_heads = args.num_attention_heads
        self.nope, self.rope, self.v_dim = args.qk_nope_head_dim, args.qk_rope_head_dim, args.v_head_dim
        self.rank = args.kv_lora_rank
        self.interleaved = _rope_layout(args)
        d, qk = args.hidden_size, args.qk_head_dim
        if args.q_lora_rank:
            self.wq_a = Linear(d, args.q_lora_rank, bias=False, dtype=dtype)
            self.q_norm = RMSNorm(args.q_lora_rank, args.rms_norm_eps)
            self.wq_b = Linear(args.q_lora_rank, self.n_heads * qk, bias=False, dtype=dtype)
        else:
            self.wq = Linear(d, self.n_heads * qk, bias=False, dtype=dtype)
        self.wkv_a = Linear(d, self.rank + self.rope, bias=False, dtype=dtype)
        self.kv_norm = RMSNorm(self.rank, args.rms_norm_eps)
        self.wkv_b = Linear(self.rank, self.n_heads * (self.nope + self.v_dim), bias=False, dtype=dtype)
        self.wo = Linear(self.n_heads * self.v_dim, d, bias=False, dtype=dtype)
        self.scale = qk ** -0.5
        y = args.yarn()
        if y and y.get("mscale_all_dim"):
            self.scale *= yarn_mscale(float(y["factor"]), y["mscale_all_dim"]) ** 2
        self.attn_impl = "auto"
        self.act_fp8 = args.act_scale_fmt  # the FP8 rounding of each quantized GEMM's input

    def act(self, x):
        return act_round(x, self.act_fp8)

    def _rot(self, x, cos, sin):
        return apply_rope(x, cos, sin) if self.interleaved else apply_rope_half(x, cos, sin)

    def forward(self, x_BTD, cos, sin, latent_BSR, pos_B, decode: bool):
        """``latent_BSR``: cache rows to write the new tokens into and attend over ([B, cap, rank+rope]),
        or None (no cache: attend within this chunk)."""
        B, T, _ = x_BTD.shape
        xr = self.act(x_BTD)
        q = self.wq_b(self.act(self.q_norm(self.wq_a(xr)))) if hasattr(self, "wq_a") else self.wq(xr)
        q = q.view(B, T, self.n_heads, -1)
        q_nope, q_pe = q[..., :self.nope], self._rot(q[..., self.nope:], cos[:, :, None], sin[:, :, None])
        kv = self.wkv_a(xr)
        lat = torch.cat([self.kv_norm(kv[..., :self.rank]), self._rot(kv[..., self.rank:], cos, sin)], dim=-1)
        if latent_BSR is not None:
            rows = torch.arange(B, device=x_BTD.device)[:, None]
            cols = pos_B[:, None] + torch.arange(T, device=x_BTD.device)
            with torch.no_grad():
                latent_BSR[rows, cols] = lat
            S = int(pos_B.max()) + T
            keys = latent_BSR[:, :S]
            q_pos = cols  # [B, T]
        else:
            keys, S = lat, T
            q_pos = torch.arange(T, device=x_BTD.device).expand(B, T)
        impl = self.attn_impl
        if impl == "auto":
            impl = "absorb" if (latent_BSR is not None and T <= 16) else "naive"
        o = self._attend(q_nope, q_pe, keys, q_pos, impl)
        return self.wo(self.act(o.flatten(2)))

    def _attend(self, q_nope, q_pe, keys_BSR, q_pos_BT, impl: str):
        B, T, H, _ = q_nope.shape
        S = keys_BSR.shape[1]
        c_kv, k_pe = keys_BSR[..., :self.rank], keys_BSR[..., self.rank:]
        w = linear_weight(self.wkv_b, q_nope.dtype).view(H, self.nope + self.v_dim, self.rank)
        w_k, w_v = w[:, :self.nope], w[:, self.nope:]
        if impl == "absorb":
            q_lat = torch.einsum("bthn,hnr->bthr", q_nope, w_k)
        else:
            kv = torch.einsum("bsr,hnr->bshn", c_kv, w)
            if hasattr(self.wkv_b, "delta"):  # per-row LoRA adapters (sparseek.model.multi_lora)
                d = self.wkv_b.delta(c_kv)
                kv = kv if d is None else kv + d.view(B, S, H, -1)
            k_nope, v = kv[..., :self.nope], kv[..., self.nope:]
        Qb = max(1, min(T, attn_block_budget(q_nope.device) // max(1, B * H * S)))
        ar = torch.arange(S, device=q_nope.device)
        out = []
        for i0 in range(0, T, Qb):
            sl = slice(i0, min(T, i0 + Qb))
            if impl == "absorb":
                s = torch.einsum("bthr,bsr->bths", q_lat[:, sl], c_kv)
            else:
                s = torch.einsum("bthn,bshn->bths", q_nope[:, sl], k_nope)
            s = (s + torch.einsum("bthr,bsr->bths", q_pe[:, sl], k_pe)).float() * self.scale
            s = s.masked_fill((ar[None, None, :] > q_pos_BT[:, sl, None])[:, :, None, :], float("-inf"))
            p = s.softmax(dim=-1).to(q_nope.dtype)
            if impl == "absorb":
                o = torch.einsum("bhtr,hvr->bthv", torch.einsum("bths,bsr->bhtr", p, c_kv), w_v)
            else:
                o = torch.einsum("bths,bshv->bthv", p, v)
            out.append(o)
        return torch.cat(out, dim=1) if len(out) > 1 else out[0]


class Block(nn.Module):
    def __init__(self, layer_id: int, args: ModelArgs, dtype=None):
        super().__init__()
        self.attn = MLA(args, dtype)
        dense = layer_id < args.first_k_dense_replace or layer_id % args.moe_layer_freq != 0
        self.ffn = (MLP(args.hidden_size, args.intermediate_size, dtype=dtype, act=args.act_scale_fmt) if dense
                    else MoE(args, hash_routed=False, dtype=dtype, with_bias=args.topk_method == "noaux_tc"))
        self.attn_norm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.ffn_norm = RMSNorm(args.hidden_size, args.rms_norm_eps)

    def forward(self, x, cos, sin, latent, pos, decode):
        x = x + self.attn(self.attn_norm(x), cos, sin, latent, pos, decode)
        h = self.ffn_norm(x)
        return x + self.ffn(h)


class MTPBlock(Block):
    """Multi-token prediction: h' = eh_proj([enorm(Emb(t+1)); hnorm(h_t)]), one decoder layer, then
    the shared head after its own norm (``shared_head.norm``). h_t is the main model's last hidden
    state after its final norm (what vLLM and SGLang feed DeepSeek-V3's MTP layer); chained drafts
    feed the layer's own output back. Embedding and head are the main model's."""

    def __init__(self, layer_id: int, args: ModelArgs, dtype=None):
        super().__init__(layer_id, args, dtype)
        d = args.hidden_size
        self.enorm = RMSNorm(d, args.rms_norm_eps)
        self.hnorm = RMSNorm(d, args.rms_norm_eps)
        self.eh_proj = Linear(2 * d, d, bias=False, dtype=dtype)
        self.norm = RMSNorm(d, args.rms_norm_eps)

    def forward(self, hidden_BTD, emb_BTD, cos, sin, latent, pos, decode):
        """(the layer's output, normalized for the shared head)."""
        x = self.eh_proj(torch.cat([self.enorm(emb_BTD), self.hnorm(hidden_BTD)], dim=-1))
        x = super().forward(x, cos, sin, latent, pos, decode)
        return x, self.norm(x)


class DeepSeekV3(DecoderLM):
    def __init__(self, args: ModelArgs, dtype: torch.dtype | None = None):
        super().__init__()
        self.args = args
        self.embed = nn.Embedding(args.vocab_size, args.hidden_size, dtype=dtype)
        self.layers = nn.ModuleList(Block(i, args, dtype) for i in range(args.num_hidden_layers))
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.head = Linear(args.hidden_size, args.vocab_size, bias=False, dtype=dtype)
        y = args.yarn()
        factor = 1.0
        if y:
            ms, ms_all = y.get("mscale"), y.get("mscale_all_dim")
            f = float(y["factor"])
            factor = yarn_mscale(f, ms) / yarn_mscale(f, ms_all) if (ms and ms_all) else yarn_mscale(f)
        self.rotary = Rotary(args.qk_rope_head_dim, args.rope_theta, y, attention_factor=factor)
        self.mtp = nn.ModuleList(MTPBlock(args.num_hidden_layers + i, args, dtype) for i in range(args.n_mtp))

    @property
    def attn_impl(self) -> str:
        return self.layers[0].attn.attn_impl

    @attn_impl.setter
    def attn_impl(self, impl: str) -> None:
        if impl not in ("auto", "naive", "absorb"):
            raise ValueError(f"attn_impl must be auto, naive or absorb, got {impl!r}")
        for layer in self.layers:
            layer.attn.attn_impl = impl

    def forward(self, input_ids: torch.Tensor, cache: Cache | None = None, *, last_n: int | None = None,
                at: torch.Tensor | None = None, return_hidden: bool = False, targets: torch.Tensor | None = None):
        """input_ids [B, T] -> logits [B, T, V] (fp32); with a cache, continue each row's sequence.
        ``return_hidden``: also the last hidden states after the final norm (every position), what
        the MTP layer reads. ``targets``: the mean cross-entropy instead of the logits (as V4's)."""
        B, T, _ = self._begin(input_ids, cache)  # MLA writes and masks by each row's own positions
        if cache is not None:
            pos = cache.pos
        else:
            pos = torch.zeros(B, dtype=torch.long, device=input_ids.device)
        positions = pos[:, None] + torch.arange(T, device=input_ids.device)
        cos, sin = self.rotary(positions)
        x = self.embed(input_ids)
        decode = cache is not None and T == 1
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, cache.layers[i].latent if cache is not None else None, pos, decode)
        if cache is not None:
            cache.pos += T
        h = self.norm(x) if return_hidden else None
        hp = logit_positions(h, last_n, at) if return_hidden else self.norm(logit_positions(x, last_n, at))
        out = self._head_out(hp, targets)
        return (out, h) if return_hidden else out

    def forward_mtp(self, hidden_BTD: torch.Tensor, next_ids: torch.Tensor, cache: Cache | None = None,
                    start: int | torch.Tensor = 0, *, last_n: int | None = None, at: torch.Tensor | None = None,
                    return_hidden: bool = False, targets: torch.Tensor | None = None):
        """MTP logits (or with ``targets`` their mean cross-entropy) predicting token t+2 from the
        hidden state at t (``forward(...,
        return_hidden=True)``'s, or this layer's own output when drafts chain) and token t+1
        (``next_ids``). With a cache the layer keeps its own latents (``cache.layers[-1]``) and
        position counter (``cache.mtp_pos``); without one, the first entry sits at ``start``.
        ``last_n`` / ``at`` pick positions as ``forward`` does; ``return_hidden``: also the layer's
        output there (to chain the next draft on)."""
        if not len(self.mtp):
            raise ValueError("this model has no MTP layer (num_nextn_predict_layers = 0)")
        B, T = _check_ids(next_ids, self.args.vocab_size)
        if cache is not None:
            pos = cache.mtp_pos
            latent = cache.layers[self.args.num_hidden_layers].latent
        else:
            pos = torch.full((B,), int(start), dtype=torch.long, device=next_ids.device)
            latent = None
        cos, sin = self.rotary(pos[:, None] + torch.arange(T, device=next_ids.device))
        x, h = self.mtp[0](hidden_BTD, self.embed(next_ids), cos, sin, latent, pos,
                           cache is not None and T == 1)
        if cache is not None:
            cache.mtp_pos += T
        h = logit_positions(h, last_n, at)
        out = self._head_out(h, targets)
        return (out, logit_positions(x, None, at) if at is not None else x) if return_hidden else out

    def init_weights(self, std: float = 0.02, seed: int = 0) -> None:
        init_params(self, std, seed)

    def param_counts(self) -> dict[str, int]:
        a = self.args
        total = sum(p.numel() for p in self.parameters())
        n_moe = sum(isinstance(layer.ffn, MoE) for layer in self.layers)
        idle = (a.n_routed_experts - a.num_experts_per_tok) * 3 * a.hidden_size * a.moe_intermediate_size * n_moe
        emb = self.embed.weight.numel()
        mtp = sum(p.numel() for p in self.mtp.parameters())
        return {"total": total, "active": total - mtp - idle - emb, "embedding": emb, "mtp": mtp,
                "routed": routed_params(self)}
