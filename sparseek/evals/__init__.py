"""Benchmarks with the standard protocols, offline: MMLU, HellaSwag, GSM8K, MATH, HumanEval.

    from sparseek.evals import evaluate, EngineModel, to_markdown
    results = evaluate(sparseek.LLM("path/to/ckpt"), ["gsm8k", "mmlu"], limit=50)
    print(to_markdown(results))

One small module per task on a shared base (``base.py``); data loaders in ``data.py``; the
sandbox for generated code in ``sandbox.py``; the lm-evaluation-harness model in
``lm_eval_adapter.py``; ``sparseek eval`` in ``cli.py``.
"""

from sparseek.evals.base import Gen, GenerationTask, MultipleChoiceTask, Task, evaluate, run_task
from sparseek.evals.data import DataNotFound, DataSource, read_records
from sparseek.evals.model import EngineModel
from sparseek.evals.report import to_markdown
from sparseek.evals.tasks import ARTICLE_TASKS, TASKS, get_task

__all__ = ["evaluate", "run_task", "Task", "MultipleChoiceTask", "GenerationTask", "Gen", "DataSource",
           "DataNotFound", "read_records", "EngineModel", "to_markdown", "TASKS", "ARTICLE_TASKS", "get_task"]
