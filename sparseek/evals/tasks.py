"""The task registry: ``get_task("gsm8k")``, the article's five benchmarks and the long-context needle test."""

from __future__ import annotations

from sparseek.evals.base import Task
from sparseek.evals.gsm8k import GSM8K
from sparseek.evals.hellaswag import HellaSwag
from sparseek.evals.humaneval import HumanEval
from sparseek.evals.minerva_math import MATH, MATH500
from sparseek.evals.mmlu import MMLU
from sparseek.evals.needle import Needle

TASKS: dict[str, type[Task]] = {t.name: t for t in (MMLU, HumanEval, GSM8K, MATH, MATH500, HellaSwag, Needle)}
ARTICLE_TASKS = ("mmlu", "humaneval", "gsm8k", "math", "hellaswag")


def get_task(name: str, **options) -> Task:
    key = name.strip().lower()
    if key not in TASKS:
        raise ValueError(f"unknown task {name!r}; available: {', '.join(TASKS)}")
    return TASKS[key](**options)
