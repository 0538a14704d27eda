"""``sparseek run-batch``: a file in OpenAI's Batch API format run offline (vLLM's ``run-batch``).

Each input line is a request, ``{"custom_id", "method": "POST", "url": "/v1/chat/completions" |
"/v1/completions" | "/v1/responses", "body": {...}}``; each output line its result, in the input's
order: ``{"id", "custom_id", "response": {"status_code", "request_id", "body"}, "error": null}``.
The requests go through the server's own handling (``build_app``, in process, no socket), so a
body means here what it means to ``sparseek serve`` and a bad one gets the same 400 naming its
field; up to ``concurrency`` of them are in flight at once, batched by the engine as concurrent
clients would be. A line that is not a request (not JSON, no ``custom_id``, another method or
URL, ``stream``) gets ``response: null`` and an ``error`` saying why; the others still run.

Nothing finished is lost: each result is appended to a journal (``OUTPUT.partial``, flushed as it
is written) as soon as it is done, so memory holds only the requests in flight and a run that
dies keeps what it finished; ``resume=True`` (``--resume``) runs only the requests the journal
lacks (and those that met a server error, 5xx) after checking that the journal was written for
the same input file. When every line has its result, the output is written in the input's order
from the journal, aside and renamed into place, and the journal is removed.
"""

from __future__ import annotations

import array
import asyncio
import hashlib
import json
import os
import sys
import tempfile
import time

from sparseek.serve.protocol import new_id

URLS = ("/v1/chat/completions", "/v1/completions", "/v1/responses")
JOURNAL_VERSION = 1


def _parse(line: str) -> tuple[dict | None, dict | None, str | None]:
    """(the request or None, why it is not one or None, its custom_id if it names one)."""
    try:
        req = json.loads(line)
    except json.JSONDecodeError as e:
        return None, {"code": "invalid_json", "message": f"not JSON: {e}"}, None
    if not isinstance(req, dict):
        return None, {"code": "invalid_request", "message": "a batch line must be a JSON object"}, None
    cid = req.get("custom_id")
    if not isinstance(cid, str):
        return None, {"code": "invalid_request", "message": "custom_id must be a string"}, None
    why = None
    if req.get("method", "POST") != "POST":
        why = {"code": "invalid_request", "message": f"method {req.get('method')!r}: batches take POST"}
    elif req.get("url") not in URLS:
        why = {"code": "invalid_url", "message": f"url {req.get('url')!r}: batches take one of {list(URLS)}"}
    elif not isinstance(req.get("body"), dict):
        why = {"code": "invalid_request", "message": "body must be a JSON object"}
    elif req["body"].get("stream"):
        why = {"code": "invalid_request", "message": "stream is not supported in batches"}
    return (None if why else req), why, cid


def _requests(path: str):
    """The input's non-blank lines, numbered from 0, read as they are needed."""
    with open(path, encoding="utf-8") as f:
        i = 0
        for line in f:
            if line.strip():
                yield i, line.rstrip("\n")
                i += 1


def _fingerprint(path: str) -> tuple[str, int]:
    """(sha256 of the input file, its number of non-blank lines): what ties a journal to its input."""
    h, n = hashlib.sha256(), 0
    with open(path, "rb") as f:
        for line in f:
            h.update(line)
            n += bool(line.strip())
    return h.hexdigest(), n


def _final(result: dict) -> bool:
    """Whether a journaled result stands (a 5xx is the server's failure, not the request's: rerun it)."""
    resp = result.get("response")
    return resp is None or resp.get("status_code", 500) < 500


def _entries(f):
    """(byte offset, line number, result) of every whole entry of an open journal, past its header;
    a torn line (a run killed mid-write) is skipped: its request runs again."""
    f.seek(0)
    f.readline()
    while True:
        at = f.tell()
        raw = f.readline()
        if not raw:
            return
        try:
            e = json.loads(raw)
            yield at, int(e["line"]), e["result"]
        except (ValueError, KeyError, TypeError):
            continue


class _Journal:
    """The append-only record of finished results: a header naming the input, then one
    ``{"line", "result"}`` a line, flushed as written (a killed process loses none) and fsynced at
    most once a second (a lost machine loses at most that)."""

    def __init__(self, path: str, input_path: str, sha: str, n: int, resume: bool):
        self.path = path
        self.done = bytearray(n)  # 1 where a line's result stands
        header = {"sparseek_batch": JOURNAL_VERSION, "input": os.path.abspath(input_path), "sha256": sha, "lines": n}
        if os.path.exists(path):
            if not resume:
                raise ValueError(f"{path} holds the results of an interrupted run: pass --resume (resume=True) "
                                 "to finish it, or remove the file to start over")
            self.f = open(path, "r+b")
            try:
                got = json.loads(self.f.readline())
            except ValueError:
                got = None
            if not isinstance(got, dict) or got.get("sparseek_batch") != JOURNAL_VERSION:
                self.f.close()
                raise ValueError(f"{path} is not a run-batch journal: remove it or choose another output")
            if got.get("sha256") != sha:
                self.f.close()
                raise ValueError(f"{path} was written for another input ({got.get('input')}, "
                                 f"{got.get('lines')} lines), not for {input_path} as it is now: "
                                 "remove it to start over")
            for _, i, result in _entries(self.f):
                if 0 <= i < n:
                    self.done[i] = _final(result)
            self.f.seek(-1, os.SEEK_END)  # the header is there: the file is not empty
            if self.f.read(1) != b"\n":
                self.f.write(b"\n")  # a torn last line ends here, so the next entry starts whole
        else:
            self.f = open(path, "w+b")
            self.f.write(json.dumps(header).encode() + b"\n")
            self.f.flush()
        self._synced = time.monotonic()

    def add(self, i: int, result: dict) -> None:
        self.f.write(json.dumps({"line": i, "result": result}, ensure_ascii=False).encode("utf-8") + b"\n")
        self.f.flush()
        self.done[i] = _final(result)
        if time.monotonic() - self._synced > 1.0:
            os.fsync(self.f.fileno())
            self._synced = time.monotonic()

    def write_output(self, output_path: str) -> dict:
        """The results in the input's order to ``output_path`` (aside, then renamed), with their counts."""
        self.f.flush()
        at = array.array("q", [-1]) * len(self.done)
        for offset, i, _ in _entries(self.f):
            if 0 <= i < len(at):
                at[i] = offset  # a later entry (a rerun 5xx) replaces an earlier one
        missing = at.count(-1)
        if missing:
            raise RuntimeError(f"{missing} results missing from {self.path}; rerun with --resume")
        counts = {"requests": len(at), "succeeded": 0, "failed": 0, "invalid": 0}
        folder = os.path.dirname(os.path.abspath(output_path))
        fd, tmp = tempfile.mkstemp(prefix=".batch-", suffix=".jsonl", dir=folder)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as out:
                for offset in at:
                    self.f.seek(offset)
                    r = json.loads(self.f.readline())["result"]
                    resp = r["response"]
                    counts["invalid" if resp is None else "succeeded" if resp["status_code"] == 200 else "failed"] += 1
                    out.write(json.dumps(r, ensure_ascii=False) + "\n")
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, output_path)
        except BaseException:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise
        return counts

    def close(self) -> None:
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()


async def _run_all(app, model_name: str, todo, journal: _Journal, concurrency: int, progress) -> None:
    import httpx

    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://batch", timeout=None) as client:
        async def one(i: int, line: str) -> None:
            req, error, custom_id = _parse(line)
            out = {"id": new_id("batch_req"), "custom_id": custom_id, "response": None, "error": error}
            if req is not None:
                body = {"model": model_name, **req["body"]}
                try:
                    r = await client.post(req["url"], json=body)
                    status = r.status_code
                    try:
                        payload = r.json()
                    except ValueError:
                        payload = {"error": {"message": r.text}}
                except Exception as e:  # the app failed: a 500 for this request, kept for --resume to rerun
                    status, payload = 500, {"error": {"message": f"{type(e).__name__}: {e}", "type": "server_error"}}
                out["response"] = {"status_code": status, "request_id": new_id("req"), "body": payload}
            journal.add(i, out)
            if progress is not None:
                progress.update(1)

        # a window of `concurrency` requests in flight: the file is read as it is needed, never whole
        window = asyncio.Semaphore(concurrency)
        running: set[asyncio.Task] = set()
        failed: list[asyncio.Task] = []

        def finished(task: asyncio.Task) -> None:
            running.discard(task)
            window.release()
            if not task.cancelled() and task.exception() is not None:
                failed.append(task)

        for i, line in todo:
            await window.acquire()
            if failed:  # a journal write failed: stop here (what is written stays)
                failed[0].result()
            task = asyncio.create_task(one(i, line))
            running.add(task)
            task.add_done_callback(finished)
        if running:
            await asyncio.gather(*running)


def run_batch(llm, input_path: str, output_path: str, model_name: str = "sparseek", concurrency: int | None = None,
              progress: bool = True, resume: bool = False, **app_kw) -> dict:
    """Run every request of ``input_path`` (OpenAI's batch JSONL) on ``llm`` and write the results
    to ``output_path`` in the input's order; returns counts (requests, 200s, other statuses, lines
    that were not requests) and ``resumed`` (results taken from an earlier run's journal).
    ``resume``: finish the interrupted run whose journal (``output_path + ".partial"``) exists;
    without it such a journal is an error, never silently discarded. ``app_kw``: ``build_app``'s
    (thinking, ...)."""
    from sparseek.serve.api import build_app

    if not os.path.isfile(input_path):
        raise FileNotFoundError(f"batch input {input_path} does not exist")
    sha, n = _fingerprint(input_path)
    journal = _Journal(output_path + ".partial", input_path, sha, n, resume)
    resumed = sum(journal.done)
    concurrency = concurrency or 4 * llm.max_batch_size
    try:
        if resumed < n:
            app = build_app(llm, model_name, max_waiting=concurrency, **app_kw)
            engine = app.state.engine
            bar = None
            if progress:
                from tqdm import tqdm

                bar = tqdm(total=n, initial=resumed, desc="batch", unit="req")
            todo = ((i, line) for i, line in _requests(input_path) if not journal.done[i])
            engine.start()
            try:
                asyncio.run(_run_all(app, model_name, todo, journal, concurrency, bar))
            except KeyboardInterrupt:
                print(f"run-batch interrupted: {sum(journal.done)} of {n} results kept in {journal.path}; "
                      "run again with --resume to finish", file=sys.stderr)
                raise
            finally:
                engine.shutdown()
                if bar is not None:
                    bar.close()
        counts = journal.write_output(output_path)
    finally:
        journal.close()
    os.remove(journal.path)
    return {**counts, "resumed": resumed}


__all__ = ["run_batch", "URLS"]
