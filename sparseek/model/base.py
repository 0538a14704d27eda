"""What every decoder here shares: the cache factory, input checks, and the random init."""

from __future__ import annotations

import torch
from torch import nn

from sparseek.model.cache import Cache
from sparseek.model.loss import head_loss

# Elements allowed in one query block's score + gather tensors (keeps peak memory flat in T).
ATTN_BLOCK_BUDGET = 1 << 24


def attn_block_budget(device: torch.device) -> int:
    """A GPU has the memory for 16x bigger blocks, and small blocks cost it many small launches."""
    return ATTN_BLOCK_BUDGET if device.type == "cpu" else ATTN_BLOCK_BUDGET << 4


def query_block(device: torch.device) -> int:
    """Queries per V4 attention block: a block of Qb queries scores the Qb + window - 1 keys of
    its window band, wasting (Qb - 1) / window of the window work -- the cost on a CPU; a GPU
    pays more for small launches than for the wasted band."""
    return 64 if device.type == "cpu" else 512


class DecoderLM(nn.Module):
    args = None

    def new_cache(self, batch_size: int, max_seq_len: int, dtype=None, device=None,
                  fp8_storage: bool | None = None, with_mtp: bool = True, fp4_storage: bool | None = None) -> Cache:
        """``with_mtp=False``: no room for the MTP layers (what decoding without drafts needs)."""
        p = self.embed.weight
        return Cache(self.args, batch_size, max_seq_len, device=device or p.device, dtype=dtype or p.dtype,
                     fp8_storage=fp8_storage, fp4_storage=fp4_storage,
                     with_mtp=with_mtp and len(getattr(self, "mtp", ())) > 0)

    def _head_out(self, h: torch.Tensor, targets: torch.Tensor | None) -> torch.Tensor:
        """The head over ``h``: fp32 logits, or with ``targets`` the mean cross-entropy without them
        (``model/loss.py``)."""
        return self.head(h).float() if targets is None else head_loss(self.head, h, targets)

    def _begin(self, input_ids: torch.Tensor, cache: Cache | None) -> tuple[int, int, bool]:
        """Validate a forward's inputs -> (B, T, rows_apart: several tokens per row, rows at
        different positions)."""
        B, T = _check_ids(input_ids, self.args.vocab_size)
        if cache is None:
            return B, T, False
        _check_cache(cache, B, T)
        return B, T, T > 1 and not bool((cache.pos == cache.pos[0]).all())


def logit_positions(x_BT: torch.Tensor, last_n: int | None, at: torch.Tensor | None) -> torch.Tensor:
    """The positions a forward computes logits for: all, the last ``last_n``, or one per row
    (``at`` [B] indices -> [B, 1, ...])."""
    if at is not None:
        return x_BT[torch.arange(x_BT.shape[0], device=x_BT.device), at][:, None]
    return x_BT if last_n is None else x_BT[:, -last_n:]


def init_params(model: nn.Module, std: float, seed: int) -> None:
    """Matrices ~ N(0, std); norm weights and gating factors 1; biases, sinks and ape 0."""
    # one generator per device, drawn where the parameter lives: a CPU-drawn init of a
    # 10B-parameter model on a GPU would take a minute of single-threaded sampling
    gens: dict[torch.device, torch.Generator] = {}

    def gen(dev: torch.device) -> torch.Generator:
        if dev not in gens:
            gens[dev] = torch.Generator(device=dev)
            gens[dev].manual_seed(seed)
        return gens[dev]

    with torch.no_grad():
        for name, p in model.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if p.device.type == "meta":
                continue
            if p.dim() >= 2 and leaf != "ape":
                p.copy_(torch.randn(p.shape, generator=gen(p.device), device=p.device) * std)
            elif p.dim() == 1 and (leaf == "weight" or leaf.endswith("_scale")):
                p.fill_(1.0)
            else:
                p.zero_()


def _check_ids(ids: torch.Tensor, vocab: int) -> tuple[int, int]:
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.dtype not in (torch.long, torch.int32, torch.int64):
        raise ValueError(f"input_ids must be an integer tensor [batch, tokens], got "
                         f"{getattr(ids, 'shape', type(ids))} {getattr(ids, 'dtype', '')}")
    if ids.shape[1] == 0:
        raise ValueError("input_ids has no tokens")
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= vocab:
        raise ValueError(f"token id out of range: ids span [{lo}, {hi}] but vocab_size is {vocab}")
    return ids.shape


def _check_cache(cache: Cache, B: int, T: int) -> None:
    if cache.batch_size != B:
        raise ValueError(f"cache was made for batch size {cache.batch_size}, input has {B} rows")
    cache.check_room(T)
