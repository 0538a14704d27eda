"""The OpenAI API's request and response shapes, and their mapping onto the engine.

Requests are checked field by field (pydantic): a wrong type, a value out of range or a field
the API does not have is answered with HTTP 400 naming it, never ignored. vLLM's extra sampling
fields (``top_k``, ``min_p``, ``repetition_penalty``, ``min_tokens``, ``ignore_eos``,
``stop_token_ids``, ``skip_special_tokens``, ``include_stop_str_in_output``, ``allowed_token_ids``,
``bad_words``, ``truncate_prompt_tokens``) are accepted, and for chat its
``chat_template_kwargs`` (``{"thinking": true}``) as DeepSeek's models are served there.
"""

from __future__ import annotations

import json
import secrets
import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from sparseek.engine.sampling import SamplingParams
from sparseek.tokenizer.chat import (ChatFormatError, ContentDelta, ReasoningDelta, StreamingChatParser, ToolCall,
                                     reply_format)


class RequestError(ValueError):
    """A request the server refuses: HTTP ``status`` with an OpenAI-style error body."""

    def __init__(self, message: str, param: str | None = None, status: int = 400,
                 code: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.param, self.status, self.code, self.kind = param, status, code, kind

    def body(self) -> dict:
        return error_body(str(self), self.kind, self.param, self.code)


def error_body(message: str, kind: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False
    continuous_usage_stats: bool = False  # vLLM: usage on every chunk


class _Sampling(BaseModel):
    """Fields both endpoints share."""

    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int = Field(1, ge=1, le=128)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None
    seed: int | None = None
    user: str | None = None  # accepted for compatibility: not used
    # vLLM's extras
    top_k: int | None = Field(None, ge=-1)
    min_p: float = Field(0.0, ge=0, le=1)
    repetition_penalty: float = Field(1.0, gt=0)
    min_tokens: int = Field(0, ge=0)
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    allowed_token_ids: list[int] | None = None
    bad_words: list[str] | None = None
    truncate_prompt_tokens: int | None = Field(None, ge=1)
    guided_json: dict[str, Any] | str | bool | None = None  # vLLM's structured outputs (need xgrammar)
    guided_regex: str | None = None

    def structured(self) -> dict:
        """``json_schema`` / ``regex`` for the engine from vLLM's ``guided_json`` / ``guided_regex``."""
        if self.guided_json is not None and self.guided_regex is not None:
            raise RequestError("give guided_json or guided_regex, not both", "guided_regex")
        schema = self.guided_json
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except json.JSONDecodeError as e:
                raise RequestError(f"guided_json is not JSON: {e}", "guided_json") from None
        if schema is False or not (schema is None or schema is True or isinstance(schema, dict)):
            raise RequestError("guided_json must be a JSON schema object", "guided_json")
        return {"json_schema": schema, "regex": self.guided_regex}

    def sampling(self, max_tokens: int, logprobs: int | None, prompt_logprobs: int | None = None,
                 skip_special_tokens: bool | None = None, structured: dict | None = None,
                 defaults: dict | None = None, lora: str | None = None) -> SamplingParams:
        """The engine's parameters; ``defaults`` (the checkpoint's generation_config.json, as vLLM
        applies it) fill the sampling fields the request leaves out."""
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stop) > 16:
            raise RequestError("at most 16 stop sequences", "stop")
        if self.min_tokens > max_tokens:
            raise RequestError(f"min_tokens ({self.min_tokens}) is larger than max_tokens ({max_tokens})",
                               "min_tokens")
        try:
            bias = {int(k): v for k, v in (self.logit_bias or {}).items()}
        except ValueError:
            raise RequestError("logit_bias keys must be token ids", "logit_bias") from None
        if any(not -100 <= v <= 100 for v in bias.values()):
            raise RequestError("logit_bias values must be in [-100, 100]", "logit_bias")
        given = {k: getattr(self, k) for k in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")
                 if k in self.model_fields_set or k not in (defaults or {})}
        given = {**{k: (defaults or {})[k] for k in ("temperature", "top_p", "top_k", "min_p",
                                                    "repetition_penalty") if k not in given}, **given}
        kw = dict(
            max_tokens=max_tokens, n=self.n,
            temperature=1.0 if given["temperature"] is None else given["temperature"],
            top_p=1.0 if given["top_p"] is None else given["top_p"],
            top_k=max(0, given["top_k"] or 0), min_p=given["min_p"], seed=self.seed, stop=stop,
            stop_token_ids=list(self.stop_token_ids or []), ignore_eos=self.ignore_eos,
            min_tokens=self.min_tokens, repetition_penalty=given["repetition_penalty"],
            presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
            logit_bias=bias or None, logprobs=logprobs, prompt_logprobs=prompt_logprobs, lora=lora,
            include_stop_str_in_output=self.include_stop_str_in_output, allowed_token_ids=self.allowed_token_ids,
            bad_words=self.bad_words, truncate_prompt_tokens=self.truncate_prompt_tokens,
            skip_special_tokens=self.skip_special_tokens if skip_special_tokens is None else skip_special_tokens,
            **(self.structured() if structured is None else structured))
        try:
            return SamplingParams(**kw)
        except ValueError as e:  # "SamplingParams.x must be ...": name the request's field
            raise RequestError(str(e).replace("SamplingParams.", ""), str(e).split(".")[1].split(" ")[0]) from None

    def kept(self, ids: list[int]) -> list[int]:
        """The prompt tokens the engine reads: the last ``truncate_prompt_tokens`` of them, if set
        (truncated here, before the context checks, so that a prompt too long fits once cut)."""
        return ids[-self.truncate_prompt_tokens:] if self.truncate_prompt_tokens else ids

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    @property
    def continuous_usage(self) -> bool:
        """vLLM's ``continuous_usage_stats``: usage so far on every chunk."""
        return bool(self.stream_options and self.stream_options.continuous_usage_stats)


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = Field(None, ge=1)

    def check(self) -> None:
        if self.suffix:
            raise RequestError("suffix (fill-in-the-middle) is not supported", "suffix")
        if self.best_of is not None and self.best_of != self.n:
            raise RequestError("best_of other than n is not supported", "best_of")
        if self.stream and self.echo and self.logprobs is not None:
            raise RequestError("echo with logprobs is not supported when streaming", "echo")

    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if not p:
            raise RequestError("prompt is empty", "prompt")
        if isinstance(p[0], int):
            return [p]
        return list(p)


class ChatRequest(_Sampling):
    messages: list[dict[str, Any]] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    response_format: dict[str, Any] | None = None
    reasoning_effort: Literal["none", "minimal", "low", "medium", "high", "xhigh", "max"] | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    # accepted for compatibility: not used
    store: bool | None = None
    metadata: dict[str, str] | None = None
    service_tier: str | None = None

    def thinking(self, default: bool) -> tuple[bool, str | None]:
        """(thinking mode, DeepSeek's reasoning effort): ``chat_template_kwargs`` ``thinking`` /
        ``enable_thinking`` / ``reasoning_effort`` first, then ``reasoning_effort``."""
        kw = dict(self.chat_template_kwargs or {})
        unknown = set(kw) - {"thinking", "enable_thinking", "reasoning_effort"}
        if unknown:
            raise RequestError(f"unknown chat_template_kwargs: {sorted(unknown)} (known: thinking, "
                               "enable_thinking, reasoning_effort)", "chat_template_kwargs")
        effort = kw.get("reasoning_effort", self.reasoning_effort)
        on = kw.get("thinking", kw.get("enable_thinking"))
        if on is None:
            on = default if effort is None else effort not in ("none", "minimal")
        if not isinstance(on, bool):
            raise RequestError("chat_template_kwargs.thinking must be true or false", "chat_template_kwargs")
        return on, ({"high": "high", "xhigh": "max", "max": "max"}.get(effort) if on else None)

    def output_format(self, thinking: bool, tokenizer=None) -> dict:
        """What the reply is held to, token by token: the tool calls a forcing ``tool_choice`` asks
        for ("required" or a named function, each call's arguments held to its tool's schema), the
        calls a free answer may end in when a tool is ``strict`` (all tools' arguments then held),
        or the structured output ``response_format`` (or ``guided_json`` / ``guided_regex``) asks for.
        In thinking mode the reasoning before ``</think>`` stays free. Tool calls take the markup
        of ``tokenizer``'s chat format (V4's DSML, or the layout its own template writes)."""
        fmt, found = self.response_format or {}, self.structured()
        kind = fmt.get("type", "text")
        if kind == "json_schema":
            spec = fmt.get("json_schema")
            if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict):
                raise RequestError("response_format.json_schema must be {'name': ..., 'schema': {...}}",
                                   "response_format")
            found = {"json_schema": spec.get("schema", True), "regex": None}
        elif kind == "json_object":
            found = {"json_schema": {"type": "object"}, "regex": None}
        elif kind != "text":
            raise RequestError("response_format.type must be text, json_object or json_schema", "response_format")
        forced = self.forced_tool()
        strict = forced is None and self.tool_choice != "none" and any(
            isinstance(t, dict) and isinstance(t.get("function"), dict) and t["function"].get("strict") is True
            for t in self.tools or ())
        if (forced is not None or strict) and (found["json_schema"] is not None or found["regex"] is not None):
            what = "a forcing tool_choice" if forced is not None else "a strict tool"
            raise RequestError(f"{what} holds the reply to tool calls: give it or a structured output "
                               "(response_format / guided_json / guided_regex), not both", "tool_choice")
        markup = None
        if (forced is not None or strict) and tokenizer is not None:
            try:
                markup = tokenizer.tool_markup()
            except ChatFormatError as e:
                raise RequestError(str(e), "tool_choice") from None
        if strict:  # the answer stays free; a tool-call block it opens is held to the tools' schemas
            forced = "auto"
        if forced is None and (not thinking or (found["json_schema"] is None and found["regex"] is None)):
            return found  # free, or held to JSON / regex from its first token
        try:
            tag = reply_format(thinking, tools=self.tools, tool_choice=forced,
                               parallel_tool_calls=self.parallel_tool_calls is not False, markup=markup, **found)
        except ChatFormatError as e:
            raise RequestError(str(e), "tools" if str(e).startswith("tools") else "tool_choice") from None
        return {"json_schema": None, "regex": None, "structural_tag": tag}

    def forced_tool(self) -> str | None:
        """``tool_choice`` as the reply format takes it: "required", the forced function's name, or
        None ("auto" / "none": the model chooses)."""
        choice = self.tool_choice
        if choice in (None, "auto", "none"):
            return None
        if choice == "required":
            name = choice
        elif (isinstance(choice, dict) and choice.get("type") == "function" and isinstance(choice.get("function"), dict)
              and isinstance(choice["function"].get("name"), str)):
            name = choice["function"]["name"]
        else:
            raise RequestError("tool_choice must be 'none', 'auto', 'required' or {'type': 'function', "
                               "'function': {'name': ...}}", "tool_choice")
        if not self.tools:
            raise RequestError(f"tool_choice {choice!r} forces a tool call, but the request has no tools",
                               "tool_choice")
        return name

    def conversation(self) -> list[dict[str, Any]]:
        """``messages`` as the chat format takes them: text parts joined, ``tools`` and
        ``response_format`` carried by the (first) system message, as DeepSeek's format puts them."""
        msgs = []
        for i, m in enumerate(self.messages):
            m = dict(m)
            if isinstance(m.get("content"), list):
                texts = []
                for j, part in enumerate(m["content"]):
                    if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                        raise RequestError(f"messages[{i}].content[{j}]: only text parts are supported",
                                           f"messages[{i}].content")
                    texts.append(part["text"])
                m["content"] = "\n".join(texts)
            if m.get("role") == "assistant":
                m.pop("refusal", None)
            msgs.append(m)
        extras: dict[str, Any] = {}
        self.forced_tool()  # a malformed tool_choice is named before the prompt is built
        if self.tools and self.tool_choice != "none":
            for j, t in enumerate(self.tools):
                if t.get("type", "function") != "function" or not isinstance(t.get("function"), dict):
                    raise RequestError(f"tools[{j}] must be {{'type': 'function', 'function': {{...}}}}", "tools")
            extras["tools"] = self.tools
        fmt = self.response_format
        if fmt and fmt.get("type") in ("json_schema", "json_object"):  # told, as DeepSeek's format does, and enforced
            extras["response_format"] = (fmt.get("json_schema") or {}).get("schema", {"type": "object"})
        if extras:
            k = next((k for k, m in enumerate(msgs) if m.get("role") == "system"), None)
            if k is None:
                msgs.insert(0, {"role": "system", "content": ""})
                k = 0
            msgs[k] = {**msgs[k], **extras}
        return msgs


def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int | None = None) -> dict:
    """The API's usage; ``cached_tokens``: prompt tokens the prefix cache spared (once finished)."""
    u = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
         "total_tokens": prompt_tokens + completion_tokens}
    if cached_tokens is not None:
        u["prompt_tokens_details"] = {"cached_tokens": cached_tokens}
    return u


class TokenText:
    """Token strings and bytes for log-probability reports."""

    def __init__(self, tokenizer):
        self.tok = tokenizer

    def text(self, t: int) -> str:
        return self.tok.token_bytes(t).decode("utf-8", errors="replace")

    def _item(self, t: int, logprob: float) -> dict:
        b = self.tok.token_bytes(t)
        return {"token": b.decode("utf-8", errors="replace"), "logprob": logprob, "bytes": list(b)}

    def chat(self, ids: list[int], entries: list[dict[int, float]], n: int) -> list[dict]:
        """Chat completions' ``logprobs.content`` items (``n`` alternatives each)."""
        return [{**self._item(t, e[t]),
                 "top_logprobs": [self._item(k, v) for k, v in sorted(e.items(), key=lambda kv: -kv[1])[:n]]}
                for t, e in zip(ids, entries)]

    def completion(self, ids: list[int], entries: list[dict[int, float] | None], offset: int, n: int) -> dict:
        """Completions' ``logprobs`` object (``text_offset`` counted from ``offset``)."""
        res: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for t, e in zip(ids, entries):
            s = self.text(t)
            res["tokens"].append(s)
            res["token_logprobs"].append(None if e is None else e[t])
            res["top_logprobs"].append(None if e is None else
                                       dict(sorted(((self.text(k), v) for k, v in e.items()), key=lambda kv: -kv[1])[:max(n, 1)]))
            res["text_offset"].append(offset)
            offset += len(s)
        return res


class ChatText:
    """One chat completion's text turned into reasoning, content and tool calls as it streams
    (DeepSeek-V4's format). A completion that breaks the format, or ends inside its reasoning or a
    tool-call block, loses nothing: from the text not yet shown on, it is passed on as it is
    (as reasoning if the break came while reasoning, else as content)."""

    def __init__(self, thinking: bool, tokenizer=None):
        mode = "thinking" if thinking else "chat"
        # the tokenizer knows the reply's markup (a checkpoint's own template: V3 / R1 tool calls)
        self.parser = tokenizer.reply_parser(mode) if tokenizer is not None else StreamingChatParser(mode)
        self.raw = ""
        self.broken = False
        self.reasoning = self.content = ""
        self.tool_calls: list[dict] = []

    def feed(self, text: str, final: bool) -> list:
        if self.broken:
            events = [ContentDelta(text)] if text else []
        else:
            shown, state = self.parser.consumed, self.parser.state
            self.raw += text
            try:
                events = self.parser.feed(text)
                if final:
                    events += self.parser.finish()
            except ValueError:  # events of this call were not returned: show the text they came from
                self.broken = True
                rest = self.raw[shown:]
                events = [(ReasoningDelta if state == "reasoning" else ContentDelta)(rest)] if rest else []
        for ev in events:
            if isinstance(ev, ToolCall):
                self.tool_calls.append({"index": ev.index, "id": new_id("call"), "type": "function",
                                        "function": {"name": ev.name, "arguments": ev.arguments_json}})
            elif isinstance(ev, ReasoningDelta):
                self.reasoning += ev.text
            else:
                self.content += ev.text
        return events

    @staticmethod
    def delta(events: list, calls: list[dict]) -> dict:
        """A chat chunk's ``delta`` for ``events`` (``calls``: the tool calls among them, with ids)."""
        d: dict[str, Any] = {}
        reasoning = "".join(e.text for e in events if isinstance(e, ReasoningDelta))
        content = "".join(e.text for e in events if isinstance(e, ContentDelta))
        if reasoning:
            d["reasoning_content"] = reasoning
        if content:
            d["content"] = content
        if calls:
            d["tool_calls"] = calls
        return d
