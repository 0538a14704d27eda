"""Example lm-eval task YAMLs that read local files (``dataset_path: json``), never the hub.

The YAMLs name their files as ``@DATA_DIR@/<file>``; ``render(dest, data_dir)`` writes copies with
the real folder filled in, ready for ``TaskManager(include_path=dest)`` or ``--include_path``.
Tasks: ``sparseek_gsm8k_cot`` (8-shot CoT, generation) and ``sparseek_hellaswag`` (10-shot,
multiple choice; exemplars from the validation split, excluding the item itself).
"""

from __future__ import annotations

import os
from pathlib import Path

TASK_DIR = Path(__file__).resolve().parent
PLACEHOLDER = "@DATA_DIR@"


def render(dest: str | os.PathLike, data_dir: str | os.PathLike) -> str:
    data = Path(data_dir).resolve()
    if not data.is_dir():
        raise FileNotFoundError(f"{data_dir} is not a folder")
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    for y in sorted(TASK_DIR.glob("*.yaml")):
        (dest / y.name).write_text(y.read_text(encoding="utf-8").replace(PLACEHOLDER, data.as_posix()),
                                   encoding="utf-8")
    return str(dest)


def hellaswag_process_docs(dataset):
    """Our HellaSwag files -> lm-eval's fields: ``query`` (cleaned, last context segment capitalized),
    ``choices`` (cleaned endings), ``gold`` (int)."""
    from sparseek.evals.hellaswag import normalize

    def one(doc, i):
        d = normalize(doc, i)
        return {"query": d["query"], "choices": d["endings"], "gold": d["label"]}

    return dataset.map(one, with_indices=True)
