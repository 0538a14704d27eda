"""``sparseek eval``: the article's benchmark table for any sparseek model, offline.

    sparseek eval --model DIR_OR_PRESET --tasks mmlu,hellaswag,gsm8k,math,humaneval \\
        [--limit N] [--data-dir DIR] [--output results.json]

Wire-up (in sparseek/cli.py): ``from sparseek.evals.cli import add_eval_parser`` then
``add_eval_parser(sub)``; the sub-parser's default ``fn`` is ``run_eval``.
"""

from __future__ import annotations

import argparse
import sys

from sparseek.evals.tasks import ARTICLE_TASKS, TASKS


def add_eval_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("eval", help="benchmarks (MMLU, HumanEval, GSM8K, MATH, HellaSwag, needle), offline",
                              description="Evaluate a checkpoint or preset with the standard protocols and print "
                                          "the article's table.")
    from sparseek.cli import _add_engine_args, _add_model_args

    _add_model_args(p)  # --model/--dtype/--device/--quantize/--lora, as every model verb has them
    _add_engine_args(p)  # --kv-fp8 / --index-fp4 (scores under DeepSeek's runtime rounding), --compile, ...
    p.add_argument("--tasks", "-t", default=",".join(ARTICLE_TASKS),
                   help=f"comma-separated, from {', '.join(TASKS)} (default: the article's five)")
    p.add_argument("--limit", type=int, default=None,
                   help="items per task (MMLU: per subject); for smoke tests, not for reported numbers")
    p.add_argument("--data-dir", default=None,
                   help="folder with the benchmark files (default: $SPARSEEK_EVAL_DATA or shared/data)")
    p.add_argument("--hub", action="store_true", help="load the datasets from the Hugging Face hub (network)")
    p.add_argument("--output", "-o", default=None,
                   help="results JSON path (a Markdown table is written beside it, same name, .md)")
    p.add_argument("--log-samples", action="store_true", help="keep every item's prediction in the JSON")
    p.add_argument("--num-fewshot", type=int, default=None, help="override the standard shot count (all tasks)")
    p.add_argument("--batch-size", type=int, default=16, help="rows per log-likelihood forward")
    p.add_argument("--max-batch-size", type=int, default=8, help="concurrent sequences in generation")
    p.add_argument("--max-seq-len", type=int, default=4096)
    p.add_argument("--max-gen-tokens", type=int, default=None,
                   help="cap generated tokens (default: GSM8K 256, MATH 512, HumanEval 512); for smoke tests")
    p.add_argument("--humaneval-samples", type=int, default=1, help="n samples per problem (pass@k for k <= n)")
    p.add_argument("--temperature", type=float, default=None,
                   help="HumanEval sampling temperature (default: 0 for n=1, else 0.8)")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds per HumanEval program")
    p.add_argument("--context-lengths", default=None,
                   help="needle: comma-separated context lengths in tokens (default: 1K, 4K, 16K, ... below "
                        "--max-seq-len, and the longest that fits)")
    p.add_argument("--depths", default="0,0.25,0.5,0.75,1", help="needle: where the pass key sits (0 = start, 1 = end)")
    p.add_argument("--needle-trials", type=int, default=2, help="needle: pass keys per (length, depth) cell")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(fn=run_eval)
    return p


def build_tasks(a) -> list:
    from sparseek.evals.tasks import get_task

    names = [t.strip() for t in a.tasks.split(",") if t.strip()]
    tasks = []
    for name in names:
        kw = {"seed": a.seed}
        if a.num_fewshot is not None:
            kw["num_fewshot"] = a.num_fewshot
        if name == "humaneval":
            kw.update(n=a.humaneval_samples, temperature=a.temperature, timeout=a.timeout)
        if name == "needle":
            kw.update(lengths=_numbers(a.context_lengths, int, "--context-lengths") if a.context_lengths else None,
                      depths=_numbers(a.depths, float, "--depths"), trials=a.needle_trials)
        task = get_task(name, **kw)
        if a.max_gen_tokens is not None and hasattr(task, "max_tokens"):
            task.max_tokens = a.max_gen_tokens
        tasks.append(task)
    return tasks


def _numbers(text: str, kind, flag: str) -> list:
    try:
        return [kind(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"{flag} takes comma-separated numbers, got {text!r}") from None


def run_eval(a) -> int:
    from sparseek.evals import report
    from sparseek.evals.base import evaluate
    from sparseek.evals.data import DataSource
    from sparseek.evals.model import EngineModel

    tasks = build_tasks(a)  # unknown task names fail before the model loads
    src = DataSource(a.data_dir, hub=a.hub)
    if a.data_dir and not src.data_dir.is_dir():
        raise FileNotFoundError(f"--data-dir {a.data_dir} is not a folder")
    from sparseek.cli import _engine

    # under torchrun the ranks share the routed experts and all run every item; rank 0 reports
    llm = _engine(a, max_batch_size=a.max_batch_size, seed=0)
    progress = not a.no_progress and a.main
    model = EngineModel(llm, batch_size=a.batch_size, progress=progress)
    results = evaluate(model, tasks, limit=a.limit, data=src, progress=progress, log_samples=a.log_samples)
    if not a.main:
        return 0
    results.update(model=a.model, config={k: v for k, v in vars(a).items() if k not in ("fn", "share")},
                   **report.run_info())
    if a.output:
        md = report.write(results, a.output)
        print(f"wrote {a.output}", file=sys.stderr)
    else:
        md = report.to_markdown(results)
    print(md)
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m sparseek.evals.cli ...`` is ``sparseek eval ...``."""
    from sparseek.cli import main as sparseek_main

    return sparseek_main(["eval", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
