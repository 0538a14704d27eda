"""The needle-in-a-haystack task: items sized in the model's tokens with the pass key at the
asked depth, scored per length and depth; a model that sees only the end of its context finds
only late needles; the CLI runs it on a real engine."""

from __future__ import annotations

import json
import re

import pytest

from sparseek.evals.base import evaluate
from sparseek.evals.cli import main
from sparseek.evals.needle import INTRO, NEEDLE, QUESTION, Needle
from sparseek.tokenizer import default_tokenizer
from tests.evals.fakes import ScriptedGen


class Reader(ScriptedGen):
    """Finds the pass key in the last ``window`` tokens of its prompt (all of them: None)."""

    def __init__(self, tok, max_len, window=None):
        super().__init__(self.read)
        self.tok, self.max_len, self.window = tok, max_len, window

    def read(self, prompt):
        ids = self.tok.encode(prompt)
        seen = self.tok.decode(ids[-self.window:]) if self.window else prompt
        m = re.search(r"The pass key is (\d+)\. Remember it", seen)
        return f" {m.group(1)}." if m else " 12345."


@pytest.fixture(scope="module")
def tok():
    return default_tokenizer(512)


def test_items_are_sized_in_tokens_with_the_needle_at_its_depth(tok):
    task = Needle(lengths=[600, 2000], depths=[0, 0.5, 1], trials=2, seed=3)
    res = evaluate(Reader(tok, 4096), [task], progress=False, log_samples=True)["tasks"]["needle"]
    assert res["metrics"]["exact_match"] == 1.0 and res["n"] == 12
    assert set(res["metrics"]) >= {"exact_match@600", "exact_match@2000@depth0.5"}
    for d in task.docs:
        assert d["length"] - 40 <= d["context_tokens"] <= d["length"]  # the longest haystack that fits
        assert len(tok.encode(d["prompt"])) == d["context_tokens"] and d["prompt"].count(d["key"]) == 2
        intro = len(tok.encode(INTRO))
        filler = d["context_tokens"] - len(tok.encode(INTRO + NEEDLE.format(key=d["key"]) + QUESTION))
        frac = (d["needle_at"] - intro) / filler  # where in the filler the needle sits, by tokens
        assert abs(frac - d["depth"]) < 0.03, (d["depth"], frac)
    assert len({d["key"] for d in task.docs}) > 6  # keys drawn per item
    # the same seed gives the same items
    again = Needle(lengths=[600, 2000], depths=[0, 0.5, 1], trials=2, seed=3)
    again.bind(Reader(tok, 4096))
    again.load(None)
    assert [d["prompt"] for d in again.docs] == [d["prompt"] for d in task.docs]


def test_a_short_sighted_model_finds_only_late_needles(tok):
    """Scores come apart by depth: a model reading only its last 300 tokens finds the key at
    depth 1 and never at depth 0 of a 2,000-token haystack."""
    task = Needle(lengths=[2000], depths=[0, 1], trials=3)
    m = evaluate(Reader(tok, 4096, window=300), [task], progress=False)["tasks"]["needle"]["metrics"]
    assert m["exact_match@2000@depth0"] == 0.0 and m["exact_match@2000@depth1"] == 1.0 and m["exact_match"] == 0.5


def test_contexts_must_fit_the_engine(tok):
    task = Needle(lengths=[5000])
    task.bind(Reader(tok, 4096))
    with pytest.raises(ValueError, match="max-seq-len to at least 5010"):
        task.load(None)
    auto = Needle(trials=1, depths=[0.5])
    auto.bind(Reader(tok, 3000))
    auto.load(None)
    assert auto.lengths == [1024, 2990] and all(d["context_tokens"] <= 2990 for d in auto.docs)
    with pytest.raises(ValueError, match="tokenizer"):
        Needle().load(None)
    with pytest.raises(ValueError, match="depths"):
        Needle(depths=[1.5])


def test_cli_runs_needle_on_the_engine(tmp_path, capsys):
    out = tmp_path / "needle.json"
    assert main(["-m", "debug", "--tasks", "needle", "--context-lengths", "300,500", "--depths", "0,1",
                 "--needle-trials", "1", "--max-seq-len", "520", "--no-progress", "--output", str(out)]) == 0
    res = json.loads(out.read_text())["tasks"]["needle"]
    assert res["n"] == 4 and 0.0 <= res["metrics"]["exact_match"] <= 1.0 and "exact_match@500@depth1" in res["metrics"]
    assert "needle" in capsys.readouterr().out
    assert main(["-m", "debug", "--tasks", "needle", "--context-lengths", "3x"]) == 2
    assert "--context-lengths takes comma-separated numbers" in capsys.readouterr().err
