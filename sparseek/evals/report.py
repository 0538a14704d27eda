"""Results as JSON and as the article's table (with its published figures as reference columns)."""

from __future__ import annotations

import json
import math
import os
import platform
import time

REFERENCE_MODELS = ("DeepSeek V4", "GPT-4o", "Claude 3.5 Sonnet", "Llama 3 70B")
# benchmark row -> (label, the task whose headline metric fills it, the article's figures)
ARTICLE = (
    ("MMLU", "mmlu", "5-shot", (89.2, 88.7, 88.3, 82.0)),
    ("HumanEval", "humaneval", "pass@1", (92.1, 90.2, 92.0, 81.7)),
    ("GSM8K", "gsm8k", "8-shot", (96.5, 95.8, 96.0, 93.0)),
    ("MATH", "math", "4-shot", (76.8, 76.6, 71.1, 50.4)),
    ("HellaSwag", "hellaswag", "10-shot", (87.3, 87.1, 86.9, 83.8)),
)


def headline(task_result: dict) -> float | None:
    v = task_result["metrics"].get(task_result["headline"])
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else 100.0 * v


def to_markdown(results: dict, model_name: str | None = None) -> str:
    name = model_name or os.path.basename(str(results.get("model", "sparseek")).rstrip("/")) or "sparseek"
    tasks = results["tasks"]
    head = ["Benchmark", name, *REFERENCE_MODELS]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    notes = []
    for label, key, setting, refs in ARTICLE:
        res = tasks.get(key) or (tasks.get("math500") if key == "math" else None)
        ours = "—"
        if res is not None:
            v = headline(res)
            ours = "—" if v is None else f"{v:.1f}"
            mark = []
            if res.get("limit") is not None or res.get("notes"):
                mark.append("*")
            if key == "math" and "math" not in tasks:
                mark.append(" (MATH-500)")
            ours += "".join(mark)
        lines.append(f"| {label} ({setting}) | {ours} | " + " | ".join(f"{r:.1f}" for r in refs) + " |")
    extra = [k for k in tasks if k not in {a[1] for a in ARTICLE} and not (k == "math500" and "math" not in tasks)]
    for k in extra:
        v = headline(tasks[k])
        cell = "—" if v is None else f"{v:.1f}"
        lines.append(f"| {k} | {cell} | " + " | ".join("" for _ in REFERENCE_MODELS) + " |")
    for key, res in tasks.items():
        bits = [f"{res['headline']} on n={res['n']}", res.get("protocol", "")]
        if res.get("limit") is not None:
            bits.append(f"--limit {res['limit']}")
        notes.append(f"- {key}: " + "; ".join(b for b in bits if b) + "".join(f"\n  - deviation: {d}"
                                                                               for d in res.get("notes", [])))
    out = "\n".join(lines)
    out += "\n\nScores in %. Reference columns: the article's published figures. * = subset or protocol deviation.\n"
    return out + "\n".join(notes) + "\n"


def write(results: dict, path: str, markdown_path: str | None = None) -> str:
    """Write the results JSON (and the Markdown table beside it); returns the Markdown."""
    md = to_markdown(results)
    results = dict(results, table=md)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(results, f, indent=2, ensure_ascii=False, default=str)
    md_path = markdown_path or os.path.splitext(path)[0] + ".md"
    with open(md_path, "w", encoding="utf-8") as f:
        f.write(md)
    return md


def run_info() -> dict:
    import sparseek

    return {"sparseek_version": sparseek.__version__, "python": platform.python_version(),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
