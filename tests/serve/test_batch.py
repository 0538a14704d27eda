"""``sparseek run-batch``: OpenAI's batch file format run offline -- every result in the input's
order under its custom_id, bodies equal what the server answers, bad requests answered with the
server's 400, lines that are no requests reported without stopping the rest."""

from __future__ import annotations

import json

import pytest

from sparseek.engine import LLM, SamplingParams
from sparseek.serve import batch
from sparseek.serve.batch import run_batch

pytest.importorskip("httpx")

BAN = {str(i): -100 for i in range(16)}  # no special tokens: completions run to their length


def _lines(tmp_path, rows) -> str:
    path = tmp_path / "in.jsonl"
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n\n")
    return str(path)


def test_batch_file_runs_through_the_server(model, tok, tmp_path):
    llm = LLM(model, tok, max_batch_size=2, max_seq_len=256)
    rows = [
        {"custom_id": "c1", "method": "POST", "url": "/v1/completions",
         "body": {"prompt": "def f(", "max_tokens": 6, "temperature": 0, "logit_bias": BAN}},
        {"custom_id": "chat", "method": "POST", "url": "/v1/chat/completions",
         "body": {"model": "dbg", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5,
                  "temperature": 0, "logit_bias": BAN}},
        {"custom_id": "bad", "method": "POST", "url": "/v1/completions", "body": {"prompt": "x", "max_tokens": -1}},
        "{not json",
        {"custom_id": "s", "method": "POST", "url": "/v1/completions", "body": {"prompt": "x", "stream": True}},
        {"custom_id": "u", "method": "POST", "url": "/v1/embeddings", "body": {"input": "x"}},
        {"custom_id": "c2", "method": "POST", "url": "/v1/completions",
         "body": {"prompt": "import os\n", "max_tokens": 9, "temperature": 0, "logit_bias": BAN}},
    ]
    out = tmp_path / "out.jsonl"
    res = run_batch(llm, _lines(tmp_path, rows), str(out), model_name="dbg", progress=False)
    assert res == {"requests": 7, "succeeded": 3, "failed": 1, "invalid": 3, "resumed": 0}
    assert not (tmp_path / "out.jsonl.partial").exists()  # the journal goes once the output is whole
    got = [json.loads(x) for x in out.read_text().splitlines()]
    assert [g["custom_id"] for g in got] == ["c1", "chat", "bad", None, "s", "u", "c2"]  # the input's order
    assert len({g["id"] for g in got}) == 7
    bias = {int(k): v for k, v in BAN.items()}
    for i, prompt, n in ((0, "def f(", 6), (6, "import os\n", 9)):
        body = got[i]["response"]["body"]
        assert got[i]["response"]["status_code"] == 200 and got[i]["error"] is None
        want = llm.generate([prompt], SamplingParams(max_tokens=n, temperature=0, logit_bias=bias))[0]
        assert body["choices"][0]["text"] == want.text and body["usage"]["completion_tokens"] == n
    assert got[1]["response"]["body"]["object"] == "chat.completion"
    assert got[2]["response"]["status_code"] == 400 and "max_tokens" in json.dumps(got[2]["response"]["body"])
    assert got[3]["response"] is None and got[3]["error"]["code"] == "invalid_json"
    assert "stream" in got[4]["error"]["message"] and got[5]["error"]["code"] == "invalid_url"


def test_cli_run_batch_writes_results(model, tok, tmp_path, capsys):
    import sparseek
    from sparseek.cli import main

    sparseek.save(model, tmp_path / "m", tokenizer=tok)
    rows = [{"custom_id": f"r{i}", "url": "/v1/completions",
             "body": {"prompt": f"x = {i}", "max_tokens": 3, "temperature": 0, "logit_bias": BAN}} for i in range(3)]
    out = tmp_path / "out.jsonl"
    assert main(["run-batch", "-m", str(tmp_path / "m"), "--dtype", "float32", "-i", _lines(tmp_path, rows),
                 "-o", str(out), "--max-batch-size", "2"]) == 0
    got = [json.loads(x) for x in out.read_text().splitlines()]
    assert [g["response"]["status_code"] for g in got] == [200] * 3
    assert [g["response"]["body"]["usage"]["completion_tokens"] for g in got] == [3] * 3
    assert "3 requests: 3 succeeded" in capsys.readouterr().err
    (tmp_path / "out.jsonl.partial").write_text("{}\n")  # an interrupted run's journal: named, kept
    assert main(["run-batch", "-m", str(tmp_path / "m"), "-i", str(tmp_path / "in.jsonl"), "-o", str(out)]) == 2
    assert "out.jsonl.partial" in capsys.readouterr().err and (tmp_path / "out.jsonl.partial").exists()


class Crash(Exception):
    pass


def test_interrupted_batch_keeps_its_results_and_resumes(model, tok, tmp_path, monkeypatch):
    """A run that dies keeps every result it finished in OUTPUT.partial; --resume runs only the rest
    (and the ones that met a server error), tolerates a torn last line, refuses another input's
    journal, and ends with the output an uninterrupted run writes."""
    llm = LLM(model, tok, max_batch_size=2, max_seq_len=256)
    rows = [{"custom_id": f"r{i}", "url": "/v1/completions",
             "body": {"prompt": f"x = {i}", "max_tokens": 3 + i % 3, "temperature": 0, "logit_bias": BAN}}
            for i in range(6)]
    rows.insert(2, "{not json")
    src = _lines(tmp_path, rows)
    whole = tmp_path / "whole.jsonl"
    run_batch(llm, src, str(whole), model_name="dbg", progress=False)

    out, journal = tmp_path / "out.jsonl", tmp_path / "out.jsonl.partial"
    add, calls = batch._Journal.add, []

    def dies_after_3(self, i, result):
        calls.append(i)
        if len(calls) > 3:
            raise Crash("killed")
        add(self, i, result)

    monkeypatch.setattr(batch._Journal, "add", dies_after_3)
    with pytest.raises(Crash):
        run_batch(llm, src, str(out), model_name="dbg", progress=False)
    monkeypatch.setattr(batch._Journal, "add", add)
    assert not out.exists()
    entries = [json.loads(x) for x in journal.read_text().splitlines()[1:]]
    kept = [e["line"] for e in entries]
    assert len(kept) == 3 and len(set(kept)) == 3

    with pytest.raises(ValueError, match="--resume"):  # an interrupted run's results are never discarded
        run_batch(llm, src, str(out), model_name="dbg", progress=False)

    # one kept result met a server error (rerun), and the process died mid-write (a torn line)
    lines = journal.read_text().splitlines(keepends=True)
    e = json.loads(lines[1])
    if e["result"]["response"] is not None:
        e["result"]["response"]["status_code"] = 503
        lines[1] = json.dumps(e) + "\n"
        retried = 1
    else:
        retried = 0
    journal.write_text("".join(lines) + '{"line": 6, "resu')

    parsed = []
    parse = batch._parse
    monkeypatch.setattr(batch, "_parse", lambda line: (parsed.append(line), parse(line))[1])
    res = run_batch(llm, src, str(out), model_name="dbg", progress=False, resume=True)
    assert len(parsed) == 7 - 3 + retried  # only what the journal lacked ran
    assert res == {"requests": 7, "succeeded": 6, "failed": 0, "invalid": 1, "resumed": 3 - retried}
    assert not journal.exists()

    def strip(r):  # ids are fresh per run; the rest must agree
        return r["custom_id"], r["error"], r["response"] and (r["response"]["status_code"],
                                                               r["response"]["body"]["choices"])
    got = [strip(json.loads(x)) for x in out.read_text().splitlines()]
    assert got == [strip(json.loads(x)) for x in whole.read_text().splitlines()]

    # a journal written for another input is refused by name
    monkeypatch.setattr(batch._Journal, "add", dies_after_3)
    with pytest.raises(Crash):
        run_batch(llm, src, str(out), model_name="dbg", progress=False)
    with open(src, "a") as f:
        f.write(json.dumps(rows[0]) + "\n")
    with pytest.raises(ValueError, match="another input"):
        run_batch(llm, src, str(out), model_name="dbg", progress=False, resume=True)
