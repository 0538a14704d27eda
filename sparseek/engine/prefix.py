"""Prefix caching: prompts that begin alike read their common beginning once.

A V4 cache row is a handful of rings (the sliding window, the compressors' unfinished windows) and
position-indexed stores (compressed entries, indexer keys; V3: latents). A snapshot of a row after
P tokens (``Cache.snapshot``: the rings whole, the stores up to P) is everything a sequence needs
to go on from position P, so any later prompt that begins with those P tokens restores it into its
own row and prefills only the rest -- the same computation as a chunked prefill that happened to
cut at P (tested equal to prefilling alone).

Snapshots are taken at the end of every prompt of at least ``min_tokens`` (a later prompt that
extends it -- the next turn of a chat -- goes on from there; the same prompt again needs no forward
at all, its last logits are kept) and at the longest common beginning, in whole ``block``-token
steps, of a prompt with another waiting prompt or a kept one (a few-shot preamble, a system
prompt). Kept within a byte budget; least recently used first out, snapshots never reused before
snapshots reused. All of them are dropped when the model's weights change (an optimizer step, a
``load_state_dict``: parameters' version counters or storage move), so a snapshot never outlives
the weights that computed it.

Snapshots live in namespaces: a prompt read under a LoRA adapter (``SamplingParams.lora``) gives
other entries than the same prompt under the base model, so its hashes start from the adapter's
name and its snapshots only serve prompts under that adapter.

Lookup walks a prompt once: a rolling hash of every prefix (Python's tuple hash, deterministic for
ints), checked against the kept snapshots' hashes (exact keys compared on a hit) and, at block
boundaries, against the blocks of kept and waiting prompts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def prefix_hashes(ids, ns=None) -> list[int]:
    """h[i] identifies ids[:i + 1] read in namespace ``ns`` (the base model's starts from 0)."""
    h, out = 0 if ns is None else hash(("namespace", ns)), []
    for t in ids:
        h = hash((h, t))
        out.append(h)
    return out


@dataclass
class Snapshot:
    key: tuple[int, ...]
    state: list[torch.Tensor]  # Cache.snapshot of a row after len(key) tokens
    logits: torch.Tensor  # [V] at the last position
    hidden: torch.Tensor | None  # [1, 1, S, D] main streams at the last position (speculative decoding)
    nbytes: int
    blocks: list[int]  # hashes of its whole-block prefixes, as ``PrefixCache.blocks`` counts them
    ns: object = None  # what else the entries depend on (a LoRA adapter's name)
    hits: int = 0
    used: int = 0


class PrefixCache:
    def __init__(self, capacity_bytes: int, min_tokens: int = 32, block: int = 16):
        self.capacity, self.min_tokens, self.block = capacity_bytes, max(1, min_tokens), block
        self.snaps: dict[int, Snapshot] = {}  # by the hash of the whole key
        self.blocks: dict[int, int] = {}  # hash of a block-aligned prefix of a kept key -> how many keys have it
        self.nbytes = 0
        self._clock = 0
        self.hits = self.tokens_saved = 0

    def __len__(self) -> int:
        return len(self.snaps)

    def clear(self) -> None:
        self.snaps.clear()
        self.blocks.clear()
        self.nbytes = 0

    def longest(self, ids, hashes: list[int] | None = None, ns=None) -> Snapshot | None:
        """The kept snapshot of the longest prefix of ``ids`` (all of it included) in ``ns``."""
        hashes = hashes or prefix_hashes(ids, ns)
        for n in range(len(ids), self.min_tokens - 1, -1):
            s = self.snaps.get(hashes[n - 1])
            if s is not None and len(s.key) == n and s.ns == ns and s.key == tuple(ids[:n]):
                return s
        return None

    def shared(self, ids, hashes: list[int], others: dict[int, int]) -> int:
        """The longest whole-block prefix of ``ids``, shorter than it and at least ``min_tokens``,
        that a kept prompt or another waiting one (``others``: block hashes -> count, ``ids``' own
        included once) also begins with; 0 if none. Hash matches count as equal here: a
        collision costs a wasted snapshot, never a wrong token (restoring compares keys)."""
        top = (len(ids) - 1) // self.block * self.block
        for n in range(top, self.min_tokens - 1, -self.block):
            h = hashes[n - 1]
            if self.blocks.get(h, 0) > 0 or others.get(h, 0) > 1:
                return n
        return 0

    def block_hashes(self, hashes: list[int]) -> list[int]:
        return hashes[self.block - 1::self.block]

    def touch(self, s: Snapshot, reused: bool = True) -> None:
        self._clock += 1
        s.used = self._clock
        if reused:
            s.hits += 1
            self.hits += 1
            self.tokens_saved += len(s.key)

    def put(self, key, state, logits, hidden, hashes: list[int], ns=None) -> Snapshot | None:
        """Keep a snapshot of ``key`` read in ``ns`` (None when it alone exceeds the budget)."""
        key = tuple(key)
        h = hashes[len(key) - 1]
        old = self.snaps.get(h)
        if old is not None and old.key == key and old.ns == ns:
            self.touch(old, reused=False)
            return old
        tensors = state + [logits] + ([hidden] if hidden is not None else [])
        nbytes = sum(t.numel() * t.element_size() for t in tensors)
        if nbytes > self.capacity:
            return None
        if old is not None:  # a hash collision: the newer key wins the slot
            self._drop(h)
        while self.nbytes + nbytes > self.capacity:
            self._evict()
        s = Snapshot(key, state, logits.clone(), hidden.clone() if hidden is not None else None, nbytes,
                     self.block_hashes(hashes[:len(key)]), ns)
        self.snaps[h] = s
        self.nbytes += nbytes
        for bh in s.blocks:
            self.blocks[bh] = self.blocks.get(bh, 0) + 1
        self.touch(s, reused=False)
        return s

    def _evict(self) -> None:
        h = min(self.snaps, key=lambda k: (self.snaps[k].hits > 0, self.snaps[k].used))
        self._drop(h)

    def _drop(self, h: int) -> None:
        s = self.snaps.pop(h)
        self.nbytes -= s.nbytes
        for bh in s.blocks:
            self.blocks[bh] -= 1
            if not self.blocks[bh]:
                del self.blocks[bh]
