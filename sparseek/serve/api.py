"""An OpenAI-compatible HTTP server over the engine (``sparseek serve``).

Endpoints: ``GET /health``, ``GET /metrics`` (Prometheus, ``sparseek.serve.metrics``), ``GET /v1/models``, ``POST /v1/completions``, ``POST
/v1/chat/completions``, ``POST /v1/responses`` (streaming as server-sent events, ``n``, log-probabilities, stop
sequences, penalties, seeds, tools and reasoning in DeepSeek-V4's chat format). Every request
joins the engine's running batch between decode steps; a client that disconnects frees its slot
at the next step. With an API key set, ``/v1/*`` answers 401 without ``Authorization: Bearer
<key>``. Errors come back in the API's shape (``{"error": {"message", "type", "param",
"code"}}``): 400 for bad requests (naming the field), 404 for an unknown model, 503 when the
queue is full, 500 if the engine fails a step (the server itself keeps running).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import ValidationError

from sparseek.engine.async_engine import AsyncEngine, EngineBusy, EngineError
from sparseek.engine.llm import LLM, StreamDelta
from sparseek.serve.protocol import (ChatRequest, ChatText, CompletionRequest, RequestError, TokenText, error_body,
                                     new_id, now, usage)
from sparseek.serve.metrics import ServerMetrics
from sparseek.serve.responses import ResponsesRequest, ResponseStore, ResponseWriter, response_usage
from sparseek.tokenizer.chat import THINK_END

log = logging.getLogger("sparseek")


def build_app(llm: LLM, model_name: str = "sparseek", api_key: str | None = None, max_waiting: int = 256,
              thinking: bool = False, stored_responses: int = 1024, mirror=None, runtime_lora: bool = False) -> FastAPI:
    """The FastAPI app serving ``llm`` as ``model_name``; ``thinking``: chat requests think unless
    they say otherwise (``chat_template_kwargs``, ``reasoning_effort``); ``stored_responses``: how
    many Responses API responses are kept for ``previous_response_id`` (0: none); ``mirror``: the
    engine's ``AsyncEngine`` mirror (expert-sharded ranks: ``sparseek.parallel.serving``);
    ``runtime_lora``: ``POST /v1/load_lora_adapter`` / ``unload_lora_adapter`` may change the served
    adapters (vLLM's, behind its ``VLLM_ALLOW_RUNTIME_LORA_UPDATING``: they read directories on the
    server's disk, so they are off unless asked for)."""
    if llm.tokenizer is None:
        raise ValueError("serving needs a tokenizer: the model has no tokenizer.json")
    engine = AsyncEngine(llm, max_waiting=max_waiting, mirror=mirror)
    metrics = ServerMetrics(engine, model_name)
    tokens = TokenText(llm.tokenizer)
    stored = ResponseStore(stored_responses)
    created = now()

    @asynccontextmanager
    async def lifespan(app):
        engine.start()
        yield
        engine.shutdown()

    app = FastAPI(title="sparseek", lifespan=lifespan)
    app.state.engine = engine

    def check_key(request: Request):
        if api_key:
            given = request.headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
                raise RequestError("Incorrect API key provided: send 'Authorization: Bearer <key>'", status=401,
                                   code="invalid_api_key")

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(check_key)])

    @app.exception_handler(RequestError)
    async def _request_error(request, e: RequestError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(Exception)
    async def _bug(request, e: Exception):  # still an answer in the API's shape, and logged
        log.exception("unhandled error serving %s", request.url.path)
        return JSONResponse(error_body(f"internal error: {type(e).__name__}: {e}", "server_error"), status_code=500)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_name, **engine.load, "steps_failed": engine.steps_failed}

    @app.get("/metrics")  # Prometheus' scrape, unauthenticated as /health (vLLM's too)
    async def prometheus():
        body, content_type = metrics.exposition()
        return Response(body, media_type=content_type)

    # LoRA adapters served per request (LLM(lora_modules=...)): a request names one as its model
    adapters = list(llm.lora_rows.names) if llm.lora_rows is not None else []

    @v1.get("/models")
    async def models():
        base = {"object": "model", "created": created, "owned_by": "sparseek", "max_model_len": llm.max_seq_len}
        return {"object": "list", "data": [{"id": model_name, **base}] + [
            {"id": a, "parent": model_name, "root": a, **base} for a in adapters]}

    def _lora_name(data) -> str:
        if not runtime_lora:
            raise RequestError("loading LoRA adapters at run time is off: start the server with "
                               "--allow-runtime-lora", status=403, code="runtime_lora_disabled")
        name = data.get("lora_name") if isinstance(data, dict) else None
        if not isinstance(name, str) or not name:
            raise RequestError("lora_name must be a non-empty string", "lora_name")
        if mirror is not None:
            raise RequestError("loading LoRA adapters while serving is not built for expert-sharded ranks: "
                               "name them at start (--lora-modules)", status=400)
        return name

    @v1.post("/load_lora_adapter")
    async def load_lora_adapter(request: Request):
        """vLLM's: ``{"lora_name", "lora_path"}`` -> served from now on under that model name."""
        data = await _json(request)
        name = _lora_name(data)
        path = data.get("lora_path")
        if not isinstance(path, str) or not path:
            raise RequestError("lora_path must be the adapter directory on the server", "lora_path")
        if name == model_name:
            raise RequestError(f"`{name}` is the base model's name", "lora_name")
        try:
            await engine.call(lambda llm: llm.load_lora(name, path))
        except (ValueError, OSError) as e:
            raise RequestError(str(e), "lora_path" if isinstance(e, OSError) else "lora_name") from None
        adapters.append(name)
        return PlainTextResponse(f"Success: LoRA adapter '{name}' added successfully.")

    @v1.post("/unload_lora_adapter")
    async def unload_lora_adapter(request: Request):
        data = await _json(request)
        name = _lora_name(data)
        if name not in adapters:
            raise RequestError(f"The LoRA adapter `{name}` is not loaded", "lora_name", status=404,
                               code="model_not_found")
        try:
            await engine.call(lambda llm: llm.unload_lora(name))
        except ValueError as e:
            raise RequestError(str(e), "lora_name") from None
        adapters.remove(name)
        return PlainTextResponse(f"Success: LoRA adapter '{name}' removed successfully.")

    @app.post("/tokenize", dependencies=[Depends(check_key)])
    async def tokenize(request: Request):
        """vLLM's: ``{"prompt": text}`` or ``{"messages": [...]}`` (the chat prompt, as
        ``/v1/chat/completions`` builds it) -> the token ids and the context left."""
        data = await _json(request)
        if not isinstance(data, dict) or ("prompt" in data) == ("messages" in data):
            raise RequestError('give either "prompt" (text) or "messages" (a chat)')
        if "prompt" in data:
            if not isinstance(data["prompt"], str):
                raise RequestError("prompt must be a string", "prompt")
            ids = _prompt_ids(llm, data["prompt"], 0) if data["prompt"] else []
        else:
            body = _parse(data, ChatRequest)
            ids = llm.tokenizer.encode(_chat_prompt(body)[0])
        return {"tokens": ids, "count": len(ids), "max_model_len": llm.max_seq_len}

    @app.post("/detokenize", dependencies=[Depends(check_key)])
    async def detokenize(request: Request):
        data = await _json(request)
        ids = data.get("tokens") if isinstance(data, dict) else None
        if not isinstance(ids, list) or not all(isinstance(t, int) for t in ids):
            raise RequestError("tokens must be a list of token ids", "tokens")
        try:
            ids = llm._ids(ids, bos=False, what="tokens")
        except ValueError as e:
            raise RequestError(str(e), "tokens") from None
        return {"prompt": llm.tokenizer.decode(ids)}

    def _chat_prompt(body: ChatRequest) -> tuple[str, bool]:
        """The chat prompt's text and whether it opens with thinking."""
        think, effort = body.thinking(default=thinking)
        conversation = body.conversation()  # its RequestErrors name their own fields
        try:
            # the checkpoint's own chat template where it has one (V3 / R1), else V4's format;
            # the reply opens in reasoning where the prompt leaves it there (R1 always does)
            text, mode = llm.tokenizer.chat_prompt(conversation, thinking=think, reasoning_effort=effort)
            return text, mode == "thinking"
        except ValueError as e:
            raise RequestError(str(e), "messages") from None

    def _chat_setup(body: ChatRequest, limit_field: str = "max_tokens") -> tuple[list[int], bool, object]:
        """(prompt ids, thinking, SamplingParams) of a chat request."""
        text, think = _chat_prompt(body)
        ids = body.kept(llm.tokenizer.encode(text))
        limit = body.max_completion_tokens or body.max_tokens
        room = llm.max_seq_len - len(ids)
        # no limit given: up to the context's end, or the checkpoint's max_new_tokens
        max_tokens = _room(llm, len(ids), limit, limit_field) if limit else \
            min(room, llm.sampling_defaults.get("max_tokens", room))
        if max_tokens < 1:
            raise RequestError(f"the prompt fills the context: {len(ids)} tokens, the server's max_seq_len is "
                               f"{llm.max_seq_len}", "messages", code="context_length_exceeded")
        want = (body.top_logprobs or 0) if body.logprobs else None
        # the parser needs </think> and the tool-call markup, which are special tokens
        structured = body.output_format(think, llm.tokenizer)
        params = body.sampling(max_tokens, want, skip_special_tokens=False, structured=structured,
                               defaults=llm.sampling_defaults, lora=body.model if body.model in adapters else None)
        return ids, think, params

    @v1.post("/completions")
    async def completions(request: Request):
        body = _parse(await _json(request), CompletionRequest)
        body.check()
        prompts = [body.kept(_prompt_ids(llm, p, i)) for i, p in enumerate(body.prompts())]
        want = body.logprobs
        if body.max_tokens is None:  # the API's 16, or the checkpoint's max_new_tokens within the context
            gen = llm.sampling_defaults.get("max_tokens")
            limits = [16 if gen is None else max(1, min(gen, llm.max_seq_len - len(ids))) for ids in prompts]
        else:
            limits = [body.max_tokens] * len(prompts)
        params = [body.sampling(_room(llm, len(ids), m, "max_tokens"), want, defaults=llm.sampling_defaults,
                                lora=body.model if body.model in adapters else None,
                                prompt_logprobs=want if body.echo and want is not None else None)
                  for ids, m in zip(prompts, limits)]
        reqs = _submit(engine, prompts, params)
        texts = [p if isinstance(p, str) and not body.truncate_prompt_tokens else llm.tokenizer.decode(ids)
                 for p, ids in zip(body.prompts(), prompts)]
        rid, n = new_id("cmpl"), body.n

        def chunk(choices, use=None):
            return _chunk(rid, "text_completion", model_name, choices, use)

        if body.stream:
            async def events():
                echoed, produced, offset = set(), 0, {}
                async for i, d in _merged(reqs):
                    k = i * n + d.sample
                    text = d.text
                    if body.echo and k not in echoed:
                        echoed.add(k)
                        text = texts[i] + text
                    lp = None
                    if want is not None:  # text_offset: where each token starts in this choice's text
                        lp = tokens.completion(d.token_ids, d.logprobs, offset.get(k, 0), want)
                        offset[k] = offset.get(k, 0) + sum(map(len, lp["tokens"]))
                    produced += len(d.token_ids)
                    yield chunk([{"index": k, "text": text, "logprobs": lp, "finish_reason": _reason(d.finish_reason)}],
                                usage(sum(map(len, prompts)), produced) if body.continuous_usage else None)
                if body.include_usage:
                    yield chunk([], _usage(reqs, prompts))
            return _sse(events(), reqs)

        await _collect(reqs, request)
        choices = []
        for i, r in enumerate(reqs):
            for j, o in enumerate(r.outputs):
                text, lp = o.text, None
                if want is not None:
                    ids, entries = o.token_ids, o.logprobs
                    if body.echo:
                        ids = prompts[i] + ids
                        entries = list(o.prompt_logprobs or [None] * len(prompts[i])) + entries
                    lp = tokens.completion(ids, entries, 0, want)
                if body.echo:
                    text = texts[i] + text
                choices.append({"index": i * n + j, "text": text, "logprobs": lp,
                                "finish_reason": _reason(o.finish_reason)})
        return chunk(choices, _usage(reqs, prompts))

    @v1.post("/chat/completions")
    async def chat_completions(request: Request):
        body = _parse(await _json(request), ChatRequest)
        ids, think, params = _chat_setup(body)
        want = params.logprobs
        [req] = _submit(engine, [ids], [params])
        rid, n = new_id("chatcmpl"), body.n

        def chunk(choices, use=None):
            return _chunk(rid, "chat.completion.chunk", model_name, choices, use)

        if body.stream:
            async def events():
                parsers, produced = [ChatText(think, llm.tokenizer) for _ in range(n)], 0
                for j in range(n):
                    yield chunk([{"index": j, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                  "finish_reason": None}])
                async for _, d in _merged([req]):
                    p = parsers[d.sample]
                    seen = len(p.tool_calls)
                    evs = p.feed(d.text, d.finish_reason is not None)
                    delta = ChatText.delta(evs, p.tool_calls[seen:])
                    lp = {"content": tokens.chat(d.token_ids, d.logprobs, want)} if want is not None else None
                    reason = _reason(d.finish_reason, bool(p.tool_calls))
                    produced += len(d.token_ids)
                    if delta or lp or reason:
                        yield chunk([{"index": d.sample, "delta": delta, "logprobs": lp, "finish_reason": reason}],
                                    usage(len(ids), produced) if body.continuous_usage else None)
                if body.include_usage:
                    yield chunk([], _usage([req], [ids]))
            return _sse(events(), [req])

        await _collect([req], request)
        choices = []
        for j, o in enumerate(req.outputs):
            p = ChatText(think, llm.tokenizer)
            p.feed(o.text, True)
            message = {"role": "assistant", "content": p.content or (None if p.tool_calls else ""),
                       "reasoning_content": p.reasoning or None}
            if p.tool_calls:
                message["tool_calls"] = [{k: v for k, v in c.items() if k != "index"} for c in p.tool_calls]
            lp = {"content": tokens.chat(o.token_ids, o.logprobs, want)} if want is not None else None
            choices.append({"index": j, "message": message, "logprobs": lp,
                            "finish_reason": _reason(o.finish_reason, bool(p.tool_calls))})
        return _chunk(rid, "chat.completion", model_name, choices, _usage([req], [ids]))

    @v1.post("/responses")
    async def responses(request: Request):
        body = _parse(await _json(request), ResponsesRequest)
        previous = stored.conversation(body.previous_response_id) if body.previous_response_id else None
        chat = body.chat(previous)
        ids, think, params = _chat_setup(chat, "max_output_tokens")
        [req] = _submit(engine, [ids], [params])
        writer = ResponseWriter(body, new_id("resp"), model_name, now())
        think_end = llm.tokenizer.token_to_id(THINK_END)

        def finish(out) -> list[dict]:
            events = writer.finish(out.finish_reason, response_usage(len(ids), out, think_end, think))
            if body.store is not False:
                stored.put(writer.final, chat.messages, body.instructions)
            return events

        def step(p: ChatText, text: str, final: bool) -> list[dict]:
            seen = len(p.tool_calls)
            evs = p.feed(text, final)
            return writer.feed(evs, p.tool_calls[seen:])

        if body.stream:
            async def events():
                for e in writer.start():
                    yield e
                p, out = ChatText(think, llm.tokenizer), None
                async for _, d in _merged([req]):
                    for e in step(p, d.text, d.finish_reason is not None):
                        yield e
                    if d.finish_reason is not None:
                        out = req.outputs[0]
                if out is not None:
                    for e in finish(out):
                        yield e
            return _sse(events(), [req], named=True)

        await _collect([req], request)
        o = req.outputs[0]
        step(ChatText(think, llm.tokenizer), o.text, True)
        finish(o)
        return writer.final

    @v1.get("/responses/{rid}")
    async def get_response(rid: str):
        return stored.response(rid)

    @v1.delete("/responses/{rid}")
    async def delete_response(rid: str):
        return stored.delete(rid)

    def _check_model(name):
        if name not in (None, "", model_name, *adapters):
            also = f" and its LoRA adapters {', '.join(f'`{a}`' for a in adapters)}" if adapters else ""
            raise RequestError(f"The model `{name}` does not exist (this server serves `{model_name}`{also})",
                               "model", status=404, code="model_not_found")

    def _parse(data, cls):
        if not isinstance(data, dict):
            raise RequestError("the request body must be a JSON object")
        try:
            body = cls.model_validate(data)
        except ValidationError as e:
            raise RequestError(_validation_message(e), _first_field(e)) from None
        _check_model(body.model)
        return body

    app.include_router(v1)
    return app


# ---------------------------------------------------------------------- helpers
async def _json(request: Request):
    raw = await request.body()
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RequestError(f"the request body is not valid JSON: {e}") from None


def _validation_message(e: ValidationError) -> str:
    parts = []
    for err in e.errors()[:5]:
        where = ".".join(str(x) for x in err["loc"] if not (isinstance(x, str) and "[" in x)) or "body"
        msg = "unknown field (not part of the API)" if err["type"] == "extra_forbidden" else err["msg"]
        parts.append(f"{where}: {msg}")
    return "; ".join(parts)


def _first_field(e: ValidationError) -> str | None:
    errs = e.errors()
    return str(errs[0]["loc"][0]) if errs and errs[0]["loc"] else None


def _prompt_ids(llm: LLM, p, i: int) -> list[int]:
    try:
        ids = llm._ids(p, bos=True, what=f"prompt {i}")  # text gets the engine's BOS; token ids stay as given
    except ValueError as e:
        raise RequestError(str(e), "prompt") from None
    if not ids:
        raise RequestError(f"prompt {i} is empty", "prompt")
    return ids


def _room(llm: LLM, n_prompt: int, max_tokens: int, field: str) -> int:
    """``max_tokens`` if the prompt and the completion fit the context, else a 400 saying so."""
    if n_prompt + max_tokens > llm.max_seq_len:
        raise RequestError(f"This model's maximum context length is {llm.max_seq_len} tokens. However, you requested "
                           f"{n_prompt + max_tokens} tokens ({n_prompt} in the prompt, {max_tokens} in the completion). "
                           f"Please reduce the prompt or {field}.", field, code="context_length_exceeded")
    return max_tokens


def _submit(engine: AsyncEngine, prompts: list[list[int]], params) -> list:
    reqs = []
    try:
        for ids, sp in zip(prompts, params):
            reqs.append(engine.submit(ids, sp))
    except EngineBusy as e:
        for r in reqs:
            r.abort()
        raise RequestError(str(e), status=503, kind="server_error", code="overloaded") from None
    except (ValueError, ImportError) as e:  # ImportError: structured outputs without xgrammar
        for r in reqs:
            r.abort()
        raise RequestError(str(e)) from None
    return reqs


def _chunk(rid: str, obj: str, model: str, choices: list, use: dict | None = None) -> dict:
    c = {"id": rid, "object": obj, "created": now(), "model": model, "choices": choices}
    if use is not None:
        c["usage"] = use
    return c


def _reason(finish: str | None, tool_calls: bool = False) -> str | None:
    if finish is None:
        return None
    return "tool_calls" if tool_calls and finish == "stop" else finish


def _usage(reqs, prompts) -> dict:
    done = sum(len(o.token_ids) for r in reqs for o in r.outputs)
    return usage(sum(map(len, prompts)), done, sum(r.outputs[0].num_cached_tokens for r in reqs))


async def _merged(reqs) -> AsyncIterator[tuple[int, StreamDelta]]:
    """The deltas of several requests as they come: (request index, delta)."""
    if len(reqs) == 1:
        async for d in reqs[0]:
            yield 0, d
        return
    q: asyncio.Queue = asyncio.Queue()

    async def pump(i, r):
        try:
            async for d in r:
                await q.put((i, d))
        except Exception as e:
            await q.put((i, e))
        finally:
            await q.put((i, None))

    tasks = [asyncio.create_task(pump(i, r)) for i, r in enumerate(reqs)]
    try:
        left = len(reqs)
        while left:
            i, d = await q.get()
            if d is None:
                left -= 1
            elif isinstance(d, Exception):
                raise d
            else:
                yield i, d
    finally:
        for t in tasks:
            t.cancel()
        for r in reqs:
            r.abort()


async def _collect(reqs, request: Request) -> None:
    """Wait until every completion of every request is whole (``Request.outputs``); abort them if
    the client disconnects meanwhile."""
    async def gather():
        async for _ in _merged(reqs):
            pass

    async def watch():
        while not await request.is_disconnected():
            await asyncio.sleep(0.25)

    work, watcher = asyncio.create_task(gather()), asyncio.create_task(watch())
    try:
        await asyncio.wait({work, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not work.done():  # the client went away: nobody will read the answer
            work.cancel()
            for r in reqs:
                r.abort()
    if work.cancelled():
        raise RequestError("client disconnected", status=499)
    try:
        work.result()
    except EngineError as e:
        raise RequestError(f"the engine failed: {e}", status=500, kind="server_error") from None


def _sse(events: AsyncIterator[dict], reqs, named: bool = False) -> StreamingResponse:
    """Server-sent events; ``named``: the Responses API's (each event named by its type, an error as
    an ``error`` event, no ``[DONE]``)."""
    async def body():
        try:
            async for c in events:
                head = f"event: {c['type']}\n" if named else ""
                yield f"{head}data: {json.dumps(c, ensure_ascii=False)}\n\n"
        except EngineError as e:
            err = error_body(f"the engine failed: {e}", "server_error")
            if named:
                err = {"type": "error", "code": "server_error", "message": err["error"]["message"], "param": None}
            yield ("event: error\n" if named else "") + f"data: {json.dumps(err)}\n\n"
        finally:  # also when the client disconnects (the generator is closed)
            for r in reqs:
                r.abort()
        if not named:
            yield "data: [DONE]\n\n"

    return StreamingResponse(body(), media_type="text/event-stream")


def serve(llm: LLM, host: str = "127.0.0.1", port: int = 8000, **kw) -> None:
    """Serve ``llm`` until interrupted (``build_app``'s keywords: model_name, api_key, ...)."""
    import uvicorn

    uvicorn.run(build_app(llm, **kw), host=host, port=port, log_level="info")
