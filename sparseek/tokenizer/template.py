"""Checkpoints that ship their own Jinja chat template (DeepSeek-V3, R1, V2, V3.1 ...).

DeepSeek-V4 has no template: its format is ``sparseek.tokenizer.chat``. Earlier DeepSeek releases
put a Jinja template in ``tokenizer_config.json`` (``chat_template``), and their formats differ
from V4's: V3-0324 writes the answer straight after ``<｜Assistant｜>`` (no ``</think>``), R1
opens every reply with ``<think>\\n`` and strips old reasoning from the history. Rendering V4's
format for them puts tokens in front of the model it never saw in training, so a checkpoint's own
template wins wherever it has one -- what transformers and vLLM do.

The template is rendered as transformers renders it (a sandboxed Jinja environment with
``trim_blocks``/``lstrip_blocks``, the ``loopcontrols`` extension, ``raise_exception``,
``strftime_now`` and a ``tojson`` filter that keeps non-ASCII text), so a prompt is the same text
``AutoTokenizer.apply_chat_template`` would give (tested against it). Whether the reply opens
inside reasoning is read from the rendered prompt: one that ends in ``<think>`` (R1, V3.1 in
thinking mode) is parsed as reasoning up to ``</think>``.
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sparseek.tokenizer.chat import (EOS, THINK_END, THINK_START, ChatEvent, ChatFormatError, StreamingChatParser,
                                     ToolCall, _format_error, _json, _marker_regex)

__all__ = ["read_chat_template", "render_chat_template", "opens_reasoning", "TemplateReplyParser", "TemplateMarkup",
           "tool_call_markup"]

# DeepSeek-V3 / R1 / V3.1 tool-call markup (special tokens of their vocabulary)
CALLS_BEGIN, CALLS_END = "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>"
CALL_BEGIN, CALL_END, SEP = "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>", "<｜tool▁sep｜>"
_MARKUP = (THINK_END, EOS, CALLS_BEGIN, CALLS_END, CALL_BEGIN, CALL_END, SEP)


def read_chat_template(directory: str | None, config: dict | None) -> str | None:
    """The checkpoint's template: ``chat_template.jinja`` beside the tokenizer (transformers >= 4.43
    saves it there), else ``tokenizer_config.json``'s ``chat_template`` (a string, or a list of
    named templates, of which "default" is the chat one)."""
    if directory:
        path = os.path.join(directory, "chat_template.jinja")
        if os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                return f.read()
    value = (config or {}).get("chat_template")
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        value = named.get("default")
    if value is not None and not isinstance(value, str):
        raise ValueError("tokenizer_config.json: chat_template must be a string or a list of "
                         "{'name', 'template'} entries with a 'default' one")
    return value or None


def _raise(message: str):
    raise ChatFormatError(f"the chat template refused the conversation: {message}")


@functools.lru_cache(maxsize=8)
def _compiled(template: str):
    try:
        import jinja2
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError as e:  # torch depends on jinja2, so this is rare
        raise ImportError("rendering a checkpoint's chat template needs jinja2 (pip install jinja2)") from e

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = lambda x, indent=None, separators=None, sort_keys=False: json.dumps(
        x, ensure_ascii=False, indent=indent, separators=separators, sort_keys=sort_keys)
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(template)
    except jinja2.TemplateError as e:
        raise ValueError(f"the checkpoint's chat template does not parse: {e}") from None


def _check(messages: Any) -> None:
    if not isinstance(messages, list) or not messages:
        raise ChatFormatError("messages must be a non-empty list")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ChatFormatError(f"messages[{i}]: expected an object, got {type(m).__name__}")
        if not isinstance(m.get("role"), str):
            raise ChatFormatError(f"messages[{i}].role: expected a string")
        if m.get("content") is not None and not isinstance(m["content"], str):
            raise ChatFormatError(f"messages[{i}].content: expected a string")
        if m.get("tools") is not None and (m["role"] not in ("system", "developer") or not isinstance(m["tools"], list)):
            raise ChatFormatError(f"messages[{i}].tools: a list of tools, on a system message")


def render_chat_template(template: str, messages: list[dict], *, bos_token: str | None, eos_token: str | None,
                         add_generation_prompt: bool = True, thinking: bool = False, **kwargs: Any) -> str:
    """The prompt text the template gives (``thinking`` is passed as ``thinking`` and
    ``enable_thinking``, the names DeepSeek's and Qwen's templates read)."""
    _check(messages)
    import jinja2

    # V4's convention carries tools (and the response format) on a system message; a template
    # takes the tools as transformers passes them, beside the messages
    tools = [t for m in messages for t in m.get("tools") or ()] or kwargs.pop("tools", None)
    messages = [{k: v for k, v in m.items() if k not in ("tools", "response_format")} for m in messages]
    try:
        return _compiled(template).render(messages=messages, bos_token=bos_token or "", eos_token=eos_token or "",
                                          add_generation_prompt=add_generation_prompt, thinking=thinking,
                                          enable_thinking=thinking, tools=tools, **kwargs)
    except ChatFormatError:
        raise
    except jinja2.TemplateError as e:
        raise ChatFormatError(f"the checkpoint's chat template failed on this conversation: {e}") from None


def opens_reasoning(prompt: str) -> bool:
    """Whether the reply starts inside reasoning (the prompt ends with an open ``<think>``)."""
    return prompt.rstrip().endswith(THINK_START)


class TemplateReplyParser(StreamingChatParser):
    """Replies of models with their own template (DeepSeek-V3, R1, V3.1): reasoning up to
    ``</think>`` when the prompt opened it, then the answer, then tool calls in their markup::

        <｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME
        ```json
        {"city": "Paris"}
        ```<｜tool▁call▁end｜><｜tool▁calls▁end｜>        (V3 / R1)

        <｜tool▁calls▁begin｜><｜tool▁call▁begin｜>NAME<｜tool▁sep｜>{"city": "Paris"}<｜tool▁call▁end｜>...  (V3.1)

    Streaming as ``StreamingChatParser`` does (the same events for any split of the text), each
    call emitted once it closes, its arguments as compact JSON."""

    _reasoning_markers = (THINK_END, EOS, CALLS_BEGIN)
    _content_markers = (EOS, CALLS_BEGIN, THINK_END)
    _reasoning_re, _content_re = _marker_regex(_reasoning_markers), _marker_regex(_content_markers)
    _tools_open = CALLS_BEGIN

    def _tools_step(self, events: list[ChatEvent]) -> bool:
        if self._state == "tool_calls_open":
            return self._expect_after_space({CALL_BEGIN: "tool_calls_invoke"})
        if self._state == "tool_calls_invoke":
            end = self._buf.find(CALL_END)
            if end == -1:
                return False  # finish() reports a call that never closes
            name, arguments = _parse_call(self._buf[:end], self._offset)
            self._consume(end + len(CALL_END))
            call = ToolCall(len(self._tool_calls), name, arguments)
            self._tool_calls.append(call)
            events.append(call)
            self._state = "tool_calls_next"
            return True
        if self._state == "tool_calls_next":
            return self._expect_after_space({CALL_BEGIN: "tool_calls_invoke", CALLS_END: "after_tool_calls"})
        if self._state == "after_tool_calls":
            return self._expect_after_space({EOS: "done"})
        raise _format_error("unexpected text after the end-of-sentence token", self._offset)

    def _expect_after_space(self, transitions: dict[str, str]) -> bool:
        n = len(self._buf) - len(self._buf.lstrip())
        if n == len(self._buf):
            return False  # only whitespace so far
        self._consume(n)
        return self._expect(transitions)


def _parse_call(body: str, offset: int) -> tuple[str, str]:
    """(name, arguments as compact JSON) of one call's body, in V3 / R1's or V3.1's layout."""
    if SEP not in body:
        raise _format_error(f"malformed tool call: no {SEP!r}", offset)
    left, right = body.split(SEP, 1)
    if left.strip() == "function" and "```" in right:  # V3 / R1: type, name, fenced JSON
        name, _, rest = right.partition("\n")
        start, end = rest.find("```"), rest.rfind("```")
        raw = rest[rest.find("\n", start) + 1:end] if start != -1 and end > start else ""
    else:  # V3.1: name, then the JSON
        name, raw = left, right
    name = name.strip()
    if not name or any(m in name for m in _MARKUP):
        raise _format_error("malformed tool call: no function name", offset)
    try:
        arguments = json.loads(raw)
    except json.JSONDecodeError as e:
        raise _format_error(f"tool call {name!r}: arguments are not JSON ({e.msg})", offset) from None
    if not isinstance(arguments, dict):
        raise _format_error(f"tool call {name!r}: arguments must be a JSON object", offset)
    return name, _json(arguments)


@dataclass(frozen=True)
class TemplateMarkup:
    """How a template writes one tool call, read off the template itself (``tool_call_markup``):
    ``CALL_BEGIN + prefix + NAME + middle + ARGUMENTS + suffix + CALL_END``, calls joined by
    ``separator`` inside ``CALLS_BEGIN ... CALLS_END``. As ``sparseek.tokenizer.chat.reply_format``'s
    ``markup``: forced tool calls held to it, the arguments to each tool's JSON schema."""

    prefix: str
    middle: str
    suffix: str
    separator: str

    def render(self, calls: list[tuple[str, str]]) -> str:
        """The tool-call block of ``calls`` ((name, arguments JSON) pairs)."""
        return CALLS_BEGIN + self.separator.join(f"{CALL_BEGIN}{self.prefix}{name}{self.middle}{args}{self.suffix}"
                                                 f"{CALL_END}" for name, args in calls) + CALLS_END

    def __call__(self, functions: dict[str, Any], parallel: bool) -> dict[str, Any]:
        tags = [{"type": "tag", "begin": f"{CALL_BEGIN}{self.prefix}{name}{self.middle}",
                 "content": {"type": "json_schema", "json_schema": schema, "max_whitespace_cnt": 1},
                 "end": f"{self.suffix}{CALL_END}"} for name, schema in functions.items()]
        calls = {"type": "tags_with_separator", "tags": tags, "separator": self.separator, "at_least_one": True,
                 "stop_after_first": not parallel}
        return {"open": CALLS_BEGIN, "calls": calls, "close": CALLS_END, "excludes": _MARKUP}


_PROBE = (("probe_fn_a", '{"probe_arg": 1}'), ("probe_fn_b", '{"probe_arg": 2}'))


@functools.lru_cache(maxsize=8)
def tool_call_markup(template: str, bos_token: str | None = None, eos_token: str | None = None
                     ) -> TemplateMarkup | None:
    """The tool-call layout ``template`` writes, found by rendering an assistant turn with two
    probe calls and reading where their names and arguments land; None when it writes none that
    ``TemplateReplyParser`` reads back (sparseek then refuses to force tool calls for it)."""
    calls = [{"id": f"call_{i}", "type": "function", "function": {"name": n, "arguments": a}}
             for i, (n, a) in enumerate(_PROBE)]
    for content in (None, ""):  # V3's template writes the calls only for an assistant turn without content
        messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": content, "tool_calls": calls}]
        try:
            text = render_chat_template(template, messages, bos_token=bos_token, eos_token=eos_token,
                                        add_generation_prompt=False)
        except (ChatFormatError, ValueError, TypeError):
            continue
        if CALLS_BEGIN in text and CALLS_END in text:
            break
    else:
        return None
    block = text[text.index(CALLS_BEGIN) + len(CALLS_BEGIN):text.index(CALLS_END)]
    if not block.startswith(CALL_BEGIN):
        return None
    first, _, rest = block[len(CALL_BEGIN):].partition(CALL_END)
    separator, _, second = rest.partition(CALL_BEGIN)
    found = []
    for body, (name, args) in zip((first, second.partition(CALL_END)[0]), _PROBE):
        i, j = body.find(name), body.find(args)
        if i == -1 or j < i + len(name):
            return None
        found.append((body[:i], body[i + len(name):j], body[j + len(args):]))
    if found[0] != found[1]:
        return None
    markup = TemplateMarkup(*found[0], separator)
    # only what the reply parser reads back: a layout it would misread is not offered
    parser = TemplateReplyParser("chat")
    try:
        parser.feed(markup.render(list(_PROBE)) + EOS)
        parser.finish()
    except ValueError:
        return None
    got = [(c["function"]["name"], c["function"]["arguments"]) for c in parser.message().get("tool_calls") or ()]
    return markup if got == [(n, _json(json.loads(a))) for n, a in _PROBE] else None
