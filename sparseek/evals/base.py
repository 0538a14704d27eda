"""The shared base of every benchmark, and the runner.

A task only says how to load its items, how to turn one into a prompt (or a context plus
choices), and how to score what came back. The runner does everything else: ``--limit``,
one batched call into the model per task, stop-string trimming, aggregation, timing, and the
record of where the data came from and where the protocol deviates from the standard one.

The model is anything with
    loglikelihood(list[(context, continuation)]) -> list[(logprob, is_greedy)]
    generate(list[prompt], list[SamplingParams]) -> list[str]
(``sparseek.evals.EngineModel`` wraps a ``sparseek.LLM``; tests use hand-made fakes.)
"""

from __future__ import annotations

import inspect
import math
import time
from dataclasses import dataclass

from sparseek.evals.data import DataSource


@dataclass
class Gen:
    """Generation settings of one request (mapped onto ``sparseek.SamplingParams``)."""

    max_tokens: int = 256
    stop: tuple[str, ...] = ()
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None

    def sampling_params(self):
        from sparseek.engine.sampling import SamplingParams

        return SamplingParams(max_tokens=self.max_tokens, stop=list(self.stop), temperature=self.temperature,
                              top_p=self.top_p, seed=self.seed)


class Task:
    name = "task"
    kind = "loglikelihood"  # or "generate"
    num_fewshot = 0
    headline = "acc"  # the metric shown in the table
    metrics: tuple[str, ...] = ("acc",)  # averaged over items by the default aggregate

    def __init__(self, num_fewshot: int | None = None, seed: int = 1234):
        if num_fewshot is not None:
            self.num_fewshot = num_fewshot
        self.seed = seed
        self.docs: list[dict] = []
        self.notes: list[str] = []  # deviations from the standard protocol, shown with the results

    # ---- what a task implements
    def bind(self, model) -> None:
        """See the evaluation model before ``load`` (a task whose items depend on it: its tokenizer
        ``model.tok``, its context ``model.max_len``)."""

    def load(self, src: DataSource) -> None:
        """Fill ``self.docs`` (and whatever few-shot pool the task needs)."""
        raise NotImplementedError

    def select(self, limit: int | None) -> list[dict]:
        return self.docs if limit is None else self.docs[:limit]

    def aggregate(self, rows: list[dict]) -> dict:
        return {m: mean([r[m] for r in rows]) for m in self.metrics}

    def protocol(self) -> str:
        return f"{self.num_fewshot}-shot"


class MultipleChoiceTask(Task):
    """Score every choice by log p(choice | context); the prediction is the argmax."""

    kind = "loglikelihood"
    metrics = ("acc", "acc_norm")
    target_delimiter = " "  # goes between the context and each choice

    def context(self, doc: dict) -> str:
        raise NotImplementedError

    def choices(self, doc: dict) -> list[str]:
        """The choice texts (the continuation is ``target_delimiter + choice``)."""
        raise NotImplementedError

    def gold(self, doc: dict) -> int:
        return int(doc["label"])

    def score(self, doc: dict, logprobs: list[float]) -> dict:
        """acc: argmax of the summed log-likelihood; acc_norm: of the log-likelihood per character
        of the choice text (the usual length normalisation). Ties go to the first choice."""
        gold = self.gold(doc)
        lens = [max(1, len(c)) for c in self.choices(doc)]
        pred = argmax(logprobs)
        pred_norm = argmax([lp / n for lp, n in zip(logprobs, lens)])
        return {"acc": float(pred == gold), "acc_norm": float(pred_norm == gold), "pred": pred,
                "pred_norm": pred_norm, "gold": gold, "logprobs": [round(x, 4) for x in logprobs]}


class GenerationTask(Task):
    """Sample ``n`` completions per item and grade them."""

    kind = "generate"
    metrics = ("exact_match",)
    n = 1

    def prompt(self, doc: dict) -> str:
        raise NotImplementedError

    def gen(self, doc_index: int, sample: int) -> Gen:
        raise NotImplementedError

    def score(self, doc: dict, completions: list[str]) -> dict:
        raise NotImplementedError

    def score_batch(self, docs: list[dict], completions: list[list[str]]) -> list[dict]:
        return [self.score(d, c) for d, c in zip(docs, completions)]


# ---------------------------------------------------------------------- the runner
def run_task(model, task: Task, limit: int | None = None, progress: bool = True) -> dict:
    docs = task.select(limit)
    if not docs:
        raise ValueError(f"{task.name}: no items to evaluate")
    t0 = time.time()
    if task.kind == "loglikelihood":
        reqs, owner, example = [], [], None
        for i, d in enumerate(docs):
            ctx = task.context(d)
            example = example or ctx
            for c in task.choices(d):
                reqs.append((ctx, task.target_delimiter + c))
                owner.append(i)
        lls = _call(model.loglikelihood, reqs, progress)
        per_doc: list[list[float]] = [[] for _ in docs]
        for i, (lp, _greedy) in zip(owner, lls):
            per_doc[i].append(float(lp))
        rows = [task.score(d, lp) for d, lp in zip(docs, per_doc)]
    else:
        prompts, params, owner = [], [], []
        for i, d in enumerate(docs):
            p = task.prompt(d)
            for s in range(task.n):
                prompts.append(p)
                params.append(task.gen(i, s))
                owner.append(i)
        example = prompts[0]
        outs = _call(model.generate, prompts, progress, [g.sampling_params() for g in params])
        texts: list[list[str]] = [[] for _ in docs]
        for i, g, out in zip(owner, params, outs):
            texts[i].append(cut_at_stop(getattr(out, "text", out), g.stop))
        rows = task.score_batch(docs, texts)
    for i, r in enumerate(rows):
        if r.get("doc_id") is None:
            r["doc_id"] = docs[i].get("id") if docs[i].get("id") is not None else i
    metrics = task.aggregate(rows)
    if len(example) > 4000:  # a long-context prompt: its two ends say enough
        example = example[:2000] + f" [... {len(example) - 4000} characters ...] " + example[-2000:]
    return {"metrics": metrics, "headline": task.headline, "n": len(docs), "num_fewshot": task.num_fewshot,
            "protocol": task.protocol(), "limit": limit, "notes": list(task.notes),
            "seconds": round(time.time() - t0, 2), "example_prompt": example, "samples": rows}


def _call(fn, reqs, progress, params=None):
    args = (reqs,) if params is None else (reqs, params)
    try:
        takes_progress = "progress" in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        takes_progress = False
    return fn(*args, progress=progress) if takes_progress else fn(*args)


def evaluate(model, tasks, limit: int | None = None, data: DataSource | None = None, progress: bool = True,
             log_samples: bool = False) -> dict:
    """Run tasks (names or Task objects) and return the results dict (see ``report.to_markdown``)."""
    from sparseek.evals.model import as_eval_model
    from sparseek.evals.tasks import get_task

    model = as_eval_model(model, progress=progress)
    data = data or DataSource()
    results = {"tasks": {}, "data_dir": str(data.data_dir) if data.data_dir else None}
    for t in tasks:
        task = get_task(t) if isinstance(t, str) else t
        data.used = {}
        task.bind(model)
        if not task.docs:
            task.load(data)
        res = run_task(model, task, limit=limit, progress=progress)
        res["data"] = dict(data.used)  # where this task's splits came from
        if not log_samples:
            res.pop("samples")
        results["tasks"][task.name] = res
    return results


# ---------------------------------------------------------------------- helpers
def cut_at_stop(text: str, stops) -> str:
    cut = len(text)
    for s in stops or ():
        j = text.find(s)
        if j != -1:
            cut = min(cut, j)
    return text[:cut]


def argmax(xs) -> int:
    best = 0
    for i, x in enumerate(xs):
        if x > xs[best]:
            best = i
    return best


def mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else math.nan
