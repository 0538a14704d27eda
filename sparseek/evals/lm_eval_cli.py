"""lm-eval's command line with the ``sparseek`` model type registered.

    python -m sparseek.evals.lm_eval_cli --model sparseek --model_args pretrained=DIR \\
        --tasks sparseek_gsm8k_cot --sparseek-data-dir /path/to/data --limit 20

``--sparseek-data-dir DIR`` renders our example task YAMLs (``sparseek/evals/lm_eval_tasks``)
against the benchmark files in DIR into a temporary folder and adds it to ``--include_path``;
every other argument goes to lm-eval unchanged (``lm_eval --help``).
"""

from __future__ import annotations

import sys
import tempfile


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    data_dir = None
    if "--sparseek-data-dir" in argv:
        i = argv.index("--sparseek-data-dir")
        data_dir = argv[i + 1]
        del argv[i:i + 2]
    import sparseek.evals.lm_eval_adapter  # noqa: F401 - registers "sparseek"
    from lm_eval.__main__ import cli_evaluate

    if data_dir is not None:
        from sparseek.evals.lm_eval_tasks import render

        folder = render(tempfile.mkdtemp(prefix="sparseek-lm-eval-tasks-"), data_dir)
        if "--include_path" in argv:
            j = argv.index("--include_path") + 1
            argv[j] = f"{argv[j]}:{folder}"
        else:
            argv += ["--include_path", folder]
    sys.argv = ["lm_eval", *argv]
    cli_evaluate()


if __name__ == "__main__":
    main()
