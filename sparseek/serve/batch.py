"""``sparseek run-batch``: a file in OpenAI's Batch API format run offline (vLLM's ``run-batch``).

Each input line is a request, ``{"custom_id", "method": "POST", "url": "/v1/chat/completions" |
"/v1/completions" | "/v1/responses", "body": {...}}``; each output line its result, in the input's
order: ``{"id", "custom_id", "response": {"status_code", "request_id", "body"}, "error": null}``.
The requests go through the server's own handling (``build_app``, in process, no socket), so a
body means here what it means to ``sparseek serve`` and a bad one gets the same 400 naming its
field; they are all submitted at once and batched by the engine as concurrent clients would be.
A line that is not a request (not JSON, no ``custom_id``, another method or URL, ``stream``) gets
``response: null`` and an ``error`` saying why; the others still run. The output file is written
aside and renamed into place at the end, so a run that dies leaves no half-written results.
"""

from __future__ import annotations

import asyncio
import json
import os
import tempfile

from sparseek.serve.protocol import new_id

URLS = ("/v1/chat/completions", "/v1/completions", "/v1/responses")


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


async def _run_all(app, model_name: str, lines: list[str], concurrency: int, progress) -> list[dict]:
    import httpx

    limit = asyncio.Semaphore(concurrency)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://batch", timeout=None) as client:
        async def one(line: str) -> dict:
            req, error, custom_id = _parse(line)
            out = {"id": new_id("batch_req"), "custom_id": custom_id, "response": None, "error": error}
            if req is not None:
                body = {"model": model_name, **req["body"]}
                async with limit:
                    r = await client.post(req["url"], json=body)
                try:
                    payload = r.json()
                except ValueError:
                    payload = {"error": {"message": r.text}}
                out["response"] = {"status_code": r.status_code, "request_id": new_id("req"), "body": payload}
            if progress is not None:
                progress.update(1)
            return out

        return list(await asyncio.gather(*(one(line) for line in lines)))


def run_batch(llm, input_path: str, output_path: str, model_name: str = "sparseek", concurrency: int | None = None,
              progress: bool = True, **app_kw) -> dict:
    """Run every request of ``input_path`` (OpenAI's batch JSONL) on ``llm`` and write the results
    to ``output_path`` in the input's order; returns counts (requests, 200s, other statuses, lines
    that were not requests). ``app_kw``: ``build_app``'s (thinking, ...)."""
    from sparseek.serve.api import build_app

    with open(input_path, encoding="utf-8") as f:
        lines = [ln for ln in f.read().splitlines() if ln.strip()]
    app = build_app(llm, model_name, max_waiting=max(len(lines), 1), **app_kw)
    engine = app.state.engine
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(lines), desc="batch", unit="req")
    engine.start()
    try:
        results = asyncio.run(_run_all(app, model_name, lines, concurrency or 4 * llm.max_batch_size, bar))
    finally:
        engine.shutdown()
        if bar is not None:
            bar.close()
    folder = os.path.dirname(os.path.abspath(output_path))
    fd, tmp = tempfile.mkstemp(prefix=".batch-", suffix=".jsonl", dir=folder)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for r in results:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
        os.replace(tmp, output_path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    ok = sum(r["response"] is not None and r["response"]["status_code"] == 200 for r in results)
    bad = sum(r["response"] is None for r in results)
    return {"requests": len(results), "succeeded": ok, "failed": len(results) - ok - bad, "invalid": bad}


__all__ = ["run_batch", "URLS"]
