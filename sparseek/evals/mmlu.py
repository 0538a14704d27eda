"""MMLU (Hendrycks et al. 2021): 57 subjects, 4 choices, 5-shot from the subject's dev split.

Prompt (the standard layout):
    The following are multiple choice questions (with answers) about high school physics.

    <dev question>
    A. ...
    B. ...
    C. ...
    D. ...
    Answer: B

    ... (5 dev items) ...
    <test question>
    A. ... D. ...
    Answer:
and the model's log-likelihood of " A" / " B" / " C" / " D" picks the answer. Reported: accuracy
per subject, micro (over all items; the headline) and macro (mean of the subjects).
``--limit N`` takes the first N items of every subject, as lm-eval does.
"""

from __future__ import annotations

from collections import defaultdict

from sparseek.evals.base import MultipleChoiceTask, mean
from sparseek.evals.data import DataSource

LETTERS = "ABCD"


def normalize(rec: dict, subject: str | None = None) -> dict:
    """Our JSONL / the hub's parquet ({question, subject, choices, answer: int}), or the original
    CSV layout (question, A, B, C, D, answer letter) with the subject passed in."""
    if "choices" in rec:
        choices = list(rec["choices"])
    else:
        choices = [rec[k] for k in ("A", "B", "C", "D")] if "A" in rec else [rec[f"choice{i}"] for i in range(4)]
    ans = rec["answer"]
    ans = LETTERS.index(ans.strip()) if isinstance(ans, str) and ans.strip() in LETTERS else int(ans)
    return {"subject": rec.get("subject") or subject, "question": rec["question"], "choices": choices, "answer": ans}


def csv_dir(src: DataSource, split: str) -> list[dict] | None:
    """The original release's layout: ``<data>/mmlu/<split>/<subject>_<split>.csv`` without a header."""
    import csv

    if src.data_dir is None or src.hub:
        return None
    folder = src.data_dir / "mmlu" / split
    files = sorted(folder.glob(f"*_{split}.csv")) if folder.is_dir() else []
    if not files:
        return None
    out = []
    for f in files:
        subject = f.name[: -len(f"_{split}.csv")]
        with open(f, newline="", encoding="utf-8") as fh:
            for row in csv.reader(fh):
                q, a, b, c, d, ans = row[:6]
                out.append({"subject": subject, "question": q, "choices": [a, b, c, d], "answer": ans})
    src.used[split] = str(folder)
    return out


class MMLU(MultipleChoiceTask):
    name = "mmlu"
    num_fewshot = 5
    headline = "acc"
    metrics = ("acc",)

    def load(self, src: DataSource) -> None:
        hub = ("cais/mmlu", "all")
        test = src.records("test", ("mmlu_test",), hub=(*hub, "test")) or csv_dir(src, "test")
        dev = src.records("dev", ("mmlu_dev",), hub=(*hub, "dev")) or csv_dir(src, "dev")
        if test is None:
            raise src.missing("MMLU test", ("mmlu_test",))
        if dev is None and self.num_fewshot:
            raise src.missing("MMLU dev (few-shot)", ("mmlu_dev",))
        self.docs = [normalize(r) for r in test]
        self.dev = defaultdict(list)
        for r in dev or []:
            d = normalize(r)
            self.dev[d["subject"]].append(d)

    def select(self, limit):
        if limit is None:
            return self.docs
        seen: dict[str, int] = defaultdict(int)
        out = []
        for d in self.docs:
            if seen[d["subject"]] < limit:
                seen[d["subject"]] += 1
                out.append(d)
        return out

    @staticmethod
    def format(doc: dict, with_answer: bool) -> str:
        lines = [doc["question"].strip()] + [f"{L}. {c}" for L, c in zip(LETTERS, doc["choices"])]
        answer = f"Answer: {LETTERS[doc['answer']]}" if with_answer else "Answer:"
        return "\n".join(lines + [answer])

    def context(self, doc: dict) -> str:
        subject = doc["subject"].replace("_", " ")
        header = f"The following are multiple choice questions (with answers) about {subject}.\n\n"
        shots = self.dev.get(doc["subject"], [])[: self.num_fewshot] if self.num_fewshot else []
        if len(shots) < self.num_fewshot:
            raise ValueError(f"mmlu: only {len(shots)} dev items for {doc['subject']}, {self.num_fewshot} needed")
        return header + "".join(self.format(s, True) + "\n\n" for s in shots) + self.format(doc, False)

    def choices(self, doc: dict) -> list[str]:
        return list(LETTERS[: len(doc["choices"])])

    def gold(self, doc: dict) -> int:
        return doc["answer"]

    def score(self, doc, logprobs):
        row = super().score(doc, logprobs)
        row["subject"] = doc["subject"]
        return row

    def aggregate(self, rows):
        by_subject = defaultdict(list)
        for r in rows:
            by_subject[r["subject"]].append(r["acc"])
        per_subject = {s: mean(v) for s, v in sorted(by_subject.items())}
        return {"acc": mean(r["acc"] for r in rows), "acc_micro": mean(r["acc"] for r in rows),
                "acc_macro": mean(per_subject.values()), "subjects": len(per_subject), "per_subject": per_subject}

    def protocol(self):
        return "5-shot (first 5 dev items of the subject), answer-letter log-likelihood"
