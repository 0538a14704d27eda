"""Tests for the training data pipeline (sparseek.train.data): sources, prepare, TokenDataset."""

from __future__ import annotations

import gzip
import json
import os
import random
import sys
import time
import types

import numpy as np
import pytest
import torch

from sparseek.tokenizer import Tokenizer, stdlib_texts
from sparseek.train import data
from sparseek.train.data import TokenDataset, iter_texts, prepare, token_dtype

WORDS = ("def class return import lambda yield self value index token window expert router attention "
         "cache prefill decode shard memory déjà vu naïve 数据 模型 🙂 λx.x+1 {} [] () : = ->").split()


def make_docs(n: int, seed: int = 0) -> list[str]:
    """Deterministic documents of varied length, with multi-byte UTF-8 and newlines."""
    rng = random.Random(seed)
    docs = []
    for i in range(n):
        lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 12))) for _ in range(rng.randint(1, 8))]
        docs.append(f"# doc {i}\n" + "\n".join(lines) + ("\n" if i % 2 else ""))
    return docs


def write_jsonl(path, docs, field="text"):
    with open(path, "w", encoding="utf-8") as f:
        for i, d in enumerate(docs):
            f.write(json.dumps({"id": i, field: d}, ensure_ascii=False) + "\n")


def split_docs(ds_dir, split, tok: Tokenizer) -> list[str]:
    """Decode a split back into its documents, checking every one is exactly BOS ... EOS."""
    meta = json.load(open(os.path.join(ds_dir, "meta.json")))
    ids = np.fromfile(os.path.join(ds_dir, f"{split}.bin"), dtype=np.dtype(meta["dtype"]).newbyteorder("<"))
    assert len(ids) == meta["splits"][split]["n_tokens"]
    starts = np.flatnonzero(ids == tok.bos_id)
    assert len(starts) and starts[0] == 0
    out = []
    for a, b in zip(starts, list(starts[1:]) + [len(ids)]):
        doc = ids[a:b]
        assert doc[-1] == tok.eos_id and tok.eos_id not in doc[1:-1] and tok.bos_id not in doc[1:]
        out.append(tok.decode(doc[1:-1].tolist()))
    assert len(out) == meta["splits"][split]["n_docs"]
    return out


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    docs = make_docs(60)
    write_jsonl(root / "docs.jsonl", docs)
    return root, docs


@pytest.fixture(scope="module")
def prepared(corpus, tmp_path_factory):
    root, docs = corpus
    out = tmp_path_factory.mktemp("prepared")
    meta = prepare([str(root / "docs.jsonl")], str(out), 400, val_fraction=0.2, seed=0)
    return str(out), meta, docs


# ---------------------------------------------------------------------------------------------- sources
def test_sources_file_folder_glob(tmp_path):
    (tmp_path / "a.txt").write_text("alpha text", encoding="utf-8")
    sub = tmp_path / "sub"
    sub.mkdir()
    (sub / "b.md").write_text("# beta", encoding="utf-8")
    (sub / "c.py").write_text("x = 'gamma'\n", encoding="utf-8")
    (sub / "empty.txt").write_text("", encoding="utf-8")  # empty documents are skipped
    (sub / "image.png").write_bytes(b"\x89PNG\x00\xff")  # not text-like: a folder walk ignores it
    (sub / "config.json").write_text('{"not": "a dataset"}', encoding="utf-8")  # .json: explicit only
    (tmp_path / ".hidden").mkdir()
    (tmp_path / ".hidden" / "h.txt").write_text("hidden", encoding="utf-8")
    write_jsonl(sub / "d.jsonl", ["delta one", "delta two"])

    assert list(iter_texts([str(tmp_path / "a.txt")])) == ["alpha text"]
    assert list(iter_texts(str(tmp_path / "a.txt"))) == ["alpha text"]  # a single string is one source
    # folder: recursive, sorted by path, records of JSONL files expanded
    assert list(iter_texts([str(tmp_path)])) == ["alpha text", "# beta", "x = 'gamma'\n", "delta one", "delta two"]
    assert list(iter_texts([str(tmp_path / "**" / "*.md"), str(tmp_path / "*.txt")])) == ["# beta", "alpha text"]
    # deterministic: the same sources give the same documents in the same order
    assert list(iter_texts([str(tmp_path)])) == list(iter_texts([str(tmp_path)]))


def test_sources_json_kinds_custom_field(tmp_path):
    docs = ["first ✓", "second\nline", "third"]
    write_jsonl(tmp_path / "x.jsonl", docs, field="content")
    with gzip.open(tmp_path / "y.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write("\n".join(json.dumps({"content": d}) for d in docs) + "\n\n")
    (tmp_path / "z.json").write_text(json.dumps([{"content": d} for d in docs]), encoding="utf-8")
    for name in ("x.jsonl", "y.jsonl.gz", "z.json"):
        assert list(iter_texts([str(tmp_path / name)], text_field="content")) == docs, name
    with pytest.raises(ValueError, match=r"x\.jsonl.*record 1.*'text'"):
        list(iter_texts([str(tmp_path / "x.jsonl")]))


def test_sources_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    docs = ["row one", "row two", None, "row four"]
    pq.write_table(pa.table({"body": docs, "n": [1, 2, 3, 4]}), tmp_path / "t.parquet", row_group_size=2)
    assert list(iter_texts([str(tmp_path / "t.parquet")], text_field="body")) == ["row one", "row two", "row four"]
    with pytest.raises(ValueError, match="no column 'text'"):
        list(iter_texts([str(tmp_path / "t.parquet")]))


def test_sources_stdlib():
    first = next(iter_texts(["stdlib"]))
    assert first == next(stdlib_texts()) and len(first) > 0


def test_sources_hf(monkeypatch):
    # No network in tests: a stand-in `datasets` module checks the plumbing (name, config, split, field).
    calls = []

    class FakeDS(list):
        column_names = ["text", "label"]

    def load_dataset(name, config=None, split=None):
        calls.append((name, config, split))
        return FakeDS([{"text": "hf one", "label": 0}, {"text": "hf two", "label": 1}])

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    monkeypatch.setattr(data.importlib.util, "find_spec", lambda name: object())
    assert list(iter_texts(["hf:org/name"])) == ["hf one", "hf two"]
    assert list(iter_texts(["hf:org/name:validation"])) == ["hf one", "hf two"]
    assert list(iter_texts(["hf:org/name:cfg:test"])) == ["hf one", "hf two"]
    assert calls == [("org/name", None, "train"), ("org/name", None, "validation"), ("org/name", "cfg", "test")]
    with pytest.raises(ValueError, match="no column 'body'"):
        list(iter_texts(["hf:org/name"], text_field="body"))

    def offline(*a, **k):
        raise ConnectionError("hub unreachable")

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=offline))
    with pytest.raises(ValueError, match="hf:org/name.*hub reachable"):
        list(iter_texts(["hf:org/name"]))


def test_sources_errors_named(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="nope.txt"):
        iter_texts([str(tmp_path / "nope.txt")])  # raised eagerly, before any document is read
    with pytest.raises(ValueError, match=r"\*\.zzz"):
        iter_texts([str(tmp_path / "*.zzz")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty"):
        iter_texts([str(tmp_path / "empty")])
    with pytest.raises(ValueError, match="hf:"):
        iter_texts(["hf:"])
    with pytest.raises(ValueError, match="no text sources"):
        iter_texts([])
    monkeypatch.setattr(data.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ImportError, match="datasets"):
        iter_texts(["hf:org/name"])
    (tmp_path / "bad.txt").write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(ValueError, match="bad.txt.*UTF-8"):
        list(iter_texts([str(tmp_path / "bad.txt")]))


# ---------------------------------------------------------------------------------------------- prepare
def test_prepare_round_trip(prepared):
    out, meta, docs = prepared
    tok = Tokenizer.from_dir(out)  # the tokenizer is saved beside the data
    assert (tok.bos_id, tok.eos_id) == (0, 1) and meta["vocab_size"] == tok.vocab_size <= 400
    assert meta["dtype"] == "uint16" and meta["n_docs"] == len(docs)
    train, val = split_docs(out, "train", tok), split_docs(out, "val", tok)
    # Byte-level BPE decodes to exactly the original text; each split keeps the corpus order.
    assert sorted(train + val) == sorted(docs)
    assert train == [d for d in docs if d in train] and val == [d for d in docs if d in val]
    st = meta["splits"]
    assert st["train"]["n_docs"] + st["val"]["n_docs"] == len(docs)
    assert st["train"]["n_bytes"] + st["val"]["n_bytes"] == meta["n_bytes"] == sum(len(d.encode()) for d in docs)
    assert 0 < meta["unigram_entropy_bits"] < np.log2(meta["vocab_size"])
    assert len(meta["content_hash"]) == len(meta["tokenizer_sha256"]) == 64
    assert not [f for f in os.listdir(out) if "tmp" in f or f.startswith(".")]  # temporaries cleaned up


def test_val_split_by_document_deterministic(corpus, prepared, tmp_path):
    root, docs = corpus
    out, meta, _ = prepared
    tok = Tokenizer.from_dir(out)
    val = split_docs(out, "val", tok)
    assert set(val).isdisjoint(split_docs(out, "train", tok))
    # about val_fraction of the text, in whole documents
    assert 0.2 <= meta["splits"]["val"]["n_bytes"] / meta["n_bytes"] < 0.35
    again = prepare([str(root / "docs.jsonl")], str(tmp_path / "again"), str(out), val_fraction=0.2, seed=0)
    for split in ("train", "val"):
        assert open(f"{out}/{split}.bin", "rb").read() == open(tmp_path / "again" / f"{split}.bin", "rb").read()
    prepare([str(root / "docs.jsonl")], str(tmp_path / "other"), str(out), val_fraction=0.2, seed=1)
    assert split_docs(str(tmp_path / "other"), "val", tok) != val
    assert again["tokenizer_sha256"] == meta["tokenizer_sha256"]  # a reused tokenizer.json, unchanged
    # a tiny fraction still holds out one document
    few = prepare([str(root / "docs.jsonl")], str(tmp_path / "few"), str(out), val_fraction=1e-9)
    assert few["splits"]["val"]["n_docs"] == 1


def test_token_dtype_uint32_for_large_vocab(tmp_path):
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, pre_tokenizers, decoders

    # A word-level vocabulary of 70,000 entries: ids above 65535 must survive the trip to disk.
    vocab = {"<｜begin▁of▁sentence｜>": 0, "<｜end▁of▁sentence｜>": 1, "[UNK]": 2}
    vocab.update({f"w{i}": i for i in range(3, 70000)})
    tk = HFTokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tk.decoder = decoders.WordPiece()  # joins words with spaces
    tk.save(str(tmp_path / "tokenizer.json"))
    docs = ["w5 w70 w65535 w65536", "w69999 w3", "w100 w40000"]
    write_jsonl(tmp_path / "d.jsonl", docs)
    meta = prepare([str(tmp_path / "d.jsonl")], str(tmp_path / "out"), str(tmp_path / "tokenizer.json"))
    assert meta["dtype"] == "uint32" and meta["vocab_size"] == 70000
    ids = np.concatenate([np.fromfile(tmp_path / "out" / f"{s}.bin", dtype="<u4") for s in ("train", "val")])
    assert {69999, 65536, 65535} <= set(ids.tolist())
    assert os.path.getsize(tmp_path / "out" / "train.bin") == 4 * meta["splits"]["train"]["n_tokens"]
    assert token_dtype(65536) == np.dtype("<u2") and token_dtype(65537) == np.dtype("<u4")


def test_prepare_idempotent(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    docs = make_docs(12, seed=3)
    for i, d in enumerate(docs):
        (src / f"{i:02d}.txt").write_text(d, encoding="utf-8")
    out = str(tmp_path / "out")
    m1 = prepare([str(src)], out, 300)
    stamp = {f: os.stat(os.path.join(out, f)).st_mtime_ns for f in os.listdir(out)}
    time.sleep(0.01)
    assert prepare([str(src)], out, 300) == m1  # same inputs: nothing rewritten
    assert {f: os.stat(os.path.join(out, f)).st_mtime_ns for f in os.listdir(out)} == stamp
    (src / "05.txt").write_text(docs[5] + " edited", encoding="utf-8")  # any content change redoes it
    m2 = prepare([str(src)], out, 300)
    assert m2["content_hash"] != m1["content_hash"]
    assert prepare([str(src)], out, 320)["content_hash"] != m2["content_hash"]  # so does another vocab size
    os.truncate(os.path.join(out, "train.bin"), 10)  # a damaged output is rebuilt, not trusted
    m3 = prepare([str(src)], out, 320)
    assert os.path.getsize(os.path.join(out, "train.bin")) == 2 * m3["splits"]["train"]["n_tokens"]


def test_prepare_errors(tmp_path):
    (tmp_path / "one.txt").write_text("just one document", encoding="utf-8")
    with pytest.raises(ValueError, match="at least 2"):
        prepare([str(tmp_path / "one.txt")], str(tmp_path / "o"), 300)
    with pytest.raises(ValueError, match="val_fraction"):
        prepare([str(tmp_path / "one.txt")], str(tmp_path / "o"), 300, val_fraction=0.0)
    with pytest.raises(ValueError, match="too small"):
        prepare([str(tmp_path / "one.txt")], str(tmp_path / "o"), 100)
    with pytest.raises(ValueError, match="missing.json"):
        prepare([str(tmp_path / "one.txt")], str(tmp_path / "o"), str(tmp_path / "missing.json"))
    with pytest.raises(ValueError, match="nowhere"):
        prepare([str(tmp_path / "nowhere")], str(tmp_path / "o"), 300)


# ---------------------------------------------------------------------------------------------- reading
def test_batch_shapes_and_shift(prepared):
    out, meta, _ = prepared
    ds = TokenDataset(out, "train", seq_len=16)
    x, y = ds.batch(step=0, batch_size=4, seed=0)
    assert x.shape == y.shape == (4, 16) and x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert int(x.max()) < meta["vocab_size"] and len(ds) == meta["splits"]["train"]["n_tokens"]
    # every row is a real window of the file
    flat = torch.from_numpy(np.asarray(ds.data).astype(np.int64))
    for row_x, row_y in zip(x, y):
        hits = [s for s in range(len(flat) - 16) if torch.equal(flat[s:s + 16], row_x)]
        assert any(torch.equal(flat[s + 1:s + 17], row_y) for s in hits)


def test_batch_deterministic_and_resumable(prepared):
    out, _, _ = prepared
    run = TokenDataset(out, "train", seq_len=8)
    uninterrupted = [run.batch(step, 3, seed=7) for step in range(6)]
    torch.manual_seed(123)  # the global RNG plays no part
    resumed = TokenDataset(out, "train", seq_len=8)  # a fresh process resuming at step 3
    for step in range(3, 6):
        for a, b in zip(resumed.batch(step, 3, seed=7), uninterrupted[step]):
            assert torch.equal(a, b)
    assert not torch.equal(uninterrupted[0][0], uninterrupted[1][0])  # steps differ
    assert not torch.equal(run.batch(0, 3, seed=8)[0], uninterrupted[0][0])  # seeds differ


def test_batch_ranks_disjoint(prepared):
    out, _, _ = prepared
    ds = TokenDataset(out, "train", seq_len=8)
    whole_x, whole_y = ds.batch(5, 8, seed=1)  # one process, global batch 8
    parts = [ds.batch(5, 2, seed=1, rank=r, world_size=4) for r in range(4)]  # 4 ranks x 2 rows
    assert torch.equal(torch.cat([p[0] for p in parts]), whole_x)
    assert torch.equal(torch.cat([p[1] for p in parts]), whole_y)
    with pytest.raises(ValueError, match="rank"):
        ds.batch(0, 2, rank=4, world_size=4)


def test_iter_eval_full_pass(prepared):
    out, meta, _ = prepared
    ds = TokenDataset(out, "val", seq_len=8)
    batches = list(ds.iter_eval(batch_size=3))
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    n = ds.n_eval_windows()
    assert n == (meta["splits"]["val"]["n_tokens"] - 1) // 8 and x.shape == (n, 8)
    flat = torch.from_numpy(np.asarray(ds.data).astype(np.int64))
    assert torch.equal(x.reshape(-1), flat[:n * 8]) and torch.equal(y.reshape(-1), flat[1:n * 8 + 1])
    assert all(len(b[0]) == 3 for b in batches[:-1])
    again = torch.cat([b[0] for b in ds.iter_eval(batch_size=5)])
    assert torch.equal(again, x)
    sharded = [torch.cat([b[0] for b in ds.iter_eval(2, rank=r, world_size=2)]) for r in range(2)]
    assert torch.equal(torch.cat(sharded).sort(dim=0).values, x.sort(dim=0).values)


def test_dataset_errors(prepared, tmp_path):
    out, meta, _ = prepared
    n_val = meta["splits"]["val"]["n_tokens"]
    with pytest.raises(ValueError, match=f"'val' has {n_val} tokens"):
        TokenDataset(out, "val", seq_len=n_val)
    TokenDataset(out, "val", seq_len=n_val - 1)  # exactly enough
    with pytest.raises(ValueError, match="split"):
        TokenDataset(out, "test", seq_len=8)
    with pytest.raises(FileNotFoundError, match="prepare"):
        TokenDataset(str(tmp_path), "train", seq_len=8)


@pytest.mark.slow
def test_prepare_stdlib(tmp_path):
    t0 = time.perf_counter()
    meta = prepare(["stdlib"], str(tmp_path), 8192)
    seconds = time.perf_counter() - t0
    assert seconds < 120
    assert meta["vocab_size"] == 8192 and meta["dtype"] == "uint16"
    assert meta["splits"]["train"]["n_tokens"] > 1_000_000 and meta["splits"]["val"]["n_tokens"] > 2048
    tok = Tokenizer.from_dir(str(tmp_path))
    val = split_docs(str(tmp_path), "val", tok)
    assert set(val) <= set(stdlib_texts())
    x, y = TokenDataset(str(tmp_path), "val", seq_len=1024).batch(0, 2)
    assert x.shape == (2, 1024)
