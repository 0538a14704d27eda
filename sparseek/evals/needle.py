"""Needle in a haystack: the passkey retrieval test of long-context models (Mohtashami & Jaggi
2023, the prompt LongLoRA and others use), over a grid of context lengths and needle depths.

A five-digit pass key is hidden in filler text ("The grass is green. The sky is blue. ...") at a
depth from 0 (the start) to 1 (the end), and the model, greedy, must complete "What is the pass
key? The pass key is" with it. Nothing is downloaded: the items are generated (seeded), sized in
the model's own tokens, so ``context_tokens`` is what the model reads. A model scores 100% only if
its attention finds a few tokens anywhere in the context -- for DeepSeek-V4, past the 128-token
window, through the compressed entries (CSA's top-k picks, HCA) alone.

    sparseek eval -m DIR --tasks needle --context-lengths 16384,131072 --max-seq-len 131200
"""

from __future__ import annotations

import random
import re

from sparseek.evals.base import Gen, GenerationTask, mean
from sparseek.evals.data import DataSource

INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
         "I will quiz you about the important information there.\n\n")
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key. "
QUESTION = "\n\nWhat is the pass key? The pass key is"
LENGTHS = (1024, 4096, 16384, 65536, 131072, 262144, 524288, 1048576)
DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)


class Needle(GenerationTask):
    name = "needle"
    num_fewshot = 0
    headline = "exact_match"
    max_tokens = 8

    def __init__(self, num_fewshot: int | None = None, seed: int = 1234, lengths=None, depths=DEPTHS,
                 trials: int = 2):
        super().__init__(0, seed)
        self.lengths = None if lengths is None else sorted({int(n) for n in lengths})
        self.depths = tuple(float(d) for d in depths)
        if not self.depths or any(not 0 <= d <= 1 for d in self.depths):
            raise ValueError(f"needle depths must be in [0, 1], got {list(depths)}")
        if trials < 1:
            raise ValueError("needle trials must be >= 1")
        self.trials = trials
        self.tok = None
        self.max_len = None

    def bind(self, model) -> None:
        """The items are sized in the model's tokens, and must fit its context."""
        self.tok = getattr(model, "tok", None)
        self.max_len = getattr(model, "max_len", None)

    def load(self, src: DataSource) -> None:
        if self.tok is None:
            raise ValueError("needle sizes its contexts in the model's tokens: it needs a model with a tokenizer")
        room = None if self.max_len is None else self.max_len - self.max_tokens - 2  # + BOS
        lengths = self.lengths or [n for n in LENGTHS if room is None or n < room] + ([room] if room else [])
        too_long = [n for n in lengths if room is not None and n > room]
        if too_long:
            raise ValueError(f"needle: a {max(too_long)}-token context does not fit the engine's max_seq_len "
                             f"({self.max_len}); raise --max-seq-len to at least {max(too_long) + self.max_tokens + 2}")
        rng = random.Random(self.seed)
        per_unit = len(self.tok.encode(FILLER * 8)) / 8
        self.docs = []
        for n in lengths:
            for depth in self.depths:
                for _ in range(self.trials):
                    key = str(rng.randint(10000, 99999))
                    self.docs.append(self._item(n, depth, key, per_unit))
        self.lengths = lengths

    def _item(self, n: int, depth: float, key: str, per_unit: float) -> dict:
        """The longest haystack (whole filler sentences) of at most ``n`` tokens with the needle
        after ``depth`` of its filler."""
        fixed = len(self.tok.encode(INTRO + NEEDLE.format(key=key) + QUESTION))
        units = max(0, int((n - fixed) / per_unit))
        while True:
            before = round(depth * units)
            text = INTRO + FILLER * before + NEEDLE.format(key=key) + FILLER * (units - before) + QUESTION
            enc = self.tok.tk.encode(text, add_special_tokens=False)  # with offsets: where the needle lands
            tokens = len(enc.ids)
            if tokens <= n or units == 0:
                break
            units -= max(1, int((tokens - n) / per_unit))
        at = len(INTRO) + len(FILLER) * before  # the needle's first character
        return {"id": f"len{n}-depth{depth:g}-{key}", "length": n, "depth": depth, "key": key, "prompt": text,
                "context_tokens": tokens, "needle_at": sum(1 for _, end in enc.offsets if end <= at)}

    def prompt(self, doc: dict) -> str:
        return doc["prompt"]

    def gen(self, doc_index: int, sample: int) -> Gen:
        return Gen(max_tokens=self.max_tokens, stop=("\n",))

    def score(self, doc: dict, completions: list[str]) -> dict:
        found = re.search(r"\d+", completions[0])
        pred = found.group(0) if found else None
        return {"exact_match": float(pred == doc["key"]), "pred": pred, "gold": doc["key"], "length": doc["length"],
                "depth": doc["depth"], "context_tokens": doc["context_tokens"], "completion": completions[0]}

    def aggregate(self, rows: list[dict]) -> dict:
        """Overall, per context length and per (length, depth) cell of the grid."""
        out = {"exact_match": mean(r["exact_match"] for r in rows)}
        for n in sorted({r["length"] for r in rows}):
            at = [r for r in rows if r["length"] == n]
            out[f"exact_match@{n}"] = mean(r["exact_match"] for r in at)
            for d in sorted({r["depth"] for r in at}):
                out[f"exact_match@{n}@depth{d:g}"] = mean(r["exact_match"] for r in at if r["depth"] == d)
        return out

    def protocol(self) -> str:
        return (f"passkey retrieval, greedy; lengths {self.lengths} tokens x depths {list(self.depths)} x "
                f"{self.trials} keys")
