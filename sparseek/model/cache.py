"""Preallocated per-sequence state for incremental decoding.

One ``Cache`` holds, for every attention layer (and the MTP block), exactly what the
architecture needs to continue a sequence:

* a 128-entry ring buffer of the sliding-window KV (K = V, one head; slot = position % window);
* for compressed layers, the compressed entries emitted so far (T/4 for CSA, T/128 for HCA) and
  the compressor's state for the unfinished window (with the previous window's overlap half for
  CSA), in fp32 as DeepSeek's code keeps it;
* for CSA layers, the lightning indexer's compressed keys and its own compressor state;
* for MLA (V3) layers, the normalized latent and the shared rope key.

With ``kv_fp8`` (DeepSeek's production format) the window and compressed entries are stored as
FP8 e4m3 for the non-rope dims (1x64 blocks, power-of-two scales) plus the rope dims in the model
dtype: 583 bytes per V4-Flash entry instead of 1,024 in bf16. The model rounds those dims to FP8
before it uses them (as DeepSeek's code does), so storing them is lossless. With ``index_fp4`` the
indexer keys, rounded to FP4 by the model, are stored as FP4 bytes (68 per 128-dim key, not 256).

``pos`` counts the tokens each row has consumed; rows may differ (decode steps of sequences of
different lengths), except that a multi-token chunk needs all rows at the same position.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from sparseek.config import CSA_RATIO, ModelArgs
from sparseek.model.qat import FP4Keys, fp8_dequant, fp8_quant, fp8_rounded


FP8_BLOCK = 64


def fp8_block(n: int) -> int:
    """Values per scale: DeepSeek's 64; heads with fewer non-rope dims (small presets) use one block."""
    block = min(FP8_BLOCK, n)
    if n <= 0 or n % block:
        raise ValueError(f"FP8 KV needs the non-rope dims ({n}) in whole blocks of {FP8_BLOCK}")
    return block


def fp8_round(x: torch.Tensor, n: int) -> torch.Tensor:
    """Round the first ``n`` dims of ``x`` to FP8 e4m3 with one power-of-two scale per 64 values and
    back (DeepSeek's quantization-aware round trip of cached KV); the rest pass unchanged."""
    return torch.cat([fp8_rounded(x[..., :n], fp8_block(n)).to(x.dtype), x[..., n:]], dim=-1)


class FP8KV:
    """Packs KV entries bytewise into one uint8 tensor: [rope dims in ``dtype`` | FP8 codes of the
    other dims | one scale exponent byte (e8m0) per 64 codes]. One tensor keeps every ring, gather
    and row copy of the cache unchanged; only writes encode and reads decode."""

    def __init__(self, dim: int, rope_dim: int, dtype: torch.dtype):
        self.n = dim - rope_dim
        self.block = fp8_block(self.n)
        self.rope_bytes = rope_dim * torch.tensor([], dtype=dtype).element_size()
        self.dtype = dtype
        self.width = self.rope_bytes + self.n + self.n // self.block

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        codes, scale = fp8_quant(x[..., :self.n], self.block)
        rope = x[..., self.n:].to(self.dtype).contiguous().view(torch.uint8)
        exps = torch.frexp(scale)[1] - 1 + 127  # the power-of-two scale as its e8m0 byte
        return torch.cat([rope, codes.view(torch.uint8), exps.to(torch.uint8)], dim=-1)

    def decode(self, packed: torch.Tensor) -> torch.Tensor:
        rb, n = self.rope_bytes, self.n
        rope = _bytes_as(packed[..., :rb], self.dtype)
        codes = _bytes_as(packed[..., rb:rb + n], torch.float8_e4m3fn)
        scale = torch.exp2(packed[..., rb + n:].float() - 127)
        return torch.cat([fp8_dequant(codes, scale, self.dtype), rope], dim=-1)


def _bytes_as(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # a byte slice may keep strides that no dtype view accepts even when it counts as contiguous
    # (empty, or size-1 dims): copy it into fresh, dense strides
    return t.new_empty(t.shape).copy_(t).view(dtype)


@dataclass
class CompressorState:
    """The compressor's raw per-token projections (kv, gate score + ape) of the last few positions,
    in a ring indexed by position: enough to pool the current window and, with overlap, the
    previous one. Being position-indexed, it is rolled back by moving ``Cache.pos`` back."""

    kv: torch.Tensor  # [B, R, coff*c] fp32, slot = position % R
    score: torch.Tensor

    @classmethod
    def empty(cls, batch: int, ratio: int, dim: int, overlap: bool, device, spare: int) -> "CompressorState":
        coff = 2 if overlap else 1
        kv = torch.zeros(batch, coff * ratio + spare, coff * dim, dtype=torch.float32, device=device)
        return cls(kv, torch.zeros_like(kv))

    def rows(self, r: slice) -> "CompressorState":
        return CompressorState(self.kv[r], self.score[r])


@dataclass
class LayerCache:
    window: torch.Tensor | None = None  # [B, win, c]
    comp: torch.Tensor | None = None  # [B, cap/m, c]
    comp_state: CompressorState | None = None
    index_keys: torch.Tensor | None = None  # [B, cap/4, c_I]
    index_state: CompressorState | None = None
    latent: torch.Tensor | None = None  # [B, cap, kv_lora_rank + rope]  (MLA)
    codec: FP8KV | None = None  # set: window and comp hold packed FP8 entries (uint8)
    key_codec: FP4Keys | None = None  # set: index_keys hold packed FP4 keys (uint8)

    def rows(self, r: slice) -> "LayerCache":
        """A view of some rows; writes through it land in this cache."""
        def cut(t):
            return None if t is None else t[r]
        return LayerCache(cut(self.window), cut(self.comp), self.comp_state.rows(r) if self.comp_state else None,
                          cut(self.index_keys), self.index_state.rows(r) if self.index_state else None,
                          cut(self.latent), self.codec, self.key_codec)

    def encode(self, kv: torch.Tensor) -> torch.Tensor:
        """KV entries as the window / comp buffers store them."""
        return kv if self.codec is None else self.codec.encode(kv)

    def decode(self, stored: torch.Tensor) -> torch.Tensor:
        return stored if self.codec is None else self.codec.decode(stored)

    def encode_keys(self, keys: torch.Tensor | None) -> torch.Tensor | None:
        """Indexer keys as ``index_keys`` stores them."""
        return keys if self.key_codec is None or keys is None else self.key_codec.encode(keys)

    def decode_keys(self, stored: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return stored if self.key_codec is None else self.key_codec.decode(stored, dtype)

    def tensors(self) -> list[torch.Tensor]:
        out = [t for t in (self.window, self.comp, self.index_keys, self.latent) if t is not None]
        for st in (self.comp_state, self.index_state):
            if st is not None:
                out += [st.kv, st.score]
        return out


class Cache:
    # Ring buffers keep this many slots beyond what the architecture needs, so that up to SPARE
    # speculative tokens can be written and then rolled back by moving `pos` alone.
    SPARE = 8

    def __init__(self, args: ModelArgs, batch_size: int, max_seq_len: int, device=None,
                 dtype: torch.dtype = torch.float32, with_mtp: bool = True, fp8_storage: bool | None = None,
                 fp4_storage: bool | None = None):
        """``fp8_storage`` (default: ``args.kv_fp8``) packs window and compressed entries as FP8;
        False keeps the (FP8-rounded) values in ``dtype``, with identical results.
        ``fp4_storage`` (default: ``args.index_fp4``) packs the indexer keys as FP4 the same way."""
        if max_seq_len <= 0 or batch_size <= 0:
            raise ValueError(f"cache needs a positive batch size and length, got {batch_size} x {max_seq_len}")
        if fp8_storage and not args.kv_fp8:
            raise ValueError("fp8_storage needs a model that rounds its KV to FP8 (kv_fp8=True); storing "
                             "unrounded entries in FP8 would silently change the results")
        if fp4_storage and not args.index_fp4:
            raise ValueError("fp4_storage needs a model that rounds its indexer keys to FP4 (index_fp4=True)")
        self.fp8_storage = args.kv_fp8 if fp8_storage is None else fp8_storage
        self.fp4_storage = args.index_fp4 if fp4_storage is None else fp4_storage
        self.args = args
        self.batch_size = batch_size
        self.max_seq_len = max_seq_len
        self.dtype = dtype
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.pos = torch.zeros(batch_size, dtype=torch.long, device=self.device)
        self.mtp_pos = torch.zeros(batch_size, dtype=torch.long, device=self.device)
        # each row's LoRA adapter slot when several are served at once (sparseek.model.multi_lora)
        self.adapter = torch.zeros(batch_size, dtype=torch.long, device=self.device)
        n_blocks = args.num_hidden_layers + (args.n_mtp if with_mtp else 0)
        self.layers = [self._layer(i) for i in range(n_blocks)]

    def _layer(self, layer_id: int) -> LayerCache:
        a, B, dev = self.args, self.batch_size, self.device
        if not a.is_v4:
            return LayerCache(latent=torch.zeros(B, self.max_seq_len, a.kv_lora_rank + a.qk_rope_head_dim,
                                                 dtype=self.dtype, device=dev))
        c, spare = a.head_dim, self.SPARE
        codec = FP8KV(c, a.qk_rope_head_dim, self.dtype) if self.fp8_storage else None
        width, kv_dtype = (codec.width, torch.uint8) if codec else (c, self.dtype)
        lc = LayerCache(window=torch.zeros(B, a.sliding_window + spare, width, dtype=kv_dtype, device=dev),
                        codec=codec)
        m = a.compress_ratio(layer_id)
        if m:
            overlap = m == CSA_RATIO
            lc.comp = torch.zeros(B, self.max_seq_len // m, width, dtype=kv_dtype, device=dev)
            lc.comp_state = CompressorState.empty(B, m, c, overlap, dev, spare)
            if overlap:
                lc.key_codec = FP4Keys(a.index_head_dim) if self.fp4_storage else None
                width, key_dtype = (lc.key_codec.width, torch.uint8) if lc.key_codec else (a.index_head_dim,
                                                                                           self.dtype)
                lc.index_keys = torch.zeros(B, self.max_seq_len // m, width, dtype=key_dtype, device=dev)
                lc.index_state = CompressorState.empty(B, m, a.index_head_dim, True, dev, spare)
        return lc

    # ------------------------------------------------------------------ bookkeeping
    def mark_static(self) -> "Cache":
        """Pin every buffer's address for torch.compile, so that a CUDA-graphed decode step may
        update the cache in place (inductor otherwise skips graphs that mutate their inputs)."""
        for t in [self.pos, self.mtp_pos] + [t for lc in self.layers for t in lc.tensors()]:
            torch._dynamo.mark_static_address(t)
        return self

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for lc in self.layers for t in lc.tensors())

    def reset(self, rows=None) -> None:
        """Forget rows (all by default) so their slots can take new sequences. Every entry is
        position-indexed and masked by ``pos``, so resetting the counters is enough."""
        rows = torch.arange(self.batch_size, device=self.device) if rows is None else torch.as_tensor(rows, device=self.device)
        self.pos[rows] = 0
        self.mtp_pos[rows] = 0

    def rollback(self, row: int, n: int, mtp: bool = False) -> None:
        """Forget the last ``n`` tokens of a row (rejected speculative tokens), n <= SPARE.

        Nothing is erased: windows, compressor rings and latents are indexed by position and read
        up to ``pos`` only, and the rings have SPARE extra slots so no live entry was overwritten."""
        if not 0 <= n <= self.SPARE:
            raise ValueError(f"can roll back at most {self.SPARE} tokens, asked for {n}")
        (self.mtp_pos if mtp else self.pos)[row] -= n

    def view(self, start: int, stop: int) -> "Cache":
        """Rows [start, stop) as a cache sharing storage with this one (writes land here)."""
        v = object.__new__(Cache)
        v.__dict__.update(self.__dict__)
        r = slice(start, stop)
        v.batch_size = stop - start
        v.pos, v.mtp_pos, v.adapter = self.pos[r], self.mtp_pos[r], self.adapter[r]
        v.layers = [lc.rows(r) for lc in self.layers]
        return v

    def select(self, row: int) -> "Cache":
        return self.view(row, row + 1)

    def copy_row(self, src: int, dst: int) -> None:
        """Move a sequence between slots (the engine keeps live sequences in rows [0, n))."""
        for t in [self.pos, self.mtp_pos, self.adapter] + [t for lc in self.layers for t in lc.tensors()]:
            t[dst] = t[src]

    def snapshot(self, row: int) -> list[torch.Tensor]:
        """A copy of one row's state that ``restore`` puts back into any row of a cache of this
        model: rings whole, position-indexed stores (compressed entries, indexer keys, latents)
        only up to what the row has written, so a snapshot's size grows with its length."""
        used = int(max(self.pos[row], self.mtp_pos[row]))
        out = [self.pos[row].clone(), self.mtp_pos[row].clone()]
        for t, per in self._row_stores():
            out.append((t[row] if per is None else t[row, :-(-used // per)]).clone())
        return out

    def restore(self, snap: list[torch.Tensor], row: int) -> None:
        self.pos[row], self.mtp_pos[row] = snap[0], snap[1]
        for (t, per), saved in zip(self._row_stores(), snap[2:]):
            t[row, :saved.shape[0]] = saved

    @contextlib.contextmanager
    def preserved(self, rows: Sequence[int]) -> Iterator[None]:
        """Rows whose contents must survive a fixed-shape step that runs every row of the cache
        (dummy tokens on rows it does not serve): a prompt prefilling between decode steps. Their
        positions and rings are put back afterwards; stores indexed by position need nothing, as
        a step starting at ``pos`` writes them only at and past it, where nothing is live yet."""
        if not rows:
            yield
            return
        idx = torch.as_tensor(list(rows), device=self.device)
        rings = [t for t, per in self._row_stores() if per is None]
        saved = [(t, t[idx].clone()) for t in [self.pos, self.mtp_pos] + rings]
        try:
            yield
        finally:
            for t, s in saved:
                t[idx] = s

    def _row_stores(self) -> list[tuple[torch.Tensor, int | None]]:
        """Every buffer with the positions one of its slots stands for (None: a ring, kept whole)."""
        out = []
        for i, lc in enumerate(self.layers):
            states = [st for st in (lc.comp_state, lc.index_state) if st is not None]
            out += [(t, None) for t in [lc.window] + [x for st in states for x in (st.kv, st.score)] if t is not None]
            m = self.args.compress_ratio(i) if self.args.is_v4 else 1
            out += [(t, m) for t in (lc.comp, lc.index_keys, lc.latent) if t is not None]
        return out

    def check_room(self, n_new: int) -> None:
        end = int(self.pos.max()) + n_new
        if end > self.max_seq_len:
            raise ValueError(
                f"sequence too long for the cache: {int(self.pos.max())} cached + {n_new} new tokens = {end} "
                f"> max_seq_len={self.max_seq_len}"
            )


def cache_bytes(args: ModelArgs, seq_len: int, dtype: torch.dtype = torch.bfloat16, batch_size: int = 1,
                spare: int = Cache.SPARE, with_mtp: bool = True) -> dict:
    """Analytic size of the decode state, by layer type: what grows per token and what is fixed.

    V4 (DeepSeek-V4 report §2.3, §3.5): every layer keeps a window of ``sliding_window`` KV entries
    (K = V, ``head_dim`` wide); a CSA layer adds one entry and one ``index_head_dim`` indexer key
    per 4 tokens, an HCA layer one entry per 128 tokens. Compressor rings hold fp32 projections of
    the last window(s). V3: one latent of ``kv_lora_rank + qk_rope_head_dim`` per token per layer.
    With ``args.kv_fp8`` an entry takes FP8 bytes for its non-rope dims plus one scale byte per 64;
    with ``args.index_fp4`` an indexer key half a byte per dim plus one scale byte per 32.
    """
    e = torch.tensor([], dtype=dtype).element_size()
    entry = FP8KV(args.head_dim, args.qk_rope_head_dim, dtype).width if args.is_v4 and args.kv_fp8 else None
    per_type: dict[str, dict[str, float]] = {}
    total_fixed = total_grow = 0.0
    n_blocks = args.num_hidden_layers + (args.n_mtp if with_mtp else 0)  # the MTP layers' own caches
    for i in range(n_blocks):
        if not args.is_v4:
            kind, grow, fixed = "mla", (args.kv_lora_rank + args.qk_rope_head_dim) * e, 0
        else:
            kind, m, c = args.layer_kind(i), args.compress_ratio(i), args.head_dim
            entry_bytes = entry if entry is not None else c * e
            fixed = (args.sliding_window + spare) * entry_bytes
            grow = 0.0
            if m:
                coff = 2 if m == CSA_RATIO else 1
                fixed += 2 * (coff * m + spare) * coff * c * 4
                grow += entry_bytes / m
                if m == CSA_RATIO:
                    grow += (FP4Keys(args.index_head_dim).width if args.index_fp4 else args.index_head_dim * e) / m
                    fixed += 2 * (2 * m + spare) * 2 * args.index_head_dim * 4
        slot = per_type.setdefault(kind, {"layers": 0, "bytes_per_token": 0.0, "fixed_bytes": 0})
        slot["layers"] += 1
        slot["bytes_per_token"] += grow
        slot["fixed_bytes"] += fixed
        total_fixed += fixed
        total_grow += grow
    total = total_fixed + total_grow * seq_len
    return {"per_layer_type": per_type, "bytes_per_token": total_grow, "fixed_bytes": total_fixed,
            "total_bytes": batch_size * total, "seq_len": seq_len, "dtype": str(dtype).replace("torch.", "")}
