"""OpenAI's Responses API (``POST /v1/responses``) on the chat machinery: the request's input items
become a DeepSeek-V4 conversation (a ``ChatRequest``), the reply's reasoning, text and tool calls
become output items, and a stream gives the API's typed events (``response.created`` ...
``response.output_text.delta`` ... ``response.completed``).

Responses are kept in memory (``store``, on by default as in OpenAI's API; the last
``ResponseStore.capacity`` of them) so that ``previous_response_id`` continues a conversation
(its input and output, not its ``instructions``), ``GET /v1/responses/{id}`` reads one back and
``DELETE`` forgets it. A restart forgets them all.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from sparseek.serve.protocol import ChatRequest, RequestError, new_id
from sparseek.tokenizer.chat import ReasoningDelta, ToolCall

EFFORTS = ("none", "minimal", "low", "medium", "high", "xhigh", "max")


class ResponsesRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    input: str | list[Any]
    instructions: str | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    reasoning: dict[str, Any] | None = None
    text: dict[str, Any] | None = None
    stream: bool = False
    store: bool | None = None
    previous_response_id: str | None = None
    truncation: Literal["disabled"] | None = None
    metadata: dict[str, str] | None = None
    include: list[str] | None = None
    user: str | None = None  # accepted for compatibility: not used
    service_tier: str | None = None
    # vLLM's extras
    seed: int | None = None
    top_k: int | None = Field(None, ge=-1)

    def chat(self, previous: list[dict[str, Any]] | None = None) -> ChatRequest:
        """The same request as a chat completion (one reply, not streamed: streaming is done here);
        ``previous``: the conversation of ``previous_response_id``, which this input continues."""
        effort = (self.reasoning or {}).get("effort")
        if effort is not None and effort not in EFFORTS:
            raise RequestError(f"reasoning.effort must be one of {', '.join(EFFORTS)}", "reasoning")
        # sampling fields the request leaves out stay unset, so the checkpoint's generation_config fills them
        given = {k: v for k, v in (("temperature", self.temperature), ("top_p", self.top_p), ("top_k", self.top_k))
                 if v is not None}
        return ChatRequest(
            model=self.model, messages=self.messages(previous or []), tools=self._tools(),
            tool_choice=self._tool_choice(), parallel_tool_calls=self.parallel_tool_calls,
            max_tokens=self.max_output_tokens, seed=self.seed, response_format=self._format(),
            reasoning_effort=effort, **given)

    def messages(self, previous: list[dict[str, Any]] = ()) -> list[dict[str, Any]]:
        """``instructions``, the ``previous`` conversation and ``input`` as chat messages: message
        items by role; a reasoning item goes with the assistant turn after it; function calls join
        the assistant turn before them (or start one); function call outputs are tool results."""
        msgs: list[dict[str, Any]] = [{"role": "system", "content": self.instructions}] if self.instructions else []
        msgs += [dict(m) for m in previous]
        items = [{"role": "user", "content": self.input}] if isinstance(self.input, str) else self.input
        if not items:
            raise RequestError("input is empty", "input")
        reasoning: str | None = None
        for i, item in enumerate(items):
            where = f"input[{i}]"
            if not isinstance(item, dict):
                raise RequestError(f"{where} must be an object", "input")
            kind = item.get("type", "message")
            if kind == "message":
                role = item.get("role")
                if role not in ("user", "system", "developer", "assistant"):
                    raise RequestError(f"{where}.role must be user, system, developer or assistant", "input")
                msgs.append({"role": role, "content": _text(item.get("content"), where)})
                if role == "assistant" and reasoning is not None:
                    msgs[-1]["reasoning_content"], reasoning = reasoning, None
            elif kind == "reasoning":
                reasoning = _text(item.get("content") or [], where)
            elif kind == "function_call":
                call = {k: item.get(k) for k in ("call_id", "name", "arguments")}
                if not all(isinstance(v, str) for v in call.values()):
                    raise RequestError(f"{where}: a function_call needs call_id, name and arguments (strings)", "input")
                tc = {"id": call["call_id"], "type": "function",
                      "function": {"name": call["name"], "arguments": call["arguments"]}}
                if msgs and msgs[-1]["role"] == "assistant":
                    msgs[-1].setdefault("tool_calls", []).append(tc)
                else:
                    msgs.append({"role": "assistant", "content": "", "tool_calls": [tc]})
                    if reasoning is not None:
                        msgs[-1]["reasoning_content"], reasoning = reasoning, None
            elif kind == "function_call_output":
                if not isinstance(item.get("call_id"), str):
                    raise RequestError(f"{where}: a function_call_output needs its call_id", "input")
                msgs.append({"role": "tool", "tool_call_id": item["call_id"],
                             "content": _text(item.get("output"), where)})
            else:
                raise RequestError(f"{where}: item type {kind!r} is not supported (message, reasoning, function_call, "
                                   "function_call_output)", "input")
        return msgs

    def _tools(self) -> list[dict[str, Any]] | None:
        if not self.tools:
            return None
        out = []
        for j, t in enumerate(self.tools):
            if t.get("type") != "function" or not isinstance(t.get("name"), str):
                raise RequestError(f"tools[{j}]: only function tools ({{'type': 'function', 'name': ..., "
                                   "'parameters': {...}}) are supported", "tools")
            keep = ("name", "description", "parameters", "strict")
            out.append({"type": "function", "function": {k: t[k] for k in keep if t.get(k) is not None}})
        return out

    def _tool_choice(self):
        c = self.tool_choice
        if isinstance(c, dict):
            if c.get("type") != "function" or not isinstance(c.get("name"), str):
                raise RequestError("tool_choice must be 'none', 'auto', 'required' or {'type': 'function', "
                                   "'name': ...}", "tool_choice")
            return {"type": "function", "function": {"name": c["name"]}}
        return c

    def _format(self) -> dict[str, Any] | None:
        fmt = (self.text or {}).get("format")
        if fmt is None or fmt.get("type") in ("text", "json_object"):
            return fmt
        if fmt.get("type") == "json_schema":
            return {"type": "json_schema", "json_schema": {"name": fmt.get("name", "output"),
                                                           "schema": fmt.get("schema", True)}}
        raise RequestError("text.format.type must be text, json_object or json_schema", "text")


def _text(content, where: str) -> str:
    """Text of a string or of a list of text parts (input_text / output_text / reasoning_text / text)."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise RequestError(f"{where}.content must be a string or a list of text parts", "input")
    texts = []
    for j, part in enumerate(content):
        if not (isinstance(part, dict) and part.get("type") in ("input_text", "output_text", "reasoning_text", "text")
                and isinstance(part.get("text"), str)):
            raise RequestError(f"{where}.content[{j}]: only text parts are supported", "input")
        texts.append(part["text"])
    return "".join(texts) if all(p.get("type") == "reasoning_text" for p in content) else "\n".join(texts)


class ResponseWriter:
    """One response's output items, built from the chat parser's events as they come, and the
    stream events that tell a client about them (each numbered: ``sequence_number``)."""

    def __init__(self, body: ResponsesRequest, rid: str, model: str, created: int):
        self.body, self.id, self.model, self.created = body, rid, model, created
        self.output: list[dict] = []
        self.open: dict | None = None  # the reasoning or message item text is streaming into
        self.seq = 0

    def response(self, status: str, usage: dict | None = None, incomplete: str | None = None) -> dict:
        b = self.body
        fmt = (b.text or {}).get("format") or {"type": "text"}
        return {
            "id": self.id, "object": "response", "created_at": self.created, "status": status,
            "error": None, "incomplete_details": {"reason": incomplete} if incomplete else None,
            "instructions": b.instructions, "max_output_tokens": b.max_output_tokens, "model": self.model,
            "output": list(self.output), "parallel_tool_calls": b.parallel_tool_calls is not False,
            "previous_response_id": b.previous_response_id,
            "reasoning": {"effort": (b.reasoning or {}).get("effort"), "summary": None},
            "store": b.store is not False, "temperature": 1.0 if b.temperature is None else b.temperature,
            "text": {"format": fmt}, "tool_choice": b.tool_choice or "auto", "tools": b.tools or [],
            "top_p": 1.0 if b.top_p is None else b.top_p, "truncation": "disabled", "usage": usage,
            "user": b.user, "metadata": b.metadata or {}}

    def start(self) -> list[dict]:
        r = self.response("in_progress")
        return [self._event("response.created", response=r), self._event("response.in_progress", response=r)]

    def feed(self, events: list, calls: list[dict]) -> list[dict]:
        """Stream events for the parser's ``events`` (``calls``: its new tool calls, with ids)."""
        out: list[dict] = []
        calls = list(calls)
        for ev in events:
            if isinstance(ev, ToolCall):
                out += self._close()
                out += self._call(calls.pop(0))
            elif ev.text:
                kind = "reasoning" if isinstance(ev, ReasoningDelta) else "message"
                if self.open is None or self.open["type"] != kind:
                    out += self._close() + self._begin(kind)
                self.open["_text"] += ev.text
                name = "response.reasoning_text.delta" if kind == "reasoning" else "response.output_text.delta"
                extra = {} if kind == "reasoning" else {"logprobs": []}
                out.append(self._event(name, item_id=self.open["id"], output_index=len(self.output) - 1,
                                       content_index=0, delta=ev.text, **extra))
        return out

    def finish(self, finish_reason: str | None, usage: dict) -> list[dict]:
        """The closing events; ``self.final`` is the whole response."""
        out = self._close()
        incomplete = "max_output_tokens" if finish_reason == "length" else None
        self.final = self.response("incomplete" if incomplete else "completed", usage, incomplete)
        return out + [self._event("response.incomplete" if incomplete else "response.completed", response=self.final)]

    def _event(self, kind: str, **fields) -> dict:
        self.seq += 1
        return {"type": kind, "sequence_number": self.seq - 1, **fields}

    def _begin(self, kind: str) -> list[dict]:
        if kind == "reasoning":
            self.open = {"id": new_id("rs"), "type": "reasoning", "summary": [], "content": [], "status": "in_progress"}
            part = {"type": "reasoning_text", "text": ""}
        else:
            self.open = {"id": new_id("msg"), "type": "message", "status": "in_progress", "role": "assistant",
                         "content": []}
            part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
        self.output.append(self.open)
        item = {k: v for k, v in self.open.items()}
        self.open["_text"] = ""
        return [self._event("response.output_item.added", output_index=len(self.output) - 1, item=item),
                self._event("response.content_part.added", item_id=item["id"], output_index=len(self.output) - 1,
                            content_index=0, part=part)]

    def _close(self) -> list[dict]:
        if self.open is None:
            return []
        item, self.open = self.open, None
        text, i = item.pop("_text"), len(self.output) - 1
        if item["type"] == "reasoning":
            part = {"type": "reasoning_text", "text": text}
            done = self._event("response.reasoning_text.done", item_id=item["id"], output_index=i, content_index=0,
                               text=text)
        else:
            part = {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
            done = self._event("response.output_text.done", item_id=item["id"], output_index=i, content_index=0,
                               text=text, logprobs=[])
        item["content"], item["status"] = [part], "completed"
        return [done, self._event("response.content_part.done", item_id=item["id"], output_index=i, content_index=0,
                                  part=part),
                self._event("response.output_item.done", output_index=i, item=dict(item))]

    def _call(self, call: dict) -> list[dict]:
        fn = call["function"]
        item = {"id": new_id("fc"), "type": "function_call", "status": "in_progress", "call_id": call["id"],
                "name": fn["name"], "arguments": ""}
        self.output.append(item)
        i = len(self.output) - 1
        added = self._event("response.output_item.added", output_index=i, item=dict(item))
        item.update(arguments=fn["arguments"], status="completed")
        return [added,
                self._event("response.function_call_arguments.delta", item_id=item["id"], output_index=i,
                            delta=fn["arguments"]),
                self._event("response.function_call_arguments.done", item_id=item["id"], output_index=i,
                            name=fn["name"], arguments=fn["arguments"]),
                self._event("response.output_item.done", output_index=i, item=dict(item))]


def response_usage(prompt_tokens: int, out, think_end: int | None, thinking: bool) -> dict:
    """The Responses API's usage of the finished ``out`` (a ``RequestOutput``); reasoning tokens:
    those up to and including ``</think>``; cached: the prompt tokens the prefix cache spared."""
    token_ids, n = out.token_ids, len(out.token_ids)
    reasoning = (token_ids.index(think_end) + 1 if think_end in token_ids else n) if thinking else 0
    return {"input_tokens": prompt_tokens, "input_tokens_details": {"cached_tokens": out.num_cached_tokens},
            "output_tokens": n, "output_tokens_details": {"reasoning_tokens": reasoning},
            "total_tokens": prompt_tokens + n}


def reply_message(output: list[dict]) -> dict[str, Any] | None:
    """A response's output items as the assistant chat message they stand for (None: no items)."""
    msg: dict[str, Any] = {"role": "assistant", "content": ""}
    for item in output:
        if item["type"] == "reasoning":
            msg["reasoning_content"] = "".join(p["text"] for p in item["content"])
        elif item["type"] == "message":
            msg["content"] += "".join(p["text"] for p in item["content"])
        elif item["type"] == "function_call":
            msg.setdefault("tool_calls", []).append({"id": item["call_id"], "type": "function", "function": {
                "name": item["name"], "arguments": item["arguments"]}})
    return msg if output else None


class ResponseStore:
    """The last ``capacity`` stored responses: each with the conversation that produced it and its
    reply (what ``previous_response_id`` continues), oldest forgotten first."""

    def __init__(self, capacity: int = 1024):
        self.capacity = capacity
        self.items: OrderedDict[str, tuple[list[dict], dict]] = OrderedDict()

    def put(self, response: dict, conversation: list[dict], instructions: str | None) -> None:
        """Keep ``response`` with ``conversation`` (its prompt's messages, ``instructions`` left out:
        a continuation does not inherit them) and its reply."""
        if self.capacity <= 0:
            return
        msgs = conversation[1:] if instructions else list(conversation)
        reply = reply_message(response["output"])
        self.items[response["id"]] = (msgs + ([reply] if reply else []), response)
        while len(self.items) > self.capacity:
            self.items.popitem(last=False)

    def _get(self, rid: str, param: str | None) -> tuple[list[dict], dict]:
        if rid not in self.items:
            raise RequestError(f"Response with id '{rid}' not found (this server keeps the last {self.capacity} "
                               "stored responses, in memory)", param, status=404, code="response_not_found")
        self.items.move_to_end(rid)
        return self.items[rid]

    def conversation(self, rid: str) -> list[dict]:
        return self._get(rid, "previous_response_id")[0]

    def response(self, rid: str) -> dict:
        return self._get(rid, None)[1]

    def delete(self, rid: str) -> dict:
        self._get(rid, None)
        del self.items[rid]
        return {"id": rid, "object": "response", "deleted": True}
