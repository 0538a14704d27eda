"""DeepSeek-V4 (Flash / Pro) in one file, with DeepSeek's own names for every weight.

Block: mHC(pre) -> attn_norm -> Attention -> mHC(post) -> mHC(pre) -> ffn_norm -> MoE -> mHC(post).

Attention is shared-KV MQA (K = V, one 512-dim head) over
  * a 128-token sliding window (every layer),
  * plus, for CSA layers (ratio 4), the top-k compressed entries picked by the lightning indexer,
  * or, for HCA layers (ratio 128), every causally visible compressed entry,
with a per-head sink logit in the softmax denominator and inverse RoPE on the output.

Memory: no [T, T] tensor is ever built. Queries are processed in blocks; a block sees a band of
the window, a gather of its top-k entries (CSA) or the visible compressed entries (HCA), so
memory per layer grows like T * (window + top-k + T/128).

Shapes use suffixes: B batch, T tokens, H heads, C head dim, D hidden, N compressed entries,
K selected entries, L window keys, S hc streams.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from sparseek.config import CSA_RATIO, ModelArgs
from sparseek.model import common, cpu_kernels, kernels
from sparseek.model.base import DecoderLM, _check_ids, attn_block_budget, init_params, logit_positions, query_block
from sparseek.model.cache import Cache, CompressorState, LayerCache, fp8_round
from sparseek.model.qat import act_round, fp4_round, hadamard
from sparseek.model.common import (Linear, MoE, RMSNorm, Rotary, apply_rope, fp32_region, linear_weight, rms_unweighted,
                                   routed_params)

# Forwards of up to this many tokens per row against a cache take the per-row path (decode steps,
# speculative verification and drafts; rows at any positions): the rings' spare slots let that many
# be written before any is attended. Past it, rows at different positions run one at a time.
PER_ROW_TOKENS = Cache.SPARE + 1



@dataclass
class Step:
    """Where the tokens of this forward sit in their sequences."""

    pos: torch.Tensor  # [B] start position of each row
    positions: torch.Tensor  # [B, T] absolute positions
    start: int | None  # common start of all rows (chunk path); None on the per-row path (decode, drafts)
    rotary: dict[str, Rotary]
    rope: dict[str, tuple[torch.Tensor, torch.Tensor]]  # cos/sin at `positions`, by rope kind
    static: bool = False  # decode with fixed shapes and no host syncs (for torch.compile / CUDA graphs)
    span: int | None = None  # static: every position read lies below it (None: the whole cache)
    memo: dict = field(default_factory=dict)  # what the layers of this forward share (attention masks)

    @property
    def per_row(self) -> bool:
        return self.start is None


def _picked(idx_BQK: torch.Tensor, n: int) -> torch.Tensor:
    """Indices (-1 = none) -> a [B, Q, n] mask of the picked entries (-1s land in a spare column)."""
    B, Q, _ = idx_BQK.shape
    slot = torch.where(idx_BQK < 0, n, idx_BQK)
    return torch.zeros(B, Q, n + 1, dtype=torch.bool, device=idx_BQK.device).scatter_(-1, slot, True)[..., :n]


def _comp_products(q_BGQHC, comp_BNC, comp_mask_BGQN, idx_BGQK, codec=None):
    """The compressed part's q.k products (None without one), the keys each query may see (bool,
    broadcast over heads) and the compressed values they scored (CSA: gathered per query, decoded
    if packed)."""
    if idx_BGQK is not None:
        rows = torch.arange(q_BGQHC.shape[0], device=q_BGQHC.device)[:, None, None, None]
        values = comp_BNC[rows, idx_BGQK.clamp(min=0)]  # [B, G, Q, K, C]
        if codec is not None:
            values = codec.decode(values)
        return torch.einsum("bgqhc,bgqkc->bgqhk", q_BGQHC, values), idx_BGQK >= 0, values
    if comp_BNC is not None and comp_BNC.shape[1] > 0:
        return torch.einsum("bgqhc,bnc->bgqhn", q_BGQHC, comp_BNC), comp_mask_BGQN, comp_BNC
    return None, None, None


def _comp_scores(q_BGQHC, comp_BNC, comp_mask_BGQN, idx_BGQK, scale, codec=None):
    """Masked fp32 scores of the compressed part (None without one) and the compressed values they
    scored (see ``_comp_products``)."""
    prod, keep, values = _comp_products(q_BGQHC, comp_BNC, comp_mask_BGQN, idx_BGQK, codec)
    if prod is None:
        return None, None
    return (prod.float() * scale).masked_fill(~keep[..., None, :], float("-inf")), values


def _scores(q_BGQHC, win_BGLC, win_mask_BGQL, comp_BNC, comp_mask_BGQN, idx_BGQK, scale, codec=None):
    """Masked fp32 scores of the window part, then ``_comp_scores``'."""
    s_win = torch.einsum("bgqhc,bglc->bgqhl", q_BGQHC, win_BGLC).float() * scale
    s_win = s_win.masked_fill(~win_mask_BGQL[..., None, :], float("-inf"))
    return (s_win, *_comp_scores(q_BGQHC, comp_BNC, comp_mask_BGQN, idx_BGQK, scale, codec))


def _values(p_win, win_BGLC, p_comp, values, gathered: bool):
    """sum_j p_j v_j over the window keys and the compressed values (K = V: the keys are the values)."""
    o = torch.einsum("bgqhl,bglc->bgqhc", p_win, win_BGLC)
    if p_comp is None:
        return o
    if gathered:
        return o + torch.einsum("bgqhk,bgqkc->bgqhc", p_comp, values)
    return o + torch.einsum("bgqhn,bnc->bgqhc", p_comp, values)


def attend_lse(q_BGQHC, win_BGLC, win_mask_BGQL, comp_BNC, comp_mask_BGQN, idx_BGQK, sink_H, scale, codec=None):
    """G blocks of Q queries each, in one call: softmax over [window keys ; compressed keys ; sink].
    -> (output [B, G, Q, H, C], log of the softmax denominator [B, G, Q, H], fp32).

    Each block has its own window keys (``win_BGLC``, a band of the sequence); the compressed
    entries ``comp_BNC`` are shared by all blocks. CSA passes ``idx_BGQK`` (indices into
    ``comp_BNC``, -1 = nothing) and its entries are gathered (and decoded, when ``codec`` says the
    cache stores them packed: only the picked ones); HCA passes ``comp_mask_BGQN`` and attends to
    the whole (visible) compressed prefix. Masks may have 1 in their batch dim (shared by rows).
    """
    H = q_BGQHC.shape[3]
    if cpu_kernels.attn_softmax_fits(q_BGQHC, win_BGLC, comp_BNC):  # bf16 CPU inference: csrc/cpu_attention.cpp
        prod_comp, keep_comp, values = _comp_products(q_BGQHC, comp_BNC, comp_mask_BGQN, idx_BGQK, codec)
        p_win, p_comp, lse = cpu_kernels.attn_softmax(torch.einsum("bgqhc,bglc->bgqhl", q_BGQHC, win_BGLC),
                                                      win_mask_BGQL, prod_comp, keep_comp, sink_H, scale)
        return _values(p_win, win_BGLC, p_comp, values, idx_BGQK is not None), lse
    s_win, s_comp, values = _scores(q_BGQHC, win_BGLC, win_mask_BGQL, comp_BNC, comp_mask_BGQN, idx_BGQK,
                                    scale, codec)
    # one softmax over [window ; compressed ; sink], its parts never concatenated (a compiler then
    # keeps each row's passes in cache). The sink is a logit per head whose value row is zero: it
    # only adds to the denominator, and keeps a row whose keys are all masked finite.
    sink = sink_H.float().view(H, 1)
    m = torch.maximum(s_win.amax(dim=-1, keepdim=True), sink)
    if s_comp is not None:
        m = torch.maximum(m, s_comp.amax(dim=-1, keepdim=True))
    e_win = torch.exp(s_win - m)
    denom = e_win.sum(dim=-1, keepdim=True) + torch.exp(sink - m)
    e_comp = None
    if s_comp is not None:
        e_comp = torch.exp(s_comp - m)
        denom = denom + e_comp.sum(dim=-1, keepdim=True)
    dt = q_BGQHC.dtype
    p_comp = None if e_comp is None else (e_comp / denom).to(dt)
    o = _values((e_win / denom).to(dt), win_BGLC, p_comp, values, idx_BGQK is not None)
    return o, (m + torch.log(denom)).squeeze(-1)


def attend_backward(do_BGQHC, q_BGQHC, win_BGLC, win_mask_BGQL, comp_BNC, comp_mask_BGQN, idx_BGQK, sink_H,
                    scale, o_BGQHC, lse_BGQH):
    """Gradients of ``attend_lse``'s output for (q, win, comp, sink), from its inputs, output and
    log-denominator alone: the probabilities are recomputed, p = exp(s - lse), as flash
    attention's backward does, so the forward keeps none of its [.., H, keys] tensors.

    With D = sum_c dO * O per row: dS = P * (dO . V - D) (the sink's value row is zero, so its dP is
    0 and d sink = -sum P_sink * D); K = V, so each key gets scale * dS^T Q + P^T dO."""
    dt = q_BGQHC.dtype
    gathered = idx_BGQK is not None
    s_win, s_comp, values = _scores(q_BGQHC, win_BGLC, win_mask_BGQL, comp_BNC, comp_mask_BGQN, idx_BGQK, scale)
    lse = lse_BGQH[..., None]
    D = (do_BGQHC.float() * o_BGQHC.float()).sum(dim=-1, keepdim=True)
    p_win = torch.exp(s_win - lse)
    ds_win = p_win * (torch.einsum("bgqhc,bglc->bgqhl", do_BGQHC, win_BGLC).float() - D)
    ds_win = (ds_win * scale).to(dt)
    dq = torch.einsum("bgqhl,bglc->bgqhc", ds_win, win_BGLC)
    dwin = (torch.einsum("bgqhl,bgqhc->bglc", ds_win, q_BGQHC)
            + torch.einsum("bgqhl,bgqhc->bglc", p_win.to(dt), do_BGQHC))
    dcomp = None
    if s_comp is not None:
        p_comp = torch.exp(s_comp - lse)
        if gathered:
            dp = torch.einsum("bgqhc,bgqkc->bgqhk", do_BGQHC, values)
        else:
            dp = torch.einsum("bgqhc,bnc->bgqhn", do_BGQHC, values)
        ds_comp = (p_comp * (dp.float() - D) * scale).to(dt)
        p_comp = p_comp.to(dt)
        if gathered:
            dq = dq + torch.einsum("bgqhk,bgqkc->bgqhc", ds_comp, values)
            dvals = (torch.einsum("bgqhk,bgqhc->bgqkc", ds_comp, q_BGQHC)
                     + torch.einsum("bgqhk,bgqhc->bgqkc", p_comp, do_BGQHC))
            rows = torch.arange(q_BGQHC.shape[0], device=q_BGQHC.device)[:, None, None, None]
            rows = rows.expand_as(idx_BGQK)
            # unpicked slots (-1) have P = dS = 0: they add zeros to entry 0
            dcomp = torch.zeros(comp_BNC.shape, dtype=torch.float32, device=comp_BNC.device)
            dcomp = dcomp.index_put_((rows, idx_BGQK.clamp(min=0)), dvals.float(), accumulate=True)
        else:
            dq = dq + torch.einsum("bgqhn,bnc->bgqhc", ds_comp, values)
            dcomp = (torch.einsum("bgqhn,bgqhc->bnc", ds_comp, q_BGQHC)
                     + torch.einsum("bgqhn,bgqhc->bnc", p_comp, do_BGQHC))
    H = q_BGQHC.shape[3]
    p_sink = torch.exp(sink_H.float().view(H, 1) - lse)  # [B, G, Q, H, 1]
    dsink = -(p_sink * D).sum(dim=(0, 1, 2)).view(H)
    return dq, dwin, dcomp, dsink


class _AttendRecompute(torch.autograd.Function):
    """``attend_lse`` keeping only (inputs, output, log-denominator) for backward."""

    @staticmethod
    def forward(ctx, q, win, win_mask, comp, comp_mask, idx, sink, scale):
        o, lse = attend_lse(q, win, win_mask, comp, comp_mask, idx, sink, scale)
        ctx.save_for_backward(q, win, win_mask, comp, comp_mask, idx, sink, o, lse)
        ctx.scale = scale
        ctx.mark_non_differentiable(lse)
        return o, lse

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, do, _dlse):
        q, win, win_mask, comp, comp_mask, idx, sink, o, lse = ctx.saved_tensors
        dq, dwin, dcomp, dsink = attend_backward(do.contiguous(), q, win, win_mask, comp, comp_mask, idx, sink,
                                                 ctx.scale, o, lse)
        return (dq, dwin.to(win.dtype), None, None if dcomp is None else dcomp.to(comp.dtype), None, None,
                dsink.to(sink.dtype), None)


# Training keeps O(T * H) per attention call for backward instead of its [.., H, keys] score,
# probability and gathered-value tensors (~1 MB per token per layer at V4-Flash sizes); False
# falls back to plain autograd through ``attend_lse`` (the reference the tests compare with).
recompute_attention = True


def _indexer_kl_rows(qI_BGQIC, wI_BGQI, keys_NC, idx_BGQK, seen_BGQN, target_BGQN):
    """Per query: KL(target || softmax of the indexer's logits over the same entries), the indexer
    scoring the gathered picks (``idx``) or every entry ``seen`` marks (idx None)."""
    B, G, Q = seen_BGQN.shape[:3]
    if idx_BGQK is not None:
        b = torch.arange(B, device=keys_NC.device)[:, None, None]
        keys = keys_NC[b, idx_BGQK.flatten(1, 2).clamp(min=0)]  # [B, G*Q, K, C]
    else:
        keys = keys_NC[:, :seen_BGQN.shape[-1]]
    logits = Indexer.scores(qI_BGQIC.flatten(1, 2), wI_BGQI.flatten(1, 2), keys).view(seen_BGQN.shape)
    logp = logits.masked_fill(~seen_BGQN, float("-inf")).log_softmax(dim=-1).masked_fill(~seen_BGQN, 0.0)
    return (target_BGQN * (torch.log(target_BGQN.clamp(min=1e-30)) - logp)).sum(dim=-1)


def attend(q_BGQHC, win_BGLC, win_mask_BGQL, comp_BNC, comp_mask_BGQN, idx_BGQK, sink_H, scale, codec=None,
           with_lse: bool = False):
    """``attend_lse``'s output (and its log-denominator, with ``with_lse``, never differentiated);
    under autograd, through the recomputing backward."""
    args = (q_BGQHC, win_BGLC, win_mask_BGQL, comp_BNC, comp_mask_BGQN, idx_BGQK, sink_H, scale)
    if (recompute_attention and codec is None and torch.is_grad_enabled()
            and any(t is not None and t.requires_grad for t in (q_BGQHC, win_BGLC, comp_BNC, sink_H))):
        o, lse = _AttendRecompute.apply(*args)
    else:
        o, lse = attend_lse(*args, codec)
    return (o, lse.detach()) if with_lse else o


def _plus_delta(y: torch.Tensor, m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``y`` (= x @ m.weight^T, computed from the weight) plus the rows' LoRA updates where ``m``
    carries per-row adapters (``sparseek.model.multi_lora``)."""
    delta = getattr(m, "delta", None)
    d = None if delta is None else delta(x.to(m.weight.dtype))
    return y if d is None else y + d.float()


class Compressor(nn.Module):
    """Gated pooling of every ``ratio`` tokens into one KV entry (fp32, as DeepSeek runs it).

    With overlap (CSA, ratio 4) each token projects to 2c channels: the first half feeds the *next*
    window's entry, the second half its *own*; an entry is a per-channel softmax over 2m slots.
    """

    def __init__(self, args: ModelArgs, ratio: int, head_dim: int, fp8_dims: int = 0, fp4: bool = False):
        super().__init__()
        self.ratio, self.dim = ratio, head_dim
        self.fp8_dims = fp8_dims  # leading dims of each entry rounded to FP8 (kv_fp8; attention entries only)
        self.fp4 = fp4  # entries rotated and rounded to FP4 (index_fp4; the indexer's keys only)
        self.overlap = ratio == CSA_RATIO
        coff = 2 if self.overlap else 1
        self.wkv = nn.Linear(args.hidden_size, coff * head_dim, bias=False, dtype=torch.float32)
        self.wgate = nn.Linear(args.hidden_size, coff * head_dim, bias=False, dtype=torch.float32)
        self.ape = nn.Parameter(torch.zeros(ratio, coff * head_dim, dtype=torch.float32))
        self.norm = RMSNorm(head_dim, args.rms_norm_eps)

    def project(self, x_BTD: torch.Tensor, positions_BT: torch.Tensor):
        x = x_BTD.float()
        with fp32_region():
            kv, gate = (_plus_delta(F.linear(x, m.weight.float()), m, x) for m in (self.wkv, self.wgate))
            return kv, gate + self.ape[positions_BT % self.ratio].float()

    def _finish(self, pooled: torch.Tensor, first_pos: torch.Tensor, rotary: Rotary, dtype) -> torch.Tensor:
        entries = self.norm(pooled.to(dtype))
        cos, sin = rotary(first_pos)
        entries = apply_rope(entries, cos, sin)
        if self.fp4:
            return fp4_round(hadamard(entries))
        return fp8_round(entries, self.fp8_dims) if self.fp8_dims else entries

    def _pool(self, kv_BWLC, sc_BWLC) -> torch.Tensor:
        """Windows laid out as [prev window (overlap only); own window] along L -> pooled [B, W, c]."""
        m, c = self.ratio, self.dim
        if self.overlap:  # first half of the previous window's channels, second half of its own
            kv_BWLC = torch.cat([kv_BWLC[:, :, :m, :c], kv_BWLC[:, :, m:, c:]], dim=2)
            sc_BWLC = torch.cat([sc_BWLC[:, :, :m, :c], sc_BWLC[:, :, m:, c:]], dim=2)
        return (kv_BWLC * sc_BWLC.softmax(dim=2)).sum(dim=2)

    def _history(self, state: CompressorState | None, first: torch.Tensor, n: int, B: int, width: int, device):
        """Raw (kv, score) of positions first..first+n-1 ([B, n, width], or [B, T, n, width] for
        ``first`` [B, T]); positions < 0 weigh nothing."""
        pos = first[..., None] + torch.arange(n, device=device)  # [B, (T,) n]
        if state is None or n == 0:
            kv = torch.zeros(*pos.shape, width, device=device)
            sc = torch.full((*pos.shape, width), float("-inf"), device=device)
            return kv, sc
        slot = pos % state.kv.shape[1]
        rows = torch.arange(B, device=device).view(B, *[1] * (pos.dim() - 1))
        kv, sc = state.kv[rows, slot], state.score[rows, slot]
        before = (pos < 0)[..., None]
        return kv.masked_fill(before, 0.0), sc.masked_fill(before, float("-inf"))

    @staticmethod
    def _remember(state: CompressorState | None, kv, score, positions_BT) -> None:
        if state is None:
            return
        R = state.kv.shape[1]
        keep = min(R, kv.shape[1])
        rows = torch.arange(kv.shape[0], device=kv.device)[:, None]
        slot = positions_BT[:, -keep:] % R
        with torch.no_grad():
            state.kv[rows, slot] = kv[:, -keep:]
            state.score[rows, slot] = score[:, -keep:]

    def chunk(self, x_BTD, positions_BT, start: int, state: CompressorState | None, rotary: Rotary):
        """Entries completed by tokens [start, start+T) of every row -> [B, n, c]."""
        m = self.ratio
        kv, score = self.project(x_BTD, positions_BT)
        B, T, width = kv.shape
        p = start % m  # tokens of the unfinished window seen by earlier calls
        back = p + (m if self.overlap else 0)  # ... plus the previous window, for the overlap
        first = torch.full((B,), start - back, dtype=torch.long, device=kv.device)
        h_kv, h_sc = self._history(state, first, back, B, width, kv.device)
        self._remember(state, kv, score, positions_BT)
        n = (p + T) // m
        if n == 0:
            return x_BTD.new_zeros(B, 0, self.dim)
        v_kv, v_sc = torch.cat([h_kv, kv], dim=1), torch.cat([h_sc, score], dim=1)
        span = (2 if self.overlap else 1) * m
        # window w of this call spans v[w*m : w*m + span] (previous window first, with overlap)
        win_kv = v_kv.unfold(1, span, m)[:, :n].transpose(2, 3)  # [B, n, span, width]
        win_sc = v_sc.unfold(1, span, m)[:, :n].transpose(2, 3)
        first_pos = (start // m + torch.arange(n, device=kv.device)) * m
        return self._finish(self._pool(win_kv, win_sc), first_pos, rotary, x_BTD.dtype)

    def step(self, x_BTD, pos_BT: torch.Tensor, state: CompressorState, rotary: Rotary, static: bool = False):
        """A few tokens per row (rows at any positions, T <= PER_ROW_TOKENS) -> (the entry each
        token closes [B, T, c] (garbage where it closes none) or None, closes [B, T] bool).

        All T tokens are remembered first: the ring's spare slots keep a token's history intact
        while the later tokens of the same call are written. Eager decoding skips the pooling when
        no token closes a window (3 steps in 4 for CSA, 127 in 128 for HCA); the static path
        always pools, for fixed shapes."""
        m = self.ratio
        kv, score = self.project(x_BTD, pos_BT)
        self._remember(state, kv, score, pos_BT)
        span = (2 if self.overlap else 1) * m
        closes = (pos_BT + 1) % m == 0
        if not static and not bool(closes.any()):
            return None, closes
        h_kv, h_sc = self._history(state, pos_BT + 1 - span, span, kv.shape[0], kv.shape[-1], kv.device)
        pooled = self._pool(h_kv, h_sc)  # [B, T, c]
        entry = self._finish(torch.nan_to_num(pooled), (pos_BT // m) * m, rotary, x_BTD.dtype)
        return entry, closes


class Indexer(nn.Module):
    """Lightning indexer: picks, per query, the top-k compressed entries of a CSA layer.

    score(t, s) = sum_h w[t, h] * relu(q[t, h] . k[s]); queries reuse the attention's normalized
    low-rank query ``qr``. DeepSeek's runtime also rotates q and k by a Hadamard matrix and rounds
    them to FP4 (``args.index_fp4``, ``sparseek.model.qat``); the rotation alone is orthonormal and
    leaves the dot products unchanged, so without the rounding both are skipped.
    """

    def __init__(self, args: ModelArgs, dtype=None):
        super().__init__()
        self.n_heads, self.dim, self.topk = args.index_n_heads, args.index_head_dim, args.index_topk
        self.wq_b = Linear(args.q_lora_rank, self.n_heads * self.dim, bias=False, dtype=dtype)
        self.weights_proj = Linear(args.hidden_size, self.n_heads, bias=False, dtype=dtype)
        self.fp4 = args.index_fp4
        self.act_fp8 = args.act_scale_fmt
        self.compressor = Compressor(args, CSA_RATIO, self.dim, fp4=self.fp4)
        self.scale = self.dim ** -0.5 * self.n_heads ** -0.5

    def queries(self, x_BTD, qr_BTR, cos, sin):
        B, T, _ = x_BTD.shape
        q = self.wq_b(act_round(qr_BTR, self.act_fp8)).view(B, T, self.n_heads, self.dim)
        q = apply_rope(q, cos[:, :, None], sin[:, :, None])
        if self.fp4:
            q = fp4_round(hadamard(q))
        w = self.weights_proj(x_BTD).float() * self.scale
        return q, w

    @staticmethod
    def scores(q_BQIC, w_BQI, keys_BNC) -> torch.Tensor:
        """score(t, s) = sum_h w[t, h] * relu(q[t, h] . k[s]), fp32 [B, Q, N]; keys may also be
        per query ([B, Q, N, C]: CSA's picks)."""
        spec = "bqic,bnc->bqin" if keys_BNC.dim() == 3 else "bqic,bqnc->bqin"
        s = torch.einsum(spec, q_BQIC.float(), keys_BNC.float()).relu()
        return torch.einsum("bqin,bqi->bqn", s, w_BQI.float())

    def select(self, q_BQIC, w_BQI, keys_BNC, n_visible_BQ) -> torch.Tensor:
        N = keys_BNC.shape[1]
        k = min(self.topk, N)
        if k == 0:
            return q_BQIC.new_full((*q_BQIC.shape[:2], 0), -1, dtype=torch.long)
        # The picks are indices: no gradient flows through them, so the scores are computed without
        # autograd (training would otherwise keep [.., heads, N] products per query for nothing).
        with torch.no_grad():
            if kernels.usable(q_BQIC):  # fused: never builds the per-head [.., H, N] products
                s = kernels.indexer_scores(q_BQIC, w_BQI, keys_BNC, n_visible_BQ)
            else:
                s = self.scores(q_BQIC, w_BQI, keys_BNC)
                ar = torch.arange(N, device=s.device)
                s = s.masked_fill(ar >= n_visible_BQ[..., None], float("-inf"))
            # ReLU makes exact ties (all heads <= 0 give score 0) common early in a sequence. A stable
            # sort breaks them toward the older entry, so the choice does not depend on how many
            # future entries exist: the cached and the one-shot forward pick the same set.
            idx = s.sort(dim=-1, descending=True, stable=True).indices[..., :k]
            return torch.where(idx < n_visible_BQ[..., None], idx, -1)


def grouped_projection(x_BTGI: torch.Tensor, w_GRI: torch.Tensor) -> torch.Tensor:
    """Each group's slice of x through its own matrix: einsum("btgi,gri->btgr"). On CPUs with AMX
    (bf16 inference) as one grouped product of the kernel, the groups' rows laid one after another
    (a copy of x): 2-3x the library's batched GEMM at a short prompt's rows."""
    B, T, G, I = x_BTGI.shape
    if cpu_kernels.rows_fit(B * T) and cpu_kernels.grouped_mm_fits(x_BTGI.reshape(-1, I), w_GRI):
        x_NI = x_BTGI.movedim(2, 0).reshape(G * B * T, I)
        offs = torch.arange(1, G + 1, device=x_NI.device) * (B * T)
        return cpu_kernels.grouped_mm(x_NI, w_GRI, offs).view(G, B, T, -1).movedim(0, 2)
    return torch.einsum("btgi,gri->btgr", x_BTGI, w_GRI)


class Attention(nn.Module):
    def __init__(self, layer_id: int, args: ModelArgs, dtype=None):
        super().__init__()
        self.n_heads, self.head_dim = args.num_attention_heads, args.head_dim
        self.rope_dim = args.qk_rope_head_dim
        self.window = args.sliding_window
        self.n_groups, self.o_rank = args.o_groups, args.o_lora_rank
        self.eps = args.rms_norm_eps
        self.ratio = args.compress_ratio(layer_id)
        self.rope_kind = "compress" if self.ratio else "main"
        self.wq_a = Linear(args.hidden_size, args.q_lora_rank, bias=False, dtype=dtype)
        self.q_norm = RMSNorm(args.q_lora_rank, self.eps)
        self.wq_b = Linear(args.q_lora_rank, self.n_heads * self.head_dim, bias=False, dtype=dtype)
        self.wkv = Linear(args.hidden_size, self.head_dim, bias=False, dtype=dtype)
        self.kv_norm = RMSNorm(self.head_dim, self.eps)
        # grouped low-rank output: each group of heads -> o_lora_rank, then all groups -> hidden
        self.wo_a = Linear(self.n_heads * self.head_dim // self.n_groups, self.n_groups * self.o_rank,
                              bias=False, dtype=dtype)
        self.wo_b = Linear(self.n_groups * self.o_rank, args.hidden_size, bias=False, dtype=dtype)
        self.attn_sink = nn.Parameter(torch.zeros(self.n_heads, dtype=torch.float32))
        self.scale = self.head_dim ** -0.5
        # kv_fp8: the non-rope dims of every cached entry are rounded to FP8, as DeepSeek's runtime
        # does, so a cache may store them in FP8 losslessly
        self.fp8_dims = self.head_dim - self.rope_dim if args.kv_fp8 else 0
        # act_fp8: the inputs of the FP8 projections rounded as DeepSeek's runtime feeds its GEMMs
        # (wo_a excepted: its conversion dequantizes it to bf16); the compressor's are bf16 weights
        self.act_fp8 = args.act_scale_fmt
        self.compressor = Compressor(args, self.ratio, self.head_dim, self.fp8_dims) if self.ratio else None
        self.indexer = Indexer(args, dtype) if self.ratio == CSA_RATIO else None
        # training: the indexer learns from a KL loss to the main attention (``_indexer_kl``) when
        # the trainer switches this on; the loss of the last forward waits in ``indexer_loss``
        self.learn_indexer = False
        self.indexer_loss: torch.Tensor | None = None
        # training: CSA attends to every visible entry instead of the indexer's picks (DeepSeek's
        # dense warm-up of a fresh indexer, whose loss then covers every entry)
        self.attend_all = False

    def forward(self, x_BTD: torch.Tensor, step: Step, lc: LayerCache | None) -> torch.Tensor:
        cos, sin = step.rope[self.rope_kind]
        qr, q, kv = self.project(x_BTD, cos, sin)
        if step.per_row:
            o = self._per_row(x_BTD, qr, q, kv, step, lc)
        else:
            o = self._chunk(x_BTD, qr, q, kv, step, lc)
        return self.output(o, cos, sin)

    def project(self, x_BTD, cos, sin):
        """-> the low-rank query ``qr`` (the indexer reuses it), the queries [B, T, H, C] and the
        shared key/value entry [B, T, C], normalized and rotated."""
        B, T, _ = x_BTD.shape
        xr = act_round(x_BTD, self.act_fp8)
        qr = self.q_norm(self.wq_a(xr))
        q = self.wq_b(act_round(qr, self.act_fp8)).view(B, T, self.n_heads, self.head_dim)
        q = apply_rope(rms_unweighted(q, self.eps), cos[:, :, None], sin[:, :, None])
        kv = apply_rope(self.kv_norm(self.wkv(xr)), cos, sin)
        if self.fp8_dims:
            kv = fp8_round(kv, self.fp8_dims)
        return qr, q, kv

    def output(self, o_BTHC, cos, sin):
        """Attention output (rotated back) -> hidden, through the grouped low-rank projection."""
        B, T = o_BTHC.shape[:2]
        o = apply_rope(o_BTHC, cos[:, :, None], sin[:, :, None], inverse=True)
        o = o.reshape(B, T, self.n_groups, -1)
        wo_a = linear_weight(self.wo_a, o.dtype).view(self.n_groups, self.o_rank, -1)
        out = grouped_projection(o, wo_a)
        if hasattr(self.wo_a, "grouped_delta"):  # per-row LoRA adapters (sparseek.model.multi_lora)
            delta = self.wo_a.grouped_delta(o, self.n_groups)
            out = out if delta is None else out + delta
        return self.wo_b(act_round(out.flatten(2), self.act_fp8))

    # -- many tokens, all rows at the same start ------------------------------------------
    def _chunk(self, x, qr, q, kv, step: Step, lc: LayerCache | None):
        B, T, H, C = q.shape
        s, win = step.start, self.window
        if lc is not None:
            # unroll the ring so entry j holds position s - win + j (the ring keeps a few slots more
            # than the window, so rolled-back speculative tokens never overwrite a live entry)
            R = lc.window.shape[1]
            order = (s - win + torch.arange(win, device=x.device)) % R
            keys = torch.cat([lc.decode(lc.window[:, order]), kv], dim=1)
            n_prefix = win
            with torch.no_grad():
                tail = kv[:, -R:]
                lc.window[:, (s + T - tail.shape[1] + torch.arange(tail.shape[1], device=x.device)) % R] = lc.encode(tail)
        else:
            keys, n_prefix = kv, 0

        comp = idx_keys = q_idx = w_idx = None
        codec = lc.codec if lc is not None else None
        select = learn = False
        if self.compressor is not None:
            m = self.ratio
            rot = step.rotary["compress"]
            new = self.compressor.chunk(x, step.positions, s, lc.comp_state if lc else None, rot)
            comp = self._store(lc.comp, lc.encode(new), s // m, (s + T) // m) if lc else new
            select = self._selects(comp.shape[1])
            learn = self.indexer is not None and self.learn_indexer and lc is None and torch.is_grad_enabled()
            # the indexer only picks indices (no gradient reaches it through them): no autograd
            # graph, unless it learns from its own loss (on inputs detached from the model's)
            with contextlib.nullcontext() if learn else torch.no_grad():
                xi, qri = (x.detach(), qr.detach()) if learn else (x, qr)
                if select or learn or self._keeps_index_keys(lc):
                    new_k = self.indexer.compressor.chunk(xi, step.positions, s, lc.index_state if lc else None, rot)
                    if lc is None:
                        idx_keys = new_k
                    else:  # stored (FP4 bytes with index_fp4), read back whole
                        stored = self._store(lc.index_keys, lc.encode_keys(new_k), s // m, (s + T) // m)
                        idx_keys = lc.decode_keys(stored, new_k.dtype)
                if select or learn:
                    q_idx, w_idx = self.indexer.queries(xi, qri, *step.rope["compress"])

        K = min(self.indexer.topk, comp.shape[1]) if select else 0
        n_comp = comp.shape[1] if comp is not None else 0
        # per query: scores over window band + compressed keys (HCA) or top-k (CSA), the gathered
        # top-k rows, and the indexer's per-head scores over all compressed keys (CSA)
        # CSA's picks can be attended gathered ([K, C] copied per query, scatter-added back in
        # backward) or as a mask over every visible entry ([H, N] scores per query): the same
        # softmax either way, so take the one that materializes less
        masked = select and self._picks_as_mask(H, n_comp, K, C)
        idx_cost = (1 if kernels.usable(q) else self.indexer.n_heads) * n_comp if select else 0

        def per_query(qb: int) -> int:  # elements a query materializes in a block of qb queries
            return B * (H * (qb + win - 1 + (K if select and not masked else n_comp))
                        + (0 if masked else K) * C + idx_cost)

        # Several blocks go in one call (a batch dim of the products): fewer calls for short
        # prompts; an eighth of the budget per call, as calls beyond a few million scores gain no
        # speed and cost memory.
        budget = attn_block_budget(x.device)
        Qb = min(T, query_block(x.device))
        Qb = max(1, min(Qb, budget // per_query(Qb)))
        nb = -(-T // Qb)
        G = max(1, min(nb, budget // 8 // (per_query(Qb) * Qb)))
        windows, mask = self._bands(keys, step, n_prefix, Qb, nb)
        q_BNQHC = (F.pad(q, (0, 0, 0, 0, 0, nb * Qb - T)) if nb * Qb > T else q).view(B, nb, Qb, H, C)
        out, kl = [], []
        if learn:
            qI = F.pad(q_idx, (0, 0, 0, 0, 0, nb * Qb - T)).view(B, nb, Qb, *q_idx.shape[2:])
            wI = F.pad(w_idx, (0, 0, 0, nb * Qb - T)).view(B, nb, Qb, -1)
        for g0 in range(0, nb, G):
            g1 = min(nb, g0 + G)
            i0, i1 = g0 * Qb, min(T, g1 * Qb)
            comp_mask = idx = comp_blk = picks = None
            if comp is not None:
                # padded queries past T stand in for the last one (their rows are dropped)
                qi = torch.arange(i0, g1 * Qb, device=x.device).clamp(max=T - 1)
                n_vis = (s + qi + 1) // self.ratio  # [G * Qb]
                if select:
                    idx = self.indexer.select(q_idx[:, i0:i1], w_idx[:, i0:i1], idx_keys,
                                              n_vis[:i1 - i0].expand(B, -1))
                    idx = F.pad(idx, (0, 0, 0, (g1 - g0) * Qb - (i1 - i0)), value=-1)
                if select and not masked:
                    comp_blk = comp
                else:
                    n_max = (s + i1) // self.ratio  # = n_vis.max(), known without a device sync
                    comp_blk = comp[:, :n_max] if codec is None else codec.decode(comp[:, :n_max])
                    if select:  # the picked entries (all visible) as a mask
                        comp_mask, idx, picks = _picked(idx, n_max), None, idx.unflatten(1, (g1 - g0, Qb))
                    else:
                        comp_mask = (torch.arange(n_max, device=x.device) < n_vis[:, None])[None]
                    comp_mask = comp_mask.unflatten(1, (g1 - g0, Qb))
                if idx is not None:
                    idx = idx.unflatten(1, (g1 - g0, Qb))
            o = attend(q_BNQHC[:, g0:g1], windows[:, g0:g1], mask[None, g0:g1], comp_blk, comp_mask, idx,
                       self.attn_sink, self.scale, codec, with_lse=learn)
            if learn:
                o, lse = o
                if comp_blk.shape[1] > 0:
                    kl.append(self._indexer_kl(q_BNQHC[:, g0:g1], lse, comp_blk, comp_mask, idx,
                                               qI[:, g0:g1], wI[:, g0:g1], idx_keys, i1 - i0, picks))
            out.append(o)
        if learn:
            zero = q.new_zeros((), dtype=torch.float32)
            total, count = (sum(k for k, _ in kl), sum(n for _, n in kl)) if kl else (zero, zero)
            self.indexer_loss = total / count.clamp(min=1)
        o = torch.cat(out, dim=1) if len(out) > 1 else out[0]
        return o.flatten(1, 2)[:, :T]

    def attention_mass(self, q, lse_BGQH, comp, comp_mask, idx, n_real: int):
        """The main attention's probability mass on each compressed entry of this call, summed over
        heads and renormalized over the entries ([B, G, Q, entries]: gathered picks, or every
        visible entry of the mask), and the query rows it is defined for (real queries that put
        mass on some entry). ``lse_BGQH`` is the call's log-denominator; nothing here is
        differentiable."""
        G, Q = q.shape[1:3]
        with torch.no_grad():
            s_comp, _ = _comp_scores(q.detach(), comp.detach(), comp_mask, idx, self.scale)
            mass = torch.exp(s_comp - lse_BGQH[..., None]).sum(dim=3)
            total = mass.sum(-1, keepdim=True)
            real = torch.arange(G * Q, device=q.device).view(G, Q) < n_real  # padded queries excluded
            return mass / total.clamp(min=1e-30), (total.squeeze(-1) > 0) & real

    def _indexer_kl(self, q, lse_BGQH, comp, comp_mask, idx, qI_BGQIC, wI_BGQI, keys_I, n_real: int,
                    picks=None):
        """Sum over this call's queries of KL(target || softmax(indexer logits)) and the number of
        queries counted. The target is the main attention's mass on each compressed entry it
        attended (``attention_mass``), as DeepSeek trains its lightning indexer: over every visible
        entry while the indexer need not pick, over the picks once it does. Only the indexer's
        parameters get this gradient. The logits are recomputed in backward (activation
        checkpointing), so a call keeps its inputs, not its [queries, indexer heads, entries]
        products: the memory of the loss stays that of the target. ``picks``: the indices behind a
        mask of picks; the indexer then scores only them (top-k entries, not all visible ones)."""
        target, rows = self.attention_mass(q, lse_BGQH, comp, comp_mask, idx, n_real)
        if picks is not None:
            target, idx = target.gather(-1, picks.clamp(min=0)).masked_fill(picks < 0, 0.0), picks
        seen = (idx >= 0) if idx is not None else comp_mask.expand(q.shape[0], -1, -1, -1)
        kl = torch.utils.checkpoint.checkpoint(_indexer_kl_rows, qI_BGQIC, wI_BGQI, keys_I, idx, seen, target,
                                               use_reentrant=False)
        return kl[rows].sum(), rows.sum()

    def _bands(self, keys_BKC, step: Step, n_prefix: int, Qb: int, nb: int):
        """The window band of each block of Qb queries: keys [B, nb, Qb + win - 1, C] (a strided
        view of the keys, zero-padded at both ends) and mask [nb, Qb, Qb + win - 1].

        ``keys_BKC`` holds ``n_prefix`` cached keys (positions s - n_prefix ..) then the chunk's.
        The mask depends only on the geometry, so the layers of one forward share it.

        Where every query still sees position 0 (s + T <= win: a short prompt, its first chunks)
        there is no band to slide: all blocks share the s + T keys there are, masked causally
        ([B, nb, s + T, C] as a view), instead of bands mostly of padding (a fresh 128-token
        prompt: 128 keys a query instead of 191)."""
        s, T = step.start, keys_BKC.shape[1] - n_prefix
        if s + T <= self.window and n_prefix >= s:
            return self._causal_keys(keys_BKC, step, n_prefix, Qb, nb)
        return self._sliding_bands(keys_BKC, step, n_prefix, Qb, nb)

    @staticmethod
    def _causal_keys(keys_BKC, step: Step, n_prefix: int, Qb: int, nb: int):
        """Every block's keys: positions 0 .. s + T - 1, masked causally."""
        B, n_keys, C = keys_BKC.shape
        s, T = step.start, n_keys - n_prefix
        memo_key = ("causal", Qb, nb, s + T)
        mask = step.memo.get(memo_key)
        if mask is None:
            query_pos = s + torch.arange(nb * Qb, device=keys_BKC.device).view(nb, Qb, 1)
            mask = step.memo[memo_key] = torch.arange(s + T, device=keys_BKC.device) <= query_pos
        return keys_BKC[:, n_prefix - s:, None].transpose(1, 2).expand(B, nb, s + T, C), mask

    def _sliding_bands(self, keys_BKC, step: Step, n_prefix: int, Qb: int, nb: int):
        B, n_keys, C = keys_BKC.shape
        win, s, T = self.window, step.start, n_keys - n_prefix
        Lb = Qb + win - 1
        front = max(0, win - 1 - n_prefix)
        keys = F.pad(keys_BKC, (0, 0, front, nb * Qb - T)) if front or nb * Qb > T else keys_BKC
        off = n_prefix + front - (win - 1)  # padded index of block 0's first key
        windows = keys[:, off:off + (nb - 1) * Qb + Lb].unfold(1, Lb, Qb).transpose(2, 3)
        memo_key = ("band", Qb, nb, n_prefix)
        mask = step.memo.get(memo_key)
        if mask is None:
            j = torch.arange(Qb, device=keys.device)[:, None]
            lk = torch.arange(Lb, device=keys.device)
            band = (lk >= j) & (lk <= j + win - 1)  # key l of a block is query j's if j <= l < j + win
            first = n_prefix - (win - 1) + Qb * torch.arange(nb, device=keys.device)[:, None]
            valid = first + lk >= max(0, n_prefix - s)  # not padding, not before position 0
            mask = step.memo[memo_key] = band & valid[:, None, :]
        return windows, mask

    @staticmethod
    def _picks_as_mask(heads: int, n_entries: int, k: int, dim: int) -> bool:
        return heads * n_entries <= k * dim

    def _selects(self, n_entries: int) -> bool:
        """Whether the indexer must pick: while a query can see at most top-k compressed entries it
        picks all of them, so CSA is exactly attention over every visible entry (as HCA does) and
        the O(T * n) scoring is skipped -- every prompt shorter than 4 * index_topk tokens."""
        return self.indexer is not None and n_entries > self.indexer.topk and not self.attend_all

    def _keeps_index_keys(self, lc: LayerCache | None) -> bool:
        """A cache whose capacity holds more than top-k entries will need the indexer keys of
        every position later on; one that holds fewer never reads them."""
        return lc is not None and self.indexer is not None and lc.index_keys.shape[1] > self.indexer.topk

    @staticmethod
    def _store(buf: torch.Tensor | None, new: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
        if buf is None:
            return new
        with torch.no_grad():
            buf[:, lo:hi] = new
        return buf[:, :hi]

    # -- a few tokens per row, rows at arbitrary positions ---------------------------------
    def _per_row(self, x, qr, q, kv, step: Step, lc: LayerCache):
        """Decode steps and speculative drafts: T <= PER_ROW_TOKENS tokens per row, every row at
        its own position. Each query is a block of one (its own window and compressed entries)."""
        B, T = q.shape[:2]
        pos_BT, win = step.positions, self.window
        rows = torch.arange(B, device=x.device)[:, None]
        R = lc.window.shape[1]
        # the ring keeps SPARE slots past the window: writing T <= SPARE + 1 tokens at once leaves
        # the first query's window intact
        lc.window[rows, pos_BT % R] = lc.encode(kv)
        # slot j holds the latest position <= the query's congruent to j (mod R); a slot a later
        # token of this call overwrote reads as a position a whole ring back, outside the window
        p = pos_BT[..., None]
        held = p - (p - torch.arange(R, device=x.device)) % R
        win_mask = (held >= 0) & (held > p - win)  # [B, T, R]
        comp = comp_mask = idx = None
        if self.compressor is not None:
            m, rot = self.ratio, step.rotary["compress"]
            n_vis = (pos_BT + 1) // m
            # eager: attend over the filled prefix only; static: over the buffer up to the step's
            # span (by default all of it), masked
            if not step.static:
                n = int(n_vis.max())
            elif step.span is None:
                n = lc.comp.shape[1]
            else:
                n = step.span // m
            entry, closes = self.compressor.step(x, pos_BT, lc.comp_state, rot, step.static)
            self._write_entry(lc.comp, None if entry is None else lc.encode(entry), pos_BT // m, closes, step.static)
            comp = lc.comp[:, :n]
            if self._keeps_index_keys(lc):
                k_entry, _ = self.indexer.compressor.step(x, pos_BT, lc.index_state, rot, step.static)
                self._write_entry(lc.index_keys, lc.encode_keys(k_entry), pos_BT // m, closes, step.static)
            if self._selects(n):
                q_idx, w_idx = self.indexer.queries(x, qr, *step.rope["compress"])
                idx = self.indexer.select(q_idx, w_idx, lc.decode_keys(lc.index_keys[:, :n], x.dtype), n_vis)[:, None]
            else:
                comp_mask = (torch.arange(n, device=x.device) < n_vis[..., None])[:, None]
                comp = lc.decode(comp)
        return attend(q[:, None], lc.decode(lc.window)[:, None], win_mask[:, None], comp, comp_mask,
                      idx, self.attn_sink, self.scale, lc.codec)[:, 0]

    @staticmethod
    def _write_entry(buf, entry_BTC, index_BT, closes_BT, static: bool) -> None:
        """Store the entries of the tokens that just closed a window."""
        if entry_BTC is None or buf.shape[1] == 0:  # nothing closed, or the cache is shorter than a window
            return
        rows = torch.arange(buf.shape[0], device=buf.device)[:, None].expand_as(index_BT)
        if static:  # same shapes whatever closes: write every row, keeping the old value where none closed
            index_BT = index_BT.clamp(max=buf.shape[1] - 1)
            buf[rows, index_BT] = torch.where(closes_BT[..., None], entry_BTC, buf[rows, index_BT])
        else:
            buf[rows[closes_BT], index_BT[closes_BT]] = entry_BTC[closes_BT]


# ---------------------------------------------------------------------------- mHC
def sinkhorn(logits: torch.Tensor, iters: int, eps: float) -> torch.Tensor:
    """Doubly-stochastic projection: row softmax, then alternate column / row normalization."""
    if cpu_kernels.sinkhorn_fits(logits):  # one pass per token instead of ~40 reductions (csrc/cpu_mhc.cpp)
        return cpu_kernels.sinkhorn(logits, iters, eps)
    comb = logits.softmax(dim=-1) + eps
    comb = comb / (comb.sum(dim=-2, keepdim=True) + eps)
    for _ in range(iters - 1):
        comb = comb / (comb.sum(dim=-1, keepdim=True) + eps)
        comb = comb / (comb.sum(dim=-2, keepdim=True) + eps)
    return comb


def hc_mix(x_BTSD: torch.Tensor, fn: torch.Tensor, norm_eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixing logits of the S streams (an unweighted RMSNorm over all S*D values, then fn)."""
    xf = x_BTSD.flatten(2).float()
    rs = torch.rsqrt(xf.square().mean(-1, keepdim=True) + norm_eps)
    with fp32_region():
        # .float(): stays right after a blanket model.to(bfloat16), which also casts this fp32 island
        return F.linear(xf, fn.float()) * rs, xf.view(x_BTSD.shape)


def hc_pre(x_BTSD, fn, scale, base, iters: int, norm_eps: float, hc_eps: float):
    """One mHC site's input side: the block input h (streams merged by ``pre``), and the ``post``
    weights and doubly-stochastic ``comb`` that ``hc_post`` applies to the block output."""
    S = x_BTSD.shape[2]
    mix, xf = hc_mix(x_BTSD, fn, norm_eps)
    pre = torch.sigmoid(mix[..., :S] * scale[0] + base[:S]) + hc_eps
    post = 2 * torch.sigmoid(mix[..., S:2 * S] * scale[1] + base[S:2 * S])
    comb = (mix[..., 2 * S:] * scale[2] + base[2 * S:]).unflatten(-1, (S, S))
    comb = sinkhorn(comb, iters, hc_eps)
    h = (pre.unsqueeze(-1) * xf).sum(dim=2).to(x_BTSD.dtype)
    return h, post, comb


def hc_post(f_BTD, res_BTSD, post_BTS, comb_BTSS):
    """X' = post * f + comb^T X: stream j feeds output stream k through comb[j, k] (in fp32, also
    under a training loop's autocast)."""
    if common.recomputing(res_BTSD, f_BTD):
        # bf16 streams: autograd would keep fp32 copies of the streams and of f (80 KiB a token at
        # V4-Flash sizes); the mixing is cheap to redo in backward
        return torch.utils.checkpoint.checkpoint(_hc_post, f_BTD, res_BTSD, post_BTS, comb_BTSS, use_reentrant=False)
    return _hc_post(f_BTD, res_BTSD, post_BTS, comb_BTSS)


def _hc_post(f_BTD, res_BTSD, post_BTS, comb_BTSS):
    with fp32_region():
        mixed = torch.matmul(comb_BTSS.transpose(-1, -2), res_BTSD.float())
        return torch.addcmul(mixed, post_BTS.unsqueeze(-1), f_BTD.float().unsqueeze(-2)).to(res_BTSD.dtype)


class Block(nn.Module):
    def __init__(self, layer_id: int, args: ModelArgs, dtype=None):
        super().__init__()
        self.layer_id = layer_id
        d, hc = args.hidden_size, args.hc_mult
        self.hc_iters, self.hc_eps, self.norm_eps = args.hc_sinkhorn_iters, args.hc_eps, args.rms_norm_eps
        self.attn = Attention(layer_id, args, dtype)
        self.ffn = MoE(args, hash_routed=layer_id < args.num_hash_layers, dtype=dtype)
        self.attn_norm = RMSNorm(d, args.rms_norm_eps)
        self.ffn_norm = RMSNorm(d, args.rms_norm_eps)
        mix = (2 + hc) * hc
        for site in ("attn", "ffn"):
            setattr(self, f"hc_{site}_fn", nn.Parameter(torch.zeros(mix, hc * d, dtype=torch.float32)))
            setattr(self, f"hc_{site}_base", nn.Parameter(torch.zeros(mix, dtype=torch.float32)))
            setattr(self, f"hc_{site}_scale", nn.Parameter(torch.ones(3, dtype=torch.float32)))

    def hc_pre(self, x_BTSD, fn, scale, base):
        args = (x_BTSD, fn, scale, base, self.hc_iters, self.norm_eps, self.hc_eps)
        if common.recomputing(x_BTSD, fn):
            # bf16 streams: autograd would keep their fp32 copy (64 KiB a token at V4-Flash sizes) for
            # the mixing product and the weighted sum; recomputing the site in backward is cheap
            return torch.utils.checkpoint.checkpoint(hc_pre, *args, use_reentrant=False)
        return hc_pre(*args)

    def forward(self, x_BTSD, step: Step, lc: LayerCache | None, input_ids_BT):
        attn_input, ffn_input, output = self.attn_input, self.ffn_input, hc_post
        if cpu_kernels.mhc_fits(x_BTSD, self.hc_attn_fn):  # CPU inference, eager: the ops of csrc/cpu_mhc.cpp
            attn_input, ffn_input, output = self.attn_input_op, self.ffn_input_op, self.output_op
        h, post, comb = attn_input(x_BTSD)
        x_BTSD, h, post, comb = ffn_input(self.attn(h, step, lc), x_BTSD, post, comb)
        return output(self.ffn(h, input_ids_BT, static=step.static), x_BTSD, post, comb)

    # The stream passes between the sublayers, as two functions so that `compile_hot_paths` fuses
    # each into one compiled call (a 128-token prefill pays ~50 us of dispatch per call)
    def attn_input(self, x_BTSD):
        """mHC's input side of the attention: its normalized input h, and post / comb for hc_post."""
        h, post, comb = self.hc_pre(x_BTSD, self.hc_attn_fn, self.hc_attn_scale, self.hc_attn_base)
        return self.attn_norm(h), post, comb

    def ffn_input(self, attn_BTD, x_BTSD, post, comb):
        """The attention's output folded into the streams, then mHC's input side of the FFN."""
        x_BTSD = hc_post(attn_BTD, x_BTSD, post, comb)
        h, post, comb = self.hc_pre(x_BTSD, self.hc_ffn_fn, self.hc_ffn_scale, self.hc_ffn_base)
        return x_BTSD, self.ffn_norm(h), post, comb

    # The same two passes as CPU ops, each a pass over a token's streams in L1/L2 instead of a
    # bf16 -> fp32 copy of all [T, S, D], a library GEMM with N = 24 and ~3 more kernels: at 256
    # tokens of `small` mHC took 6.5 instead of 15.6 ms of a prefill (`profile_decode.py
    # --breakdown`). Same results to bf16 rounding.
    def attn_input_op(self, x_BTSD):
        return cpu_kernels.hc_pre(x_BTSD, self.hc_attn_fn, self.hc_attn_scale, self.hc_attn_base,
                                  self.attn_norm.weight, self.hc_iters, self.norm_eps, self.hc_eps, self.attn_norm.eps)

    def ffn_input_op(self, attn_BTD, x_BTSD, post, comb):
        x_BTSD = cpu_kernels.hc_post(attn_BTD, x_BTSD, post, comb)
        h, post, comb = cpu_kernels.hc_pre(x_BTSD, self.hc_ffn_fn, self.hc_ffn_scale, self.hc_ffn_base,
                                           self.ffn_norm.weight, self.hc_iters, self.norm_eps, self.hc_eps,
                                           self.ffn_norm.eps)
        return x_BTSD, h, post, comb

    def output_op(self, ffn_BTD, x_BTSD, post, comb):
        return cpu_kernels.hc_post(ffn_BTD, x_BTSD, post, comb)


def hc_head(x_BTSD, fn, scale, base, norm_eps, hc_eps):
    """Final merge of the S streams: sigmoid weights, no Sinkhorn."""
    mix, xf = hc_mix(x_BTSD, fn, norm_eps)
    pre = torch.sigmoid(mix * scale + base) + hc_eps
    return (pre.unsqueeze(-1) * xf).sum(dim=2).to(x_BTSD.dtype)


class MTPBlock(Block):
    """Multi-token prediction: from the main model's final streams at t and the embedding of token
    t+1, predict token t+2. Embedding and head are the main model's."""

    def __init__(self, layer_id: int, args: ModelArgs, dtype=None):
        super().__init__(layer_id, args, dtype)
        d, hc = args.hidden_size, args.hc_mult
        self.e_proj = Linear(d, d, bias=False, dtype=dtype)
        self.h_proj = Linear(d, d, bias=False, dtype=dtype)
        self.enorm = RMSNorm(d, args.rms_norm_eps)
        self.hnorm = RMSNorm(d, args.rms_norm_eps)
        self.norm = RMSNorm(d, args.rms_norm_eps)
        self.hc_head_fn = nn.Parameter(torch.zeros(hc, hc * d, dtype=torch.float32))
        self.hc_head_base = nn.Parameter(torch.zeros(hc, dtype=torch.float32))
        self.hc_head_scale = nn.Parameter(torch.ones(1, dtype=torch.float32))
        self.eps = (args.rms_norm_eps, args.hc_eps)
        self.act_fp8 = args.act_scale_fmt

    def forward(self, hidden_BTSD, emb_BTD, step: Step, lc: LayerCache | None, next_ids_BT):
        """(output streams, normalized merged state for the shared head)."""
        e, h = (act_round(t, self.act_fp8) for t in (self.enorm(emb_BTD), self.hnorm(hidden_BTSD)))
        x = self.e_proj(e).unsqueeze(2) + self.h_proj(h)
        x = super().forward(x, step, lc, next_ids_BT)
        return x, self.norm(hc_head(x, self.hc_head_fn, self.hc_head_scale, self.hc_head_base, *self.eps))


class DeepSeekV4(DecoderLM):
    def __init__(self, args: ModelArgs, dtype: torch.dtype | None = None):
        super().__init__()
        self.args = args
        d, hc, V = args.hidden_size, args.hc_mult, args.vocab_size
        self.embed = nn.Embedding(V, d, dtype=dtype)
        self.layers = nn.ModuleList(Block(i, args, dtype) for i in range(args.num_hidden_layers))
        self.norm = RMSNorm(d, args.rms_norm_eps)
        self.head = Linear(d, V, bias=False, dtype=dtype)
        self.hc_head_fn = nn.Parameter(torch.zeros(hc, hc * d, dtype=torch.float32))
        self.hc_head_base = nn.Parameter(torch.zeros(hc, dtype=torch.float32))
        self.hc_head_scale = nn.Parameter(torch.ones(1, dtype=torch.float32))
        self.mtp = nn.ModuleList(MTPBlock(args.num_hidden_layers + i, args, dtype) for i in range(args.n_mtp))
        rd = args.qk_rope_head_dim
        # ratio-0 layers: plain RoPE at rope_theta; compressed layers: compress_rope_theta with YaRN
        self.rotary = nn.ModuleDict({
            "main": Rotary(rd, args.rope_theta, None),
            "compress": Rotary(rd, args.compress_rope_theta, args.yarn()),
        })

    # ------------------------------------------------------------------ public
    def forward(self, input_ids: torch.Tensor, cache: Cache | None = None, *, last_n: int | None = None,
                at: torch.Tensor | None = None, return_hidden: bool = False, targets: torch.Tensor | None = None):
        """input_ids [B, T] -> logits [B, T, V] (fp32); with a cache, continue each row's sequence.
        ``last_n``: logits of the last n positions only; ``at`` ([B] indices): of one position per
        row ([B, 1, V]). The streams (``return_hidden``) come back for every position.
        ``targets`` (the token each position should predict, -100 = not counted): the mean
        cross-entropy instead of the logits, which are never materialized (``model/loss.py``)."""
        B, T, rows_apart = self._begin(input_ids, cache)
        if rows_apart and T > PER_ROW_TOKENS:
            if targets is not None:
                raise ValueError("targets are scored in one forward from one start position")
            return self._rowwise(input_ids, cache, last_n, at, return_hidden)
        step = self._step(B, T, cache.pos if cache is not None else None, input_ids.device, cache is not None)
        x = self.embed(input_ids).unsqueeze(2).expand(-1, -1, self.args.hc_mult, -1).contiguous()
        for i, layer in enumerate(self.layers):
            x = layer(x, step, cache.layers[i] if cache is not None else None, input_ids)
        if cache is not None:
            cache.pos += T
        h = self._head_input(logit_positions(x, last_n, at), self.hc_head_fn, self.hc_head_scale,
                             self.hc_head_base, self.norm)
        out = self._head_out(h, targets)
        return (out, x) if return_hidden else out

    def decode_step(self, input_ids_B1: torch.Tensor, cache: Cache, span_L: torch.Tensor | None = None
                    ) -> torch.Tensor:
        """One token per row against ``cache`` -> next-token logits [B, V].

        Same result as ``forward(ids, cache)`` with fixed shapes and no host synchronization, so it
        can be compiled (and captured in a CUDA graph): compressed entries are attended over the
        whole buffer (or ``span_L``'s part of it) under a mask, experts are gathered per token.
        Inputs are not validated here; the engine checks token ids and room in the cache.

        ``span_L``: a tensor whose length L (its values are not read) bounds the positions this
        step sees -- every row's new position lies below L -- so that only the first L / ratio
        compressed entries are scored and attended, not the whole buffer: a short context in a
        long cache costs what its context costs. Compiled with L a dynamic dimension
        (``torch._dynamo.maybe_mark_dynamic``; L >= ``span_floor()``), one graph serves every L.
        """
        x = self._static(input_ids_B1, cache, span_L)
        return self._logits(x[:, -1:], self.hc_head_fn, self.hc_head_scale, self.hc_head_base, self.norm)[:, -1]

    def verify_step(self, input_ids_BT: torch.Tensor, cache: Cache, span_L: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``decode_step`` for T <= PER_ROW_TOKENS tokens per row (a token and its drafts, each row
        at its own position) -> (logits [B, T, V], streams [B, T, S, D]): what speculative decoding
        verifies, compiled as the decode step is (``span_L`` bounds every row's last position)."""
        x = self._static(input_ids_BT, cache, span_L)
        return self._logits(x, self.hc_head_fn, self.hc_head_scale, self.hc_head_base, self.norm), x

    def mtp_step(self, hidden_BTSD: torch.Tensor, next_ids_BT: torch.Tensor, cache: Cache, at_B: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """``forward_mtp(..., cache, at=at_B, return_hidden=True)`` with fixed shapes (T <=
        PER_ROW_TOKENS) -> (draft logits [B, V] at each row's ``at``, the block's streams there
        [B, 1, S, D])."""
        positions = cache.mtp_pos[:, None] + torch.arange(next_ids_BT.shape[1], device=next_ids_BT.device)
        x, h = self.mtp[0](hidden_BTSD, self.embed(next_ids_BT), self._static_step(cache.mtp_pos, positions),
                           cache.layers[self.args.num_hidden_layers], next_ids_BT)
        cache.mtp_pos += next_ids_BT.shape[1]
        return self.head(logit_positions(h, None, at_B)[:, 0]).float(), logit_positions(x, None, at_B)

    def forward_mtp(self, hidden_BTSD: torch.Tensor, next_ids: torch.Tensor, cache: Cache | None = None,
                    start: int | torch.Tensor = 0, *, last_n: int | None = None, at: torch.Tensor | None = None,
                    return_hidden: bool = False, targets: torch.Tensor | None = None):
        """MTP logits predicting token t+2 from the main streams at t and token t+1 (``next_ids``),
        or with ``targets`` their mean cross-entropy (as ``forward``'s).

        ``start`` is the position of the first row entry (the MTP block keeps its own window cache in
        ``cache.layers[-1]`` and its own position counter ``cache.mtp_pos``). ``last_n``: logits of
        the last n positions only; ``at`` ([B] indices): of one position per row ([B, 1, V], with
        the streams of that position alone), as speculative decoding drafts from each row's last
        accepted position.
        """
        if not len(self.mtp):
            raise ValueError("this model has no MTP block (num_nextn_predict_layers = 0)")
        mtp = self.mtp[0]
        B, T = _check_ids(next_ids, self.args.vocab_size)
        lc = None
        if cache is not None:
            pos = cache.mtp_pos
            lc = cache.layers[self.args.num_hidden_layers]
            if T > PER_ROW_TOKENS and not bool((pos == pos[0]).all()):
                raise ValueError(f"MTP chunks of rows at different positions take at most {PER_ROW_TOKENS} "
                                 f"tokens, got {T}")
        else:
            pos = torch.full((B,), int(start), dtype=torch.long, device=next_ids.device)
        step = self._step(B, T, pos, next_ids.device, cache is not None)
        x, h = mtp(hidden_BTSD, self.embed(next_ids), step, lc, next_ids)
        if cache is not None:
            cache.mtp_pos += T
        if at is not None:
            x = logit_positions(x, None, at)
        h = logit_positions(h, last_n, at)
        out = self._head_out(h, targets)
        return (out, x) if return_hidden else out

    # ------------------------------------------------------------------ internals
    def _rowwise(self, input_ids, cache, last_n, at, return_hidden):
        """More than PER_ROW_TOKENS tokens per row, rows at different positions: one row at a time
        (each a chunk from its own start)."""
        outs = [self(input_ids[r:r + 1], cache.select(r), last_n=last_n, at=None if at is None else at[r:r + 1],
                     return_hidden=return_hidden) for r in range(input_ids.shape[0])]
        if return_hidden:
            return torch.cat([o[0] for o in outs]), torch.cat([o[1] for o in outs])
        return torch.cat(outs)

    def span_floor(self) -> int:
        """The shortest span (``decode_step``'s ``span_L``) from which every compressing layer
        reads at least two entries and every indexer picks top-k of more than top-k: on spans from
        here up the step takes the same branches and no entry count is 1 (a size-1 dimension
        specializes a compiled graph's layout), so one graph with a dynamic span serves them."""
        floor = 1
        for layer in self.layers:
            attn = layer.attn
            if attn.compressor is not None:
                picks = attn.indexer is not None and not attn.attend_all
                floor = max(floor, attn.ratio * (attn.indexer.topk + 1 if picks else 2))
        return floor

    def _static(self, input_ids_BT, cache, span_L=None):
        """The main layers on the fixed-shape per-row path -> the streams [B, T, S, D]."""
        positions = cache.pos[:, None] + torch.arange(input_ids_BT.shape[1], device=input_ids_BT.device)
        step = self._static_step(cache.pos, positions, None if span_L is None else span_L.shape[0])
        x = self.embed(input_ids_BT).unsqueeze(2).expand(-1, -1, self.args.hc_mult, -1).contiguous()
        for i, layer in enumerate(self.layers):
            x = layer(x, step, cache.layers[i], input_ids_BT)
        cache.pos += input_ids_BT.shape[1]
        return x

    def _static_step(self, pos_B, positions_BT, span=None) -> Step:
        return Step(pos=pos_B, positions=positions_BT, start=None, rotary=dict(self.rotary.items()),
                    rope={k: r(positions_BT) for k, r in self.rotary.items()}, static=True, span=span)

    def _head_input(self, x_BTSD, fn, scale, base, norm):
        return norm(hc_head(x_BTSD, fn, scale, base, self.args.rms_norm_eps, self.args.hc_eps))

    def _logits(self, x_BTSD, fn, scale, base, norm):
        return self.head(self._head_input(x_BTSD, fn, scale, base, norm)).float()

    def _step(self, B, T, pos, device, has_cache: bool) -> Step:
        if pos is None:
            pos = torch.zeros(B, dtype=torch.long, device=device)
        # a few tokens per row against a cache (decode steps, speculative verification and drafts):
        # the per-row path, whether or not the rows sit apart, so that verifying drafts computes
        # what decoding them one by one would (a bf16 chunk would round differently); many tokens
        # from one start: the chunk path
        per_row = has_cache and T <= PER_ROW_TOKENS
        start = None if per_row else int(pos[0])
        positions = pos[:, None] + torch.arange(T, device=device)[None, :]
        rope = {k: r(positions) for k, r in self.rotary.items()}
        return Step(pos=pos, positions=positions, start=start, rotary=dict(self.rotary.items()), rope=rope)

    def init_weights(self, std: float = 0.02, seed: int = 0) -> None:
        """Random init for training from scratch (a checkpoint overwrites all of it)."""
        init_params(self, std, seed)
        for i, layer in enumerate(self.layers):
            if layer.ffn.gate.hash_routed:
                set_hash_table(layer.ffn.gate, seed=seed * 1000 + i)

    def param_counts(self) -> dict[str, int]:
        a = self.args
        total = sum(p.numel() for p in self.parameters())
        mtp = sum(p.numel() for p in self.mtp.parameters())
        per_expert = 3 * a.hidden_size * a.moe_intermediate_size
        idle = (a.n_routed_experts - a.num_experts_per_tok) * per_expert * a.num_hidden_layers
        emb = self.embed.weight.numel()
        return {"total": total, "active": total - mtp - idle - emb, "embedding": emb, "mtp": mtp,
                "routed": routed_params(self)}


def indexer_learners(model: nn.Module) -> list["Attention"]:
    """The attention layers of ``model`` whose lightning indexer can learn from its KL loss (set
    ``learn_indexer``, read ``indexer_loss`` after the forward)."""
    return [m for m in model.modules() if isinstance(m, Attention) and m.indexer is not None]


HOT_PATH_RECOMPILES = 64


def _recompile_limit() -> dict:
    """torch.compile's own per-function limit where it has one (torch >= 2.12); before, the
    process-wide one is raised (never lowered)."""
    import inspect

    if "recompile_limit" in inspect.signature(torch.compile).parameters:
        return {"recompile_limit": HOT_PATH_RECOMPILES}
    cfg = torch._dynamo.config
    cfg.recompile_limit = max(cfg.recompile_limit, HOT_PATH_RECOMPILES)
    return {}


def compile_hot_paths() -> None:
    """Swap the pure-tensor hot spots for torch.compile'd versions: the mHC passes between a
    block's sublayers (``Block.attn_input``, ``Block.ffn_input``: hc_post, hc_pre with its Sinkhorn
    and the next RMSNorm as one call; the block's last hc_post), whose many passes over the
    [T, S, D] streams fuse into a few loops (on a CPU the 4 x 4 stream mixing fuses too,
    ``sparseek.model.fuse``, instead of a batched library call); one call of sparse attention
    (masking, the softmax with its sink and the casts fuse around the score and value products)
    and, in training, its recomputing backward; the router (scores, top-k, weights); the routed experts (sorting, gathers, the SwiGLU
    chain between the grouped GEMMs, the weighted scatter back); the attention's input and output
    projections with their norms and rotations; the compressors' prefill calls (fp32 projections,
    pooling of the windows they complete, the state they keep: one call instead of ~20 small eager
    ops); every RMSNorm (each a handful of elementwise passes between GEMMs when eager).
    Process-wide (module and class attributes). Each compiled call costs ~50 us of dispatch on a
    CPU (guards, wrappers), so larger units pay at short prompts: `small`'s 128-token prefill makes
    81 calls (``benchmarks/prefill_hot_paths_ab.py`` times the recent merges against the forms
    before them). The eager functions stay the reference the compiled ones are tested against."""
    if getattr(hc_post, "_compiled", False):
        return
    from sparseek.model import cpu_kernels
    from sparseek.model.fuse import fusing_backend

    cpu_kernels.available()  # built now, outside the graphs (which only ask whether it was)
    # emulate_precision_casts: bf16 intermediates rounded where the eager code rounds them (else a
    # last-bit difference flips expert and indexer picks; fp32 reductions may still add in
    # another order, docs/engine.md)
    backend = fusing_backend(emulate_precision_casts=True)
    # an attention call has a dozen input structures (compressed entries or none, picked or all,
    # one block or several, one row or many), each a graph of its own: dynamo's default of 8 per
    # function would leave a long-running server on eager code after a few prompts
    limit = _recompile_limit()
    for module, name, kwargs in hot_paths():
        setattr(module, name, torch.compile(getattr(module, name), backend=backend, **limit, **kwargs))
    hc_post._compiled = True


def hot_paths() -> tuple:
    """(module, function name, torch.compile kwargs) of what ``compile_hot_paths`` swaps.

    The default dynamic=None makes T symbolic once it varies while the stream count S stays
    static (so the 4 x 4 mixing can fuse); an attention call's sizes (blocks per call, window
    band, compressed entries) differ from call to call, so they are symbolic from the start."""
    import sys

    this = sys.modules[__name__]
    return ((this, "hc_post", {}), (Block, "attn_input", {}), (Block, "ffn_input", {}), (this, "hc_head", {}),
            (this, "attend_lse", {"dynamic": True}),
            (this, "attend_backward", {"dynamic": True}), (common, "swiglu", {}), (common.Gate, "forward", {}),
            (common.Experts, "compute", {}),
            (Attention, "project", {}), (Attention, "output", {}), (Compressor, "chunk", {}),
            (common.RMSNorm, "forward", {}))


def set_hash_table(gate, seed: int) -> None:
    """A fixed random token -> k distinct experts table (DeepSeek's hash is undisclosed)."""
    g = torch.Generator(device="cpu")
    g.manual_seed(seed)
    V, k = gate.tid2eid.shape
    table = torch.rand(V, gate.n_experts, generator=g).topk(k, dim=-1).indices
    gate.tid2eid.copy_(table.to(gate.tid2eid.device))
