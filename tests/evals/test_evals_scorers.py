"""Each scorer on hand-made items with known answers: an oracle scores 100%, a constant model chance."""

from __future__ import annotations

import pytest

from sparseek.evals import DataSource, get_task, run_task
from sparseek.evals.base import MultipleChoiceTask, cut_at_stop
from sparseek.evals.hellaswag import capitalize_last_segment, clean
from tests.evals.fakes import (GSM8K_ITEMS, GSM8K_REPLIES, MATH_ITEMS, MATH_REPLIES, ConstantMC, OracleMC,
                               ScriptedGen, hellaswag_items, write_all, write_jsonl)


@pytest.fixture
def data(tmp_path):
    return DataSource(write_all(str(tmp_path)))


def loaded(name, data, **kw):
    t = get_task(name, **kw)
    t.load(data)
    return t


def last_block(ctx: str) -> str:
    return ctx.rsplit("\n\n", 1)[-1]


# ---------------------------------------------------------------------- MMLU
def mmlu_oracle(task, known=None):
    table = {d["question"]: " " + "ABCD"[d["answer"]] for d in task.docs
             if known is None or d["subject"] in known}
    return OracleMC(lambda ctx: table.get(last_block(ctx).split("\n")[0]))


def test_mmlu_oracle_and_chance(data):
    t = loaded("mmlu", data)
    res = run_task(mmlu_oracle(t), t, progress=False)
    assert res["metrics"]["acc"] == 1.0 and res["metrics"]["acc_macro"] == 1.0
    assert res["metrics"]["per_subject"] == {"astronomy": 1.0, "high_school_physics": 1.0}
    res = run_task(ConstantMC(), t, progress=False)  # always "A"; the golds are balanced over A-D
    assert res["metrics"]["acc"] == 0.25


def test_mmlu_macro_vs_micro_and_limit(data):
    t = loaded("mmlu", data)
    t.docs = [d for d in t.docs if d["subject"] == "astronomy"] + \
        [d for d in t.docs if d["subject"] == "high_school_physics"][:2]
    m = run_task(mmlu_oracle(t, known={"astronomy"}), t, progress=False)["metrics"]
    assert m["acc_micro"] == pytest.approx(4 / 6) and m["acc_macro"] == pytest.approx(0.5)
    assert m["per_subject"] == {"astronomy": 1.0, "high_school_physics": 0.0}
    assert len(t.select(1)) == 2  # --limit counts per subject


def test_mmlu_prompt_layout(data):
    t = loaded("mmlu", data, num_fewshot=2)
    doc = t.docs[0]
    want = ("The following are multiple choice questions (with answers) about astronomy.\n\n"
            "astronomy dev 0?\nA. w\nB. x\nC. y\nD. z\nAnswer: A\n\n"
            "astronomy dev 1?\nA. w\nB. x\nC. y\nD. z\nAnswer: B\n\n"
            "astronomy question 0: which is right?\nA. opt00\nB. opt01\nC. opt02\nD. opt03\nAnswer:")
    assert t.context(doc) == want
    assert t.choices(doc) == ["A", "B", "C", "D"] and t.target_delimiter == " "
    assert get_task("mmlu").num_fewshot == 5


# ---------------------------------------------------------------------- HellaSwag
def hellaswag_oracle(task):
    table = {d["query"]: " " + d["endings"][d["label"]] for d in task.docs}
    return OracleMC(lambda ctx: table.get(last_block(ctx)))


def test_hellaswag_oracle_chance_and_heldout_exemplars(tmp_path):
    write_jsonl(str(tmp_path / "hellaswag_val.jsonl"), hellaswag_items(32))
    t = loaded("hellaswag", DataSource(tmp_path))
    assert len(t.docs) == 22 and len(t.pool) == 10
    assert t.notes and "held out" in t.notes[0]
    scored = {d["id"] for d in t.docs}
    assert not scored & {d["id"] for d in t.pool}
    ctx = t.context(t.docs[0])
    assert ctx.count("\n\n") == 10 and last_block(ctx) == t.docs[0]["query"]
    res = run_task(hellaswag_oracle(t), t, progress=False)
    assert res["metrics"] == {"acc": 1.0, "acc_norm": 1.0}
    assert res["notes"] == t.notes

    t0 = loaded("hellaswag", DataSource(tmp_path), num_fewshot=0)  # all 32, golds balanced
    assert len(t0.docs) == 32 and t0.context(t0.docs[0]) == t0.docs[0]["query"]
    assert run_task(ConstantMC(), t0, progress=False)["metrics"] == {"acc": 0.25, "acc_norm": 0.25}


def test_hellaswag_text_preprocessing():
    assert clean("How to x [title] Do it. [step] Now  go") == "How to x. Do it. Now go"
    assert capitalize_last_segment("A man sits on a roof. he") == "A man sits on a roof. He"
    assert capitalize_last_segment("Intro. The man") == "Intro. The man"
    t = get_task("hellaswag")
    from sparseek.evals.hellaswag import normalize

    # the original / hub schema keeps ctx_a and ctx_b: capitalize ctx_b as the standard prompt does
    d = normalize({"ind": 4, "activity_label": "Roof", "ctx_a": "A man is on a roof.", "ctx_b": "he",
                   "ctx": "unused", "endings": ["a", "b", "c", "d"], "label": "3"}, 0)
    assert d["query"] == "Roof: A man is on a roof. He" and d["label"] == 3 and d["id"] == 4
    assert t.choices(d) == ["a", "b", "c", "d"]


def test_length_normalisation_separates_acc_and_acc_norm():
    class Two(MultipleChoiceTask):
        def choices(self, doc):
            return ["abcde", "abcdefghijkl"]

    row = Two().score({"label": 1}, [-10.0, -12.0])  # per char: -2.0 vs -1.0
    assert (row["acc"], row["acc_norm"]) == (0.0, 1.0)


# ---------------------------------------------------------------------- GSM8K
def question_of(prompt: str) -> str:
    return prompt.rsplit("Q: ", 1)[-1].rsplit("\nA:", 1)[0]


def test_gsm8k_oracle_and_constant(data):
    t = loaded("gsm8k", data)
    replies = {d["question"]: r + "\n\nQ: a question the model made up\nA: 99"
               for d, r in zip(GSM8K_ITEMS, GSM8K_REPLIES)}
    model = ScriptedGen(lambda p: replies[question_of(p)])
    res = run_task(model, t, progress=False)
    assert res["metrics"] == {"exact_match": 1.0, "exact_match_strict": 1.0}
    p = model.prompts[0]
    assert p.startswith("Q: Exemplar question 0?\nA: Reasoning 0. The answer is 0.\n\nQ: Exemplar question 1?")
    assert p.endswith(f"Q: {GSM8K_ITEMS[0]['question']}\nA:") and p.count("Q: ") == 9
    assert model.params[0].temperature == 0 and "\n\n" in model.params[0].stop
    res = run_task(ScriptedGen(lambda p: " I think 1 + 1 = 0. The answer is 0."), t, progress=False)
    assert res["metrics"]["exact_match"] == 0.0


@pytest.mark.parametrize("text,want", [
    ("So the total is $1,234.50.", "1234.5"),
    ("The answer is 12.", "12"),
    ("#### 12", "12"),
    ("She is left with -7 dollars. The answer is -7.", "-7"),
    ("The answer is −3.", "-3"),
    ("It went from 10-5 to 5", "5"),
    ("The answer is $0.50", "0.5"),
    ("The answer is 7.\n\nQ: ... The answer is 9.", "9"),
    ("no number here", None),
])
def test_gsm8k_extraction(text, want):
    from sparseek.evals.gsm8k import extract_answer

    assert extract_answer(text) == want


def test_gsm8k_strict_and_equivalences():
    from sparseek.evals.gsm8k import extract_answer, normalize_number

    assert extract_answer("#### 12") == extract_answer("The answer is 12.") == normalize_number("12")
    assert extract_answer("I get 12", strict=True) is None
    assert normalize_number("$1,234.50") == normalize_number("1234.5") == "1234.5"
    assert normalize_number("-0012.000") == "-12" and normalize_number("-0") == "0"


def test_gsm8k_without_exemplars_uses_held_out_items(tmp_path):
    write_jsonl(str(tmp_path / "gsm8k_test.jsonl"), GSM8K_ITEMS * 3)
    t = loaded("gsm8k", DataSource(tmp_path))
    assert len(t.docs) == 4 and len(t.shots) == 8 and t.notes
    assert t.shots[0]["answer"] == "3+4=7 The answer is 7."


# ---------------------------------------------------------------------- MATH
def problem_of(prompt: str) -> str:
    return prompt.rsplit("Problem:\n", 1)[-1].rsplit("\n\nSolution:", 1)[0]


@pytest.mark.parametrize("style", ["minerva", "boxed"])
def test_math_oracle_and_constant(data, style):
    t = loaded("math", data)
    reps = dict(zip((d["problem"] for d in MATH_ITEMS), MATH_REPLIES))

    def reply(p):
        a = reps[problem_of(p)]
        if style == "boxed":
            return f" Work... so the result is $\\boxed{{{a.strip('$')}}}$.\n\nProblem:\nnext"
        return f" Work.\nFinal Answer: The final answer is {a}. I hope it is correct.\n\nProblem:\nnext"

    model = ScriptedGen(reply)
    res = run_task(model, t, progress=False)
    assert res["metrics"]["exact_match"] == 1.0, res
    assert model.prompts[0].startswith("Problem:\nExemplar 0?\n\nSolution: Easy. Final Answer:")
    assert model.prompts[0].endswith(f"Problem:\n{MATH_ITEMS[0]['problem']}\n\nSolution:")
    res = run_task(ScriptedGen(lambda p: " Final Answer: The final answer is $7$. I hope it is correct."), t,
                   progress=False)
    assert res["metrics"]["exact_match"] == 0.0


def test_cut_at_stop():
    assert cut_at_stop("a\n\nQ: b", ["Q:", "\n\n"]) == "a"
    assert cut_at_stop("abc", []) == "abc"
