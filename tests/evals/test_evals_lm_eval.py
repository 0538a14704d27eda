"""The lm-evaluation-harness integration: a registered model type that runs local tasks end to end."""

from __future__ import annotations

import json
import os

import pytest

lm_eval = pytest.importorskip("lm_eval")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from lm_eval.tasks import TaskManager  # noqa: E402

from sparseek.evals.lm_eval_adapter import SparseekLM  # noqa: E402
from sparseek.evals.lm_eval_tasks import TASK_DIR, render  # noqa: E402
from tests.evals.fakes import write_all  # noqa: E402


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_all(str(tmp_path_factory.mktemp("data")))


@pytest.fixture(scope="module")
def lm():
    return SparseekLM(pretrained="debug", max_length=512)


def test_registered():
    from lm_eval.api.registry import get_model

    assert get_model("sparseek") is SparseekLM


def test_shipped_yamls_are_offline(tmp_path, data):
    yamls = sorted(p.name for p in TASK_DIR.glob("*.yaml"))
    assert yamls == ["sparseek_gsm8k_cot.yaml", "sparseek_hellaswag.yaml"]
    for y in TASK_DIR.glob("*.yaml"):
        text = y.read_text()
        assert "dataset_path: json" in text and "@DATA_DIR@" in text
    out = render(tmp_path, data)
    for y in yamls:
        text = open(os.path.join(out, y)).read()
        assert "@DATA_DIR@" not in text and os.path.abspath(data) in text


def local_tasks(tmp_path, data):
    # include_defaults=False: skip indexing lm-eval's ~13k built-in YAMLs (seconds), ours suffice
    return TaskManager(include_path=render(tmp_path / "tasks", data), include_defaults=False)


def test_simple_evaluate_runs_local_tasks(tmp_path, data, lm):
    tm = local_tasks(tmp_path, data)
    res = lm_eval.simple_evaluate(model=lm, tasks=["sparseek_gsm8k_cot", "sparseek_hellaswag"], task_manager=tm,
                                  limit=2, gen_kwargs="max_gen_toks=4", log_samples=True)
    r = res["results"]
    assert set(r) == {"sparseek_gsm8k_cot", "sparseek_hellaswag"}
    assert 0.0 <= r["sparseek_hellaswag"]["acc_norm,none"] <= 1.0
    assert "exact_match,strict-match" in r["sparseek_gsm8k_cot"]
    gsm = res["samples"]["sparseek_gsm8k_cot"][0]
    prompt = gsm["arguments"][0][0]
    assert prompt.startswith("Q: Exemplar question 0?\nA: Reasoning 0. The answer is 0.\n\n")
    assert prompt.count("Q: ") == 9 and prompt.endswith("\nA:") and gsm["target"] == "7"
    hs = res["samples"]["sparseek_hellaswag"][0]
    ctx = hs["arguments"][0][0]
    assert ctx.count("\n\n") == 10 and ctx.endswith("Activity 0: Person 0 does thing 0. Then they")
    assert len(hs["resps"]) == 4  # one log-likelihood per ending


def test_model_by_name(tmp_path, data):
    tm = local_tasks(tmp_path, data)
    res = lm_eval.simple_evaluate(model="sparseek", model_args="pretrained=debug,max_length=256,batch_size=4",
                                  tasks=["sparseek_hellaswag"], task_manager=tm, limit=1)
    assert "sparseek_hellaswag" in res["results"]


def test_rolling_and_until(lm):
    class R:
        def __init__(self, *a):
            self.args = a

    text = "a few words " * 30
    whole = lm.loglikelihood_rolling([R(text)], disable_tqdm=True)[0]
    assert whole < 0
    small = SparseekLM(llm=lm.model.llm)
    small.model.llm.max_seq_len, old = 64, small.model.llm.max_seq_len
    try:
        windowed = small.loglikelihood_rolling([R(text)], disable_tqdm=True)[0]
    finally:
        small.model.llm.max_seq_len = old
    assert windowed < 0 and windowed != whole  # less context per token, every token still scored once
    out = lm.generate_until([R("def f(x):", {"until": ["\n"], "max_gen_toks": 4}),
                             R("x", {"until": "zz", "max_gen_toks": 3, "do_sample": True, "temperature": 0.7,
                                     "seed": 1})], disable_tqdm=True)
    assert len(out) == 2 and "\n" not in out[0]


def test_cli_entry_point(tmp_path, data, monkeypatch):
    from lm_eval.tasks.manager import TaskManager as TM

    from sparseek.evals import lm_eval_cli

    init = TM.__init__
    monkeypatch.setattr(TM, "__init__", lambda self, *a, **k: init(self, *a, **{**k, "include_defaults": False}))

    out_dir = tmp_path / "out"
    lm_eval_cli.main(["--model", "sparseek", "--model_args", "pretrained=debug,max_length=256",
                      "--tasks", "sparseek_hellaswag", "--limit", "1", "--sparseek-data-dir", data,
                      "--output_path", str(out_dir)])
    files = [os.path.join(dp, f) for dp, _, fs in os.walk(out_dir) for f in fs if f.endswith(".json")]
    assert files
    with open(files[0]) as f:
        assert "sparseek_hellaswag" in json.load(f)["results"]


def test_apply_chat_template_for_chat_evaluation(tmp_path, data, lm):
    """lm-eval's --apply_chat_template: few-shot turns in the model's chat format (BOS left to the
    engine), an assistant prefix continued rather than closed; the whole harness runs with it."""
    import copy

    from tests.tokenizer.test_template import R1_STYLE

    turns = [{"role": "user", "content": "Q: 1+1?"}, {"role": "assistant", "content": "A: 2"},
             {"role": "user", "content": "Q: 2+2?"}]
    tok = lm.model.llm.tokenizer
    assert lm.apply_chat_template(turns) == tok.chat_prompt(turns)[0][len(tok.bos_token):]
    assert lm.apply_chat_template(turns).endswith("<｜User｜>Q: 2+2?<｜Assistant｜></think>")
    prefixed = lm.apply_chat_template([*turns, {"role": "assistant", "content": "A:"}], add_generation_prompt=False)
    assert prefixed.endswith("<｜Assistant｜></think>A:")
    assert lm.chat_template() == "deepseek-v4-chat-format"
    r1 = SparseekLM(llm=lm.model.llm)
    r1.model.llm = copy.copy(lm.model.llm)
    r1.model.llm.tokenizer = copy.copy(tok)
    r1.model.llm.tokenizer.chat_template = R1_STYLE
    assert r1.apply_chat_template(turns).endswith("<｜Assistant｜><think>\n") and r1.chat_template() == R1_STYLE
    res = lm_eval.simple_evaluate(model=lm, tasks=["sparseek_hellaswag"], task_manager=local_tasks(tmp_path, data),
                                  limit=2, apply_chat_template=True, log_samples=True)
    ctx = res["samples"]["sparseek_hellaswag"][0]["arguments"]
    assert "<｜User｜>" in str(ctx) and "<｜Assistant｜>" in str(ctx)
