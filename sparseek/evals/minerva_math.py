"""MATH (Hendrycks et al. 2021): competition problems, 4-shot with the Minerva prompt, greedy.

Prompt (Lewkowycz et al. 2022): four solved problems, each
``Problem:\\n<problem>\\n\\nSolution: <solution ending "Final Answer: The final answer is X. I hope
it is correct.">``, separated by blank lines, then ``Problem:\\n<problem>\\n\\nSolution:``.
Generation stops at the next ``Problem:``. The answer is Minerva's "final answer" sentence (else
the last ``\\boxed{}``), graded against the reference with ``math_equiv.is_equiv``.
``math`` is the full 5000-problem test set; ``math500`` the MATH-500 subset.
"""

from __future__ import annotations

from collections import defaultdict

from sparseek.evals.base import Gen, GenerationTask, mean
from sparseek.evals.data import DataSource
from sparseek.evals.math_equiv import extract_answer, is_equiv, last_boxed


def normalize(rec: dict) -> dict:
    """Our JSONL / PRM800K ({problem, solution, answer, subject, level}) or the original / hub files
    ({problem, solution, type, level: "Level 3"}) whose answer is the solution's last \\boxed{}."""
    answer = rec.get("answer") or last_boxed(rec["solution"]) or ""
    level = rec.get("level")
    if isinstance(level, str) and level.startswith("Level "):
        level = level[6:]
    return {"id": rec.get("unique_id"), "problem": rec["problem"], "solution": rec.get("solution", ""),
            "answer": answer, "subject": rec.get("subject") or rec.get("type"), "level": level}


def as_exemplar(doc: dict) -> dict:
    sol = doc["solution"].strip()
    return {"problem": doc["problem"],
            "solution": f"{sol}\nFinal Answer: The final answer is ${doc['answer']}$. I hope it is correct."}


class MATH(GenerationTask):
    name = "math"
    num_fewshot = 4
    headline = "exact_match"
    metrics = ("exact_match",)
    stems = ("math_test",)
    hub = ("EleutherAI/hendrycks_math", None, "test")  # one config per subject upstream: see load()
    stop = ("Problem:",)
    max_tokens = 512

    def load(self, src: DataSource) -> None:
        test = self._hub_test(src) if src.hub else src.local("test", *self.stems)
        if test is None:
            raise src.missing(f"{self.name} test", self.stems)
        self.docs = [normalize(r) for r in test]
        self.shots = []
        if not self.num_fewshot:
            return
        shots = src.local("fewshot", "math_fewshot_minerva4")
        if shots is not None:
            self.shots = [{"problem": r["problem"], "solution": r["solution"]} for r in shots][: self.num_fewshot]
        else:
            held, self.docs = self.docs[: self.num_fewshot], self.docs[self.num_fewshot:]
            self.shots = [as_exemplar(d) for d in held]
            self.notes.append(f"no Minerva exemplars file: the first {self.num_fewshot} test problems, with a "
                              "'Final Answer' line appended, are the exemplars and are not scored")

    def _hub_test(self, src: DataSource) -> list[dict]:
        if self.name == "math500":
            return src.from_hub("test", "HuggingFaceH4/MATH-500", None, "test")
        subjects = ("algebra", "counting_and_probability", "geometry", "intermediate_algebra", "number_theory",
                    "prealgebra", "precalculus")
        return [r for s in subjects for r in src.from_hub(f"test/{s}", "EleutherAI/hendrycks_math", s, "test")]

    def prompt(self, doc: dict) -> str:
        shots = "".join(f"Problem:\n{s['problem']}\n\nSolution: {s['solution']}\n\n" for s in self.shots)
        return f"{shots}Problem:\n{doc['problem']}\n\nSolution:"

    def gen(self, doc_index: int, sample: int) -> Gen:
        return Gen(max_tokens=self.max_tokens, stop=self.stop)

    def score(self, doc: dict, completions: list[str]) -> dict:
        pred = extract_answer(completions[0])
        return {"exact_match": float(is_equiv(pred, doc["answer"])), "pred": pred, "gold": doc["answer"],
                "subject": doc["subject"], "completion": completions[0]}

    def aggregate(self, rows):
        by = defaultdict(list)
        for r in rows:
            by[r.get("subject") or "?"].append(r["exact_match"])
        return {"exact_match": mean(r["exact_match"] for r in rows),
                "per_subject": {k: mean(v) for k, v in sorted(by.items())}}

    def protocol(self):
        return f"{self.num_fewshot}-shot Minerva prompt, greedy, answer equivalence (sympy)"


class MATH500(MATH):
    name = "math500"
    stems = ("math500_test",)
