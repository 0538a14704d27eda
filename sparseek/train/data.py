"""Training data: text sources -> tokenized, packed, memory-mapped token files with a held-out split.

Three pieces, each usable alone:

* ``iter_texts(sources)``: documents (strings) from files, folders, globs, JSONL/JSON/Parquet with a
  text field, ``stdlib`` (the running interpreter's standard library source, the embedded default
  corpus: no download) and ``hf:<dataset>[:<config>]:<split>`` (the ``datasets`` library, only when
  asked for);
* ``prepare(sources, out_dir, tokenizer)``: trains a byte-level BPE (or reuses a tokenizer.json),
  splits documents into train/val, writes ``train.bin`` / ``val.bin`` (raw little-endian uint16, or
  uint32 when the vocabulary does not fit), ``tokenizer.json`` and ``meta.json``; re-running with the
  same inputs does nothing;
* ``TokenDataset(out_dir, split, seq_len)``: reads them back; ``batch(step, ...)`` is a pure function
  of (step, seed), so a resumed run sees exactly the data an uninterrupted one would.

On disk every document is ``BOS + tokens + EOS``, documents are concatenated with nothing between
them, and training windows cross document boundaries (the usual packing: no padding is wasted, and
BOS/EOS tell the model where one document ends).
"""

from __future__ import annotations

import contextlib
import glob as _glob
import gzip
import hashlib
import importlib.util
import json
import logging
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np
import torch

from sparseek.tokenizer import Tokenizer, stdlib_texts, train_bpe
from sparseek.tokenizer.tokenizer import V4_SPECIAL_TOKENS

__all__ = ["iter_texts", "prepare", "TokenDataset", "DEFAULT_VOCAB_SIZE", "STDLIB"]

log = logging.getLogger(__name__)

STDLIB = "stdlib"  # the embedded default corpus
DEFAULT_VOCAB_SIZE = 8192  # the `nano` preset's vocabulary
FORMAT_VERSION = 1  # bump when the on-disk layout changes, so old outputs are rebuilt, not misread

# Files a folder walk picks up. An explicit file path is read whatever its name; a folder walk needs
# a filter so that binaries, lock files and the like in a source tree don't become "documents".
TEXT_SUFFIXES = frozenset({
    ".txt", ".md", ".rst", ".tex", ".py", ".pyi", ".c", ".h", ".cc", ".cpp", ".hpp", ".cu", ".rs", ".go",
    ".java", ".kt", ".scala", ".js", ".ts", ".jsx", ".tsx", ".rb", ".php", ".lua", ".sh", ".sql", ".html",
    ".css", ".xml", ".yaml", ".yml", ".toml", ".ini", ".cfg",
})
# Data files a folder walk parses record by record. Plain `.json` is left out of folder walks on
# purpose: in a source tree it is usually a config file (package.json, our own meta.json), not a
# dataset; name it explicitly or with a glob to use it.
RECORD_SUFFIXES = (".jsonl", ".jsonl.gz", ".ndjson", ".parquet")

# Documents are tokenized in batches of about this much text: big enough for the tokenizers
# library's parallel batch encoder to pay off, small enough to bound memory on any corpus size.
_ENCODE_BATCH_BYTES = 8 << 20


# ---------------------------------------------------------------------------------------------- sources
def iter_texts(sources: str | Iterable[str], text_field: str = "text") -> Iterator[str]:
    """The documents of ``sources``, in a deterministic order (sources in the given order, folders
    and globs sorted by path). Empty documents are skipped.

    A source is one of:

    * a file: ``.jsonl`` / ``.ndjson`` / ``.jsonl.gz`` / ``.json`` (JSON lines, or one JSON array, of
      objects whose ``text_field`` is a document), ``.parquet`` (column ``text_field``; needs
      pyarrow), anything else is one UTF-8 text document (``.gz`` is decompressed);
    * a folder: every text-like or JSONL/Parquet file under it, recursively, hidden entries skipped;
    * a glob (``data/**/*.md``);
    * ``stdlib``: the running interpreter's standard library source, the embedded default corpus;
    * ``hf:<dataset_id>[:<config>][:<split>]`` (split defaults to ``train``): a ``datasets`` dataset;
      needs the ``datasets`` package and a reachable hub (or its local cache).

    Every source is checked before the first document is read, so a typo fails at once with a
    ValueError naming it rather than after an hour of tokenizing the other sources.
    """
    if isinstance(sources, str):
        sources = [sources]
    readers = [_resolve(s, text_field) for s in sources]
    if not readers:
        raise ValueError("no text sources given")
    return (text for read in readers for text in read() if text)


def _resolve(source: str, text_field: str) -> Callable[[], Iterator[str]]:
    """A source string -> a function reading its documents (raises ValueError if it names nothing)."""
    if source == STDLIB:
        return stdlib_texts
    if source.startswith("hf:"):
        return _hf_reader(source, text_field)
    path = os.path.expanduser(source)
    if os.path.isfile(path):
        files = [(path, True)]
    elif os.path.isdir(path):
        files = [(f, False) for f in _walk(path)]
        if not files:
            raise ValueError(f"text source {source!r}: the folder holds no text-like or JSONL/Parquet files")
    elif any(c in path for c in "*?["):
        # A file the pattern names is read whatever its suffix; a folder it names is walked.
        files = [fe for m in sorted(_glob.glob(path, recursive=True))
                 for fe in ([(f, False) for f in _walk(m)] if os.path.isdir(m) else [(m, True)])]
        if not files:
            raise ValueError(f"text source {source!r}: the glob matches no files")
    else:
        raise ValueError(f"text source {source!r} is not a file, folder, glob, {STDLIB!r} or hf:<dataset_id>")
    return lambda: (t for f, explicit in files for t in _read_file(f, text_field, explicit))


def _walk(folder: str) -> list[str]:
    out = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = [d for d in dirnames if not d.startswith(".") and d != "__pycache__"]
        for fn in filenames:
            low = fn.lower()
            if not fn.startswith(".") and (os.path.splitext(low)[1] in TEXT_SUFFIXES or low.endswith(RECORD_SUFFIXES)):
                out.append(os.path.join(dirpath, fn))
    # Sort whole relative paths (os.walk's own order depends on the filesystem).
    return sorted(out, key=lambda p: os.path.relpath(p, folder).split(os.sep))


def _read_file(path: str, text_field: str, explicit: bool) -> Iterator[str]:
    low = path.lower()
    if low.endswith(".parquet"):
        yield from _read_parquet(path, text_field)
        return
    opener = gzip.open if low.endswith(".gz") else open
    stem = low[:-3] if low.endswith(".gz") else low
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            if stem.endswith((".jsonl", ".ndjson", ".json")):
                yield from _read_json_records(f, path, text_field)
            else:
                yield f.read()
    except UnicodeDecodeError as e:
        if explicit:
            raise ValueError(f"text source {path!r} is not UTF-8 text: {e}") from e
        # A folder walk skips the odd non-UTF-8 file (as stdlib_texts does) instead of failing the run.
        log.warning("skipping %s: not UTF-8", path)


def _read_json_records(f, path: str, text_field: str) -> Iterator[str]:
    first = f.read(1)
    while first and first.isspace():
        first = f.read(1)
    if first == "[":  # one JSON array of records
        records: Iterable[tuple[int, Any]] = enumerate(json.loads(first + f.read()), 1)
    else:  # JSON lines
        def lines():
            for i, line in enumerate(_prepend(first, f), 1):
                if line.strip():
                    yield i, json.loads(line)
        records = lines()
    for where, rec in records:
        if not isinstance(rec, dict) or text_field not in rec:
            raise ValueError(f"{path}: record {where} has no {text_field!r} field (pass text_field=...)")
        if rec[text_field] is not None:
            yield str(rec[text_field])


def _prepend(first: str, f) -> Iterator[str]:
    """The lines of ``f`` with the already-consumed first character put back."""
    rest = f.readline()
    yield first + rest
    yield from f


def _read_parquet(path: str, text_field: str) -> Iterator[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise ImportError(f"reading {path} needs pyarrow: pip install pyarrow") from e
    pf = pq.ParquetFile(path)
    if text_field not in pf.schema_arrow.names:
        raise ValueError(f"{path}: no column {text_field!r} (columns: {pf.schema_arrow.names}; pass text_field=...)")
    for batch in pf.iter_batches(columns=[text_field], batch_size=4096):  # row groups stay out of memory
        yield from (t for t in batch.column(0).to_pylist() if t is not None)


def _hf_reader(source: str, text_field: str) -> Callable[[], Iterator[str]]:
    parts = source[3:].split(":")
    if not parts[0] or len(parts) > 3:
        raise ValueError(f"text source {source!r}: expected hf:<dataset_id>[:<config>][:<split>]")
    name, config, split = parts[0], (parts[1] if len(parts) == 3 else None), (parts[-1] if len(parts) > 1 else "train")
    if importlib.util.find_spec("datasets") is None:
        raise ImportError(f"text source {source!r} needs the `datasets` package: pip install datasets")

    def read() -> Iterator[str]:
        import datasets

        try:
            # Not streaming: prepare() reads its sources more than once, and the local cache makes
            # the later passes (and re-runs) free, where a stream would download everything again.
            ds = datasets.load_dataset(name, config, split=split)
        except Exception as e:  # offline, unknown name, bad split: one clear message
            raise ValueError(f"text source {source!r}: could not load the dataset ({type(e).__name__}: {e}); "
                             "is the hub reachable, or the dataset in the local cache?") from e
        if text_field not in ds.column_names:
            raise ValueError(f"text source {source!r}: no column {text_field!r} (columns: {ds.column_names})")
        for rec in ds:
            if rec[text_field] is not None:
                yield str(rec[text_field])
    return read


# ---------------------------------------------------------------------------------------------- prepare
def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 while every id fits (half the disk and page cache), else uint32; always little-endian."""
    return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<u4")


def _is_val(doc_bytes: np.ndarray, val_fraction: float, seed: int) -> np.ndarray:
    """Which documents are held out: documents in the order of a hash of (index, seed) until they
    hold ``val_fraction`` of the text (the one crossing the line included), at least one, never all.

    Whole documents, so no validation text is ever seen in training, not even its first half.
    Counted in bytes rather than documents because corpora like the stdlib have few documents of
    very different sizes: 0.5% of 800 files by count is often one tiny file (we measured a
    236-token validation split that way), while 0.5% of the bytes is a usable ~16k tokens.
    The order depends only on (index, seed), not on the tokenizer or on how the work was batched.
    """
    u = [hashlib.blake2b(f"{seed}:{i}".encode(), digest_size=8).digest() for i in range(len(doc_bytes))]
    order = sorted(range(len(u)), key=u.__getitem__)
    crossed = np.cumsum(doc_bytes[order]) >= val_fraction * doc_bytes.sum()
    k = min(max(1, int(np.argmax(crossed)) + 1), len(order) - 1)
    val = np.zeros(len(doc_bytes), dtype=bool)
    val[order[:k]] = True
    return val


def _load_tokenizer(tokenizer: Tokenizer | str | os.PathLike) -> Tokenizer:
    if isinstance(tokenizer, Tokenizer):
        return tokenizer
    path = os.path.expanduser(os.fspath(tokenizer))
    if os.path.isdir(path):
        path = os.path.join(path, "tokenizer.json")
    if not os.path.isfile(path):
        raise ValueError(f"tokenizer {tokenizer!r}: no such tokenizer.json")
    return Tokenizer.from_file(path, os.path.join(os.path.dirname(path), "tokenizer_config.json"))


def _sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def prepare(sources: str | Iterable[str], out_dir: str,
            tokenizer: Tokenizer | str | os.PathLike | int | None = None, *,
            text_field: str = "text", val_fraction: float = 0.005, seed: int = 0,
            force: bool = False) -> dict[str, Any]:
    """Tokenize ``sources`` into ``out_dir``: ``train.bin``, ``val.bin``, ``tokenizer.json``, ``meta.json``.

    ``tokenizer``: ``None`` or an int trains a byte-level BPE of that vocabulary size (None:
    ``DEFAULT_VOCAB_SIZE``) with the V4 special tokens on the training documents only (validation
    text stays unseen); a path (tokenizer.json or its folder) or a ``Tokenizer`` is used as is.
    Whole documents holding about ``val_fraction`` of the text (at least one document) are held
    out, chosen by a hash of (document index, ``seed``).

    Returns the meta dict (also written to ``meta.json``). If ``out_dir`` already holds the output
    of the same sources' content, tokenizer and options, nothing is redone (unless ``force``).
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    if isinstance(tokenizer, bool) or (isinstance(tokenizer, int) and tokenizer < 256 + len(V4_SPECIAL_TOKENS)):
        raise ValueError(f"vocab size {tokenizer!r} is too small for a byte-level BPE: 256 bytes + "
                         f"{len(V4_SPECIAL_TOKENS)} special tokens at least")
    t0 = time.perf_counter()
    sources = [sources] if isinstance(sources, str) else list(sources)

    def texts() -> Iterator[str]:  # each call is a fresh pass over the sources
        return iter_texts(sources, text_field)

    if tokenizer is None or isinstance(tokenizer, int):  # train one of this size
        vocab_req, tok_in = tokenizer or DEFAULT_VOCAB_SIZE, None
        tok_desc = f"byte-level BPE trained here, vocab_size={vocab_req} requested"
    else:  # use this one
        vocab_req, tok_in = None, _load_tokenizer(tokenizer)
        tok_desc = "a Tokenizer instance" if isinstance(tokenizer, Tokenizer) else os.fspath(tokenizer)

    # Pass 1: read everything once to hash it. Hashing the content, not file names or mtimes, makes
    # the skip exact: same text in, same tokens out; any edit anywhere redoes the work.
    tok_key = ["train_bpe", vocab_req] if tok_in is None else hashlib.sha256(tok_in.tk.to_str().encode()).hexdigest()
    h = hashlib.sha256(json.dumps({"format": FORMAT_VERSION, "text_field": text_field, "val_fraction": val_fraction,
                                   "seed": seed, "tokenizer": tok_key}, sort_keys=True).encode())
    sizes = []
    for text in texts():
        b = text.encode("utf-8", "surrogatepass")
        h.update(len(b).to_bytes(8, "little"))  # length-prefixed: doc boundaries are part of the content
        h.update(b)
        sizes.append(len(b))
    content_hash = h.hexdigest()
    doc_bytes = np.array(sizes, dtype=np.int64)
    n_docs, n_bytes = len(sizes), int(doc_bytes.sum())
    if n_docs < 2:
        raise ValueError(f"sources {sources} hold {n_docs} non-empty document(s); a train/val split needs at least 2")

    meta_path = os.path.join(out_dir, "meta.json")
    if not force and _up_to_date(out_dir, content_hash):
        log.info("%s is up to date (content hash %s), nothing to do", out_dir, content_hash[:12])
        with open(meta_path, encoding="utf-8") as f:
            return json.load(f)

    is_val = _is_val(doc_bytes, val_fraction, seed)

    # Pass 2 (only when training a tokenizer): BPE on the training documents.
    if tok_in is None:
        tok = train_bpe((t for t, v in zip(texts(), is_val) if not v), vocab_req)
        log.info("trained a byte-level BPE: %d tokens (%.1fs)", tok.vocab_size, time.perf_counter() - t0)
    else:
        tok = tok_in
    if tok.bos_id is None and tok.eos_id is None:
        raise ValueError("the tokenizer has neither a BOS nor an EOS token; documents could not be told apart")
    vocab_size = tok.vocab_size
    dtype = token_dtype(vocab_size)

    # Pass 3: tokenize and write. meta.json goes first (so a crash midway never leaves a meta that
    # vouches for half-written files) and comes back last; the data files are written to temporary
    # names and renamed into place, so a reader never sees a torn file.
    os.makedirs(out_dir, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        os.remove(meta_path)
    tmp = tempfile.mkdtemp(prefix=".prepare-", dir=out_dir)
    try:
        counts = np.zeros(vocab_size, dtype=np.int64)  # train unigram counts, for the entropy baseline
        n_tok = {"train": 0, "val": 0}
        files = {s: open(os.path.join(tmp, f"{s}.bin"), "wb") for s in n_tok}
        try:
            seen = 0
            for batch in _batches(texts()):
                idx = np.arange(seen, seen + len(batch))
                seen += len(batch)
                if seen > n_docs:
                    break
                for split, arr in _encode(tok, batch, is_val[idx], dtype):
                    files[split].write(arr.tobytes())
                    n_tok[split] += len(arr)
                    if split == "train":
                        counts += np.bincount(arr, minlength=vocab_size)
            if seen != n_docs:  # zip-like truncation would silently shift the split
                raise RuntimeError(f"sources {sources} changed while being prepared ({n_docs} documents, "
                                   f"then {seen}{'+' if seen > n_docs else ''}); run prepare again")
        finally:
            for f in files.values():
                f.close()
        stats = {split: {"n_tokens": n_tok[split], "n_docs": int((is_val == (split == "val")).sum()),
                         "n_bytes": int(doc_bytes[is_val == (split == "val")].sum())} for split in n_tok}
        tok.save(tmp)
        for name in ("train.bin", "val.bin", "tokenizer.json", "tokenizer_config.json"):
            os.replace(os.path.join(tmp, name), os.path.join(out_dir, name))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    p = counts[counts > 0] / max(1, counts.sum())
    meta = {
        "format": FORMAT_VERSION,
        "dtype": dtype.name, "byteorder": "little", "vocab_size": vocab_size,
        "bos_id": tok.bos_id, "eos_id": tok.eos_id,
        "n_docs": n_docs, "n_bytes": n_bytes,
        "splits": stats,
        # Bits per token of the best context-free model of the training tokens: validation loss
        # should beat ln(2) * this (nats) early, or the model is not using context at all.
        "unigram_entropy_bits": float(-(p * np.log2(p)).sum()),
        "sources": sources, "text_field": text_field, "val_fraction": val_fraction, "seed": seed,
        "tokenizer": tok_desc,
        "tokenizer_sha256": _sha256_file(os.path.join(out_dir, "tokenizer.json")),
        "content_hash": content_hash,
        "seconds": round(time.perf_counter() - t0, 2),
    }
    _write_json_atomic(meta_path, meta)
    log.info("prepared %s: %d train / %d val tokens, %d docs, %.1fs", out_dir, stats["train"]["n_tokens"],
             stats["val"]["n_tokens"], n_docs, meta["seconds"])
    return meta


def _up_to_date(out_dir: str, content_hash: str) -> bool:
    """meta.json records this content hash and every file it describes is there, whole."""
    try:
        with open(os.path.join(out_dir, "meta.json"), encoding="utf-8") as f:
            meta = json.load(f)
        if meta.get("content_hash") != content_hash:
            return False
        item = np.dtype(meta["dtype"]).itemsize
        for split, st in meta["splits"].items():
            if os.path.getsize(os.path.join(out_dir, f"{split}.bin")) != st["n_tokens"] * item:
                return False
        return _sha256_file(os.path.join(out_dir, "tokenizer.json")) == meta["tokenizer_sha256"]
    except (OSError, ValueError, KeyError):
        return False


def _batches(texts: Iterable[str]) -> Iterator[list[str]]:
    batch: list[str] = []
    size = 0
    for text in texts:
        batch.append(text)
        size += len(text)
        if size >= _ENCODE_BATCH_BYTES:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _encode(tok: Tokenizer, batch: list[str], is_val: np.ndarray, dtype: np.dtype) -> Iterator[tuple[str, np.ndarray]]:
    """One batch of documents -> (split, its documents as BOS + ids + EOS, concatenated) per split.

    Encoded like ``Tokenizer.encode``: no template tokens are added, but a literal special-token
    string inside a document (chat-formatted data) does become that special token.
    """
    # encode_batch_fast (tokenizers >= 0.21) skips computing character offsets we never use.
    enc = getattr(tok.tk, "encode_batch_fast", tok.tk.encode_batch)(batch, add_special_tokens=False)
    head = [tok.bos_id] if tok.bos_id is not None else []
    tail = [tok.eos_id] if tok.eos_id is not None else []
    for split, want in (("train", False), ("val", True)):
        docs = np.flatnonzero(is_val == want)
        if len(docs):
            yield split, np.asarray([x for i in docs for x in (head + enc[i].ids + tail)], dtype=dtype)


def _write_json_atomic(path: str, obj: Any) -> None:
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------- reading
class TokenDataset:
    """One split of a prepared directory, memory-mapped (nothing is read until a batch needs it).

    ``batch(step, batch_size, seed)`` draws random windows; which windows is a pure function of
    (seed, step), so resuming at step k reproduces an uninterrupted run exactly and needs no
    data-loader state in the checkpoint. ``iter_eval(batch_size)`` walks the split once in
    non-overlapping windows, the same ones every time.
    """

    def __init__(self, path: str, split: str = "train", seq_len: int = 512):
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        if seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len}")
        meta_path = os.path.join(path, "meta.json")
        if not os.path.exists(meta_path):
            raise FileNotFoundError(f"{path} holds no meta.json: run sparseek.train.data.prepare first")
        with open(meta_path, encoding="utf-8") as f:
            self.meta: dict[str, Any] = json.load(f)
        if self.meta.get("format") != FORMAT_VERSION:
            raise ValueError(f"{path} was prepared in format {self.meta.get('format')}, this code reads "
                             f"{FORMAT_VERSION}: prepare it again")
        self.path, self.split, self.seq_len = path, split, seq_len
        self.vocab_size: int = self.meta["vocab_size"]
        self.n_tokens: int = self.meta["splits"][split]["n_tokens"]
        if self.n_tokens < seq_len + 1:
            raise ValueError(f"{path} split {split!r} has {self.n_tokens} tokens; seq_len={seq_len} needs at "
                             f"least {seq_len + 1} (inputs plus the shifted targets)")
        dtype = np.dtype(self.meta["dtype"]).newbyteorder("<")
        self.data = np.memmap(os.path.join(path, f"{split}.bin"), dtype=dtype, mode="r", shape=(self.n_tokens,))

    def __len__(self) -> int:
        return self.n_tokens

    def _rows(self, starts: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        win = self.data[starts[:, None] + np.arange(self.seq_len + 1)].astype(np.int64)
        t = torch.from_numpy(win)
        return t[:, :-1], t[:, 1:]

    def batch(self, step: int, batch_size: int, seed: int = 0, rank: int = 0,
              world_size: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x, y)``, int64 ``[batch_size, seq_len]``, ``y`` = ``x`` shifted by one token.

        The global batch of ``batch_size * world_size`` windows is drawn from a generator seeded by
        (seed, step) alone; rank r takes rows ``[r * batch_size, (r + 1) * batch_size)``. So the
        ranks' rows are disjoint, and together they are exactly ``batch(step, batch_size *
        world_size, seed)`` of a single process.
        """
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        # Seeded from a hash, not seed * K + step, so that no two (seed, step) pairs share a stream.
        key = int.from_bytes(hashlib.blake2b(f"{seed}:{step}".encode(), digest_size=8).digest(), "little") >> 1
        g = torch.Generator().manual_seed(key)
        starts = torch.randint(0, self.n_tokens - self.seq_len, (batch_size * world_size,), generator=g)
        return self._rows(starts[rank * batch_size:(rank + 1) * batch_size].numpy())

    def n_eval_windows(self) -> int:
        return (self.n_tokens - 1) // self.seq_len

    def iter_eval(self, batch_size: int, rank: int = 0,
                  world_size: int = 1) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Every non-overlapping window ``[i * seq_len, (i + 1) * seq_len]`` once, in order (the last
        batch may be short); each token after the first is a target exactly once. With
        ``world_size`` > 1, rank r takes windows r, r + world_size, ..."""
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        starts = np.arange(rank, self.n_eval_windows(), world_size, dtype=np.int64) * self.seq_len
        for i in range(0, len(starts), batch_size):
            yield self._rows(starts[i:i + batch_size])

    def unigram_loss(self) -> float:
        """The training split's unigram entropy in nats per token (the loss a context-free model gets)."""
        return self.meta["unigram_entropy_bits"] * math.log(2)
