"""DeepSeek-V4 chat format: prompt encoder, completion parser and streaming parser.

The format follows DeepSeek's ``encoding/encoding_dsv4.py`` (April 2026 preview); there is no
Jinja template. A conversation renders as::

    <｜begin▁of▁sentence｜>{system}<｜User｜>{user}<｜Assistant｜></think>{answer}<｜end▁of▁sentence｜>

in chat mode, and with ``<think>{reasoning}</think>{answer}`` after ``<｜Assistant｜>`` in thinking
mode. Tool calls are written in "DSML" after the answer::

    \\n\\n<｜DSML｜tool_calls>
    <｜DSML｜invoke name="get_weather">
    <｜DSML｜parameter name="city" string="true">Paris</｜DSML｜parameter>
    <｜DSML｜parameter name="days" string="false">3</｜DSML｜parameter>
    </｜DSML｜invoke>
    </｜DSML｜tool_calls>

and tool results come back inside one user turn as ``<tool_result>...</tool_result>`` parts.
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from tokenizers import Tokenizer

__all__ = [
    "ChatFormatError",
    "ReasoningDelta",
    "ContentDelta",
    "ToolCall",
    "ChatEvent",
    "StreamingChatParser",
    "encode_messages",
    "parse_completion",
    "apply_chat_template",
    "reply_format",
    "SPECIAL_TOKENS",
]

ThinkingMode = Literal["chat", "thinking"]
Message = dict[str, Any]

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
USER = "<｜User｜>"
ASSISTANT = "<｜Assistant｜>"
THINK_START = "<think>"
THINK_END = "</think>"
DSML = "｜DSML｜"
LATEST_REMINDER = "<｜latest_reminder｜>"
TASK_TOKENS: dict[str, str] = {
    "action": "<｜action｜>",
    "query": "<｜query｜>",
    "authority": "<｜authority｜>",
    "domain": "<｜domain｜>",
    "title": "<｜title｜>",
    "read_url": "<｜read_url｜>",
}
EXTRACTED_URL = "<｜extracted_url｜>"

# Every string the tokenizer maps to a protocol special token. None of them may appear inside
# message text: it would be tokenized as the control token itself (prompt injection), and the
# parser could not tell it apart from real structure.
SPECIAL_TOKENS: tuple[str, ...] = (
    BOS, EOS, USER, ASSISTANT, THINK_START, THINK_END, DSML, LATEST_REMINDER,
    *TASK_TOKENS.values(), EXTRACTED_URL,
)

TOOL_CALLS_START = f"\n\n<{DSML}tool_calls>"
TOOL_CALLS_END = f"</{DSML}tool_calls>"
INVOKE_OPEN = f'<{DSML}invoke name="'
INVOKE_CLOSE = f"</{DSML}invoke>"
PARAM_OPEN = f'<{DSML}parameter name="'
PARAM_CLOSE = f"</{DSML}parameter>"

REASONING_EFFORT_MAX = (
    "Reasoning Effort: Absolute maximum with no shortcuts permitted.\n"
    "You MUST be very thorough in your thinking and comprehensively decompose the problem to "
    "resolve the root cause, rigorously stress-testing your logic against all potential paths, "
    "edge cases, and adversarial scenarios.\n"
    "Explicitly write out your entire deliberation process, documenting every intermediate step, "
    "considered alternative, and rejected hypothesis to ensure absolutely no assumption is left "
    "unchecked.\n\n"
)

TOOLS_TEMPLATE = f"""## Tools

You have access to a set of tools to help answer the user's question. You can invoke tools by writing a "<{DSML}tool_calls>" block like the following:

<{DSML}tool_calls>
<{DSML}invoke name="$TOOL_NAME">
<{DSML}parameter name="$PARAMETER_NAME" string="true|false">$PARAMETER_VALUE</{DSML}parameter>
...
</{DSML}invoke>
<{DSML}invoke name="$TOOL_NAME2">
...
</{DSML}invoke>
</{DSML}tool_calls>

String parameters should be specified as is and set `string="true"`. For all other types (numbers, booleans, arrays, objects), pass the value in JSON format and set `string="false"`.

If thinking_mode is enabled (triggered by {THINK_START}), you MUST output your complete reasoning inside {THINK_START}...{THINK_END} BEFORE any tool calls or final response.

Otherwise, output directly after {THINK_END} with tool calls or final response.

### Available Tool Schemas

{{tool_schemas}}

You MUST strictly follow the above defined tool name and parameter schemas to invoke tool calls.
"""

RESPONSE_FORMAT_TEMPLATE = (
    "## Response Format:\n\nYou MUST strictly adhere to the following schema to reply:\n{schema}"
)

ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "latest_reminder"})


class ChatFormatError(ValueError):
    """A conversation that cannot be encoded, or a completion that does not follow the format."""


def _json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


def _check_mode(thinking_mode: str) -> None:
    if thinking_mode not in ("chat", "thinking"):
        raise ValueError(f"thinking_mode must be 'chat' or 'thinking', got {thinking_mode!r}")


# --------------------------------------------------------------------------------------------
# Encoder
# --------------------------------------------------------------------------------------------

def _fail(index: int, field_name: str, problem: str) -> ChatFormatError:
    return ChatFormatError(f"messages[{index}].{field_name}: {problem}")


def _check_text(value: Any, index: int, field_name: str) -> str:
    """Return a text field (None counts as empty) after rejecting protocol tokens inside it."""
    if value is None:
        return ""
    if not isinstance(value, str):
        raise _fail(index, field_name, f"expected a string, got {type(value).__name__}")
    for token in SPECIAL_TOKENS:
        pos = value.find(token)
        if pos != -1:
            raise _fail(index, field_name,
                        f"contains the reserved special token {token!r} at character {pos}; "
                        "protocol tokens may not appear inside message text")
    return value


def _tool_call_parts(call: Any, index: int, j: int) -> tuple[str, dict[str, Any]]:
    """Validate one OpenAI-style tool call and return (name, arguments object)."""
    where = f"tool_calls[{j}]"
    function = call.get("function") if isinstance(call, dict) else None
    if not isinstance(function, dict):
        raise _fail(index, where, "expected {'type': 'function', 'function': {'name', 'arguments'}}")
    name = _check_text(function.get("name"), index, f"{where}.function.name")
    if not name or '"' in name:
        raise _fail(index, f"{where}.function.name", f"invalid tool name {name!r}")
    arguments = function.get("arguments")
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError as err:
            raise _fail(index, f"{where}.function.arguments", f"not valid JSON ({err})") from None
    if not isinstance(arguments, dict):
        raise _fail(index, f"{where}.function.arguments", "must encode a JSON object")
    for key, value in arguments.items():
        if '"' in key:
            raise _fail(index, f"{where}.function.arguments", f"invalid parameter name {key!r}")
        _check_text(key, index, f"{where}.function.arguments")
        _check_text(value if isinstance(value, str) else _json(value),
                    index, f"{where}.function.arguments[{key!r}]")
    return name, arguments


def _validate(messages: list[Message]) -> None:
    last_assistant: Message | None = None
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict):
            raise ChatFormatError(f"messages[{i}]: expected a dict, got {type(msg).__name__}")
        role = msg.get("role")
        if role not in ROLES:
            raise _fail(i, "role", f"unknown role {role!r}; expected one of {sorted(ROLES)}")
        for key in ("tools", "response_format"):
            if msg.get(key) and role not in ("system", "developer"):
                raise _fail(i, key, f"only system/developer messages may carry {key}, not {role!r}")
        for j, tool in enumerate(msg.get("tools") or ()):
            if not (isinstance(tool, dict) and isinstance(tool.get("function"), dict)):
                raise _fail(i, f"tools[{j}]", "expected {'type': 'function', 'function': {...}}")
        task = msg.get("task")
        if task is not None and task not in TASK_TOKENS:
            raise _fail(i, "task", f"unknown task {task!r}; expected one of {sorted(TASK_TOKENS)}")
        _check_text(msg.get("content"), i, "content")
        if role == "assistant":
            _check_text(msg.get("reasoning_content"), i, "reasoning_content")
            for j, call in enumerate(msg.get("tool_calls") or ()):
                _tool_call_parts(call, i, j)
            last_assistant = msg
        elif role == "tool" and not (last_assistant and last_assistant.get("tool_calls")):
            raise _fail(i, "role", "tool result with no preceding assistant tool call")


def _render_tool_calls(tool_calls: list[Any], index: int) -> str:
    invokes = []
    for j, call in enumerate(tool_calls):
        name, arguments = _tool_call_parts(call, index, j)
        params = [
            f'{PARAM_OPEN}{key}" string="true">{value}{PARAM_CLOSE}' if isinstance(value, str)
            else f'{PARAM_OPEN}{key}" string="false">{_json(value)}{PARAM_CLOSE}'
            for key, value in arguments.items()
        ]
        invokes.append(f'{INVOKE_OPEN}{name}">\n' + "\n".join(params) + f"\n{INVOKE_CLOSE}")
    return f"{TOOL_CALLS_START}\n" + "\n".join(invokes) + f"\n{TOOL_CALLS_END}"


def _system_extras(msg: Message) -> str:
    """The tools block and response-format schema that system/developer messages may carry."""
    out = ""
    if msg.get("tools"):
        schemas = "\n".join(_json(tool["function"]) for tool in msg["tools"])
        out += "\n\n" + TOOLS_TEMPLATE.format(tool_schemas=schemas)
    if msg.get("response_format"):
        out += "\n\n" + RESPONSE_FORMAT_TEMPLATE.format(schema=_json(msg["response_format"]))
    return out


@dataclass
class _Turn:
    """One rendered unit. A user turn gathers consecutive user and tool messages."""

    role: str
    index: int  # position of its (first) source message, for error messages
    message: Message
    task: str | None = None
    parts: list[str] = field(default_factory=list)  # user turns: text parts joined by "\n\n"
    # user turns: (index into parts, position of the answered call or None) per tool result
    results: list[tuple[int, int | None]] = field(default_factory=list)

    def sort_results(self) -> None:
        """Put tool results back in call order, within the slots results occupy. Without a
        tool_call_id on every result the arrival order is all there is to go by."""
        positions = [pos for _, pos in self.results]
        if None in positions:
            return
        texts = [self.parts[k] for k, _ in self.results]
        ordered = [text for _, text in sorted(zip(positions, texts), key=lambda p: p[0])]
        for (k, _), text in zip(self.results, ordered):
            self.parts[k] = text


def _build_turns(messages: list[Message]) -> list[_Turn]:
    turns: list[_Turn] = []
    call_ids: list[Any] = []  # tool_call ids of the latest assistant message, in call order
    for i, msg in enumerate(messages):
        role = msg["role"]
        if role == "assistant":
            call_ids = [call.get("id") for call in msg.get("tool_calls") or ()]
        if role not in ("user", "tool"):
            turns.append(_Turn(role, i, msg, task=msg.get("task")))
            continue
        # The format has no tool role: tool results, and any user text right after them (or
        # after another user message), share one <｜User｜> turn, as the official encoder does.
        if not (turns and turns[-1].role == "user" and turns[-1].task is None):
            turns.append(_Turn("user", i, msg))
        turn = turns[-1]
        turn.task = msg.get("task")
        content = msg.get("content") or ""
        if role == "user":
            turn.parts.append(content)
            continue
        call_id = msg.get("tool_call_id")
        if call_id is not None and call_id not in call_ids:
            raise _fail(i, "tool_call_id",
                        f"{call_id!r} matches no tool call of the preceding assistant message")
        turn.results.append((len(turn.parts), None if call_id is None else call_ids.index(call_id)))
        turn.parts.append(f"<tool_result>{content}</tool_result>")
    for turn in turns:
        turn.sort_results()
    return turns


def encode_messages(
    messages: list[Message],
    thinking_mode: ThinkingMode = "chat",
    drop_thinking: bool = True,
    add_bos: bool = True,
    reasoning_effort: str | None = None,
) -> str:
    """Render OpenAI-style messages into a DeepSeek-V4 prompt string.

    Roles: system, developer, user, tool, assistant, latest_reminder. A trailing user message
    ends the prompt with ``<｜Assistant｜>`` plus ``<think>`` (thinking) or ``</think>`` (chat).
    In thinking mode, reasoning of assistant turns before the last user message is dropped
    unless ``drop_thinking`` is False or some system/developer message carries tools.
    """
    _check_mode(thinking_mode)
    if reasoning_effort not in (None, "high", "max"):
        raise ValueError(f"reasoning_effort must be None, 'high' or 'max', got {reasoning_effort!r}")
    _validate(messages)

    thinking = thinking_mode == "thinking"
    # Tool use interleaves reasoning with tool results, so the model needs to see all of it.
    drop = drop_thinking and not any(m.get("tools") for m in messages)
    turns = _build_turns(messages)

    def last_user_index() -> int:
        return max((k for k, t in enumerate(turns) if t.role in ("user", "developer")), default=-1)

    if thinking and drop:
        # Matches the official encoder: old developer instructions go with the old reasoning.
        last_user = last_user_index()
        turns = [t for k, t in enumerate(turns) if t.role != "developer" or k >= last_user]
    last_user = last_user_index()

    out = [BOS] if add_bos else []
    if thinking and reasoning_effort == "max":
        out.append(REASONING_EFFORT_MAX)
    for k, turn in enumerate(turns):
        msg = turn.message
        if turn.role == "system":
            out.append((msg.get("content") or "") + _system_extras(msg))
        elif turn.role == "developer":
            out.append(USER + (msg.get("content") or "") + _system_extras(msg))
        elif turn.role == "user":
            out.append(USER + "\n\n".join(turn.parts))
        elif turn.role == "latest_reminder":
            out.append(LATEST_REMINDER + (msg.get("content") or ""))
        else:
            # An answer to a task token (e.g. after <｜action｜>) is a bare label, never reasoned.
            after_task = k > 0 and turns[k - 1].task is not None
            if thinking and not after_task and (not drop or k > last_user):
                out.append((msg.get("reasoning_content") or "") + THINK_END)
            out.append(msg.get("content") or "")
            if msg.get("tool_calls"):
                out.append(_render_tool_calls(msg["tool_calls"], turn.index))
            if not msg.get("wo_eos"):
                out.append(EOS)

        # The generation prompt (or task token) goes after a turn that the model answers next:
        # the last turn, or one followed by an assistant or latest_reminder message.
        if k + 1 < len(turns) and turns[k + 1].role not in ("assistant", "latest_reminder"):
            continue
        if turn.task == "action":
            out.append(ASSISTANT + (THINK_START if thinking else THINK_END) + TASK_TOKENS["action"])
        elif turn.task is not None:
            out.append(TASK_TOKENS[turn.task])
        elif turn.role in ("user", "developer"):
            opens_thinking = thinking and (not drop or k >= last_user)
            out.append(ASSISTANT + (THINK_START if opens_thinking else THINK_END))
    return "".join(out)


def reply_format(thinking: bool, *, tools: list[dict[str, Any]] | None = None, tool_choice: str | None = None,
                 parallel_tool_calls: bool = True, json_schema: Any = None, regex: str | None = None,
                 markup=None) -> dict[str, Any]:
    """The layout one assistant reply must take, as an xgrammar structural tag (its JSON form, for
    ``SamplingParams(structural_tag=...)``), so that a constrained reply always parses.

    In thinking mode the reply opens with free reasoning (no special token in it) up to
    ``</think>``, which the prompt leaves open. Then either a DSML tool-call block of ``tools``
    (OpenAI's ``{"type": "function", "function": {"name", "parameters"}}``) -- ``tool_choice``
    "required": one or more calls (one if not ``parallel_tool_calls``), a tool's name: exactly
    one call of it, "auto": a free answer that may end in such a block (strict tools) --
    each call's parameters held to its tool's JSON schema and written as DSML
    parameters (``string="true"`` for strings, JSON otherwise); or an answer held to ``json_schema``
    (True: any JSON value) or ``regex``. ``ChatFormatError`` names a bad tool or tool choice.

    ``markup``: another tool-call layout (a checkpoint's own template: ``sparseek.tokenizer.template
    .TemplateMarkup``), a callable ({name: parameters schema}, parallel) -> {"open": text, "calls":
    the calls' format, "close": text, "excludes": markers free text may not hold}."""
    free = _free_text()
    if tool_choice is not None:
        body = _tool_calls_format(tools or [], tool_choice, parallel_tool_calls, markup or _dsml_calls)
    elif regex is not None:
        body = {"type": "regex", "pattern": regex}
    elif json_schema is not None:
        body = {"type": "json_schema", "json_schema": json_schema, "max_whitespace_cnt": 1}
    else:
        body = free
    if thinking:
        body = {"type": "sequence", "elements": [{"type": "tag", "begin": "", "content": free, "end": THINK_END},
                                                 body]}
    return {"type": "structural_tag", "format": body}


def _free_text(extra=()) -> dict[str, Any]:
    """Any text without a special token in it (a structural tag's ``end`` may still be one)."""
    return {"type": "any_text", "excludes": list(dict.fromkeys([*SPECIAL_TOKENS, *extra]))}


def _tool_calls_format(tools: list[dict[str, Any]], tool_choice: str, parallel: bool, markup) -> dict[str, Any]:
    functions = {}
    for j, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"] or '"' in fn["name"]:
            raise ChatFormatError(f"tools[{j}] must be {{'type': 'function', 'function': {{'name': ..., "
                                  "'parameters': {...}}}} with a name free of quotes")
        params = fn.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(params, dict):
            raise ChatFormatError(f"tools[{j}].function.parameters must be a JSON schema object")
        functions[fn["name"]] = params
    if tool_choice not in ("required", "auto"):
        if tool_choice not in functions:
            raise ChatFormatError(f"tool_choice names {tool_choice!r}, which is not among the tools "
                                  f"({sorted(functions)})")
        functions, parallel = {tool_choice: functions[tool_choice]}, False
    if not functions:
        raise ChatFormatError("tool_choice 'required' needs at least one tool")
    m = markup(functions, parallel)
    free = _free_text(m["excludes"])
    block = [m["calls"], {"type": "const_string", "value": m["close"]}]
    if tool_choice == "auto":  # a free answer, or one that opens a tool-call block, which is then held
        return {"type": "or", "elements": [free, {"type": "sequence", "elements": [
            {"type": "tag", "begin": "", "content": free, "end": m["open"]}, *block]}]}
    return {"type": "sequence", "elements": [{"type": "const_string", "value": m["open"]}, *block]}


def _dsml_calls(functions: dict[str, Any], parallel: bool) -> dict[str, Any]:
    """DeepSeek-V4's DSML tool-call block, each call's parameters as ``_render_tool_calls`` writes them."""
    invokes = [{"type": "tag", "begin": f'{INVOKE_OPEN}{name}">\n', "content": _parameters_format(name, schema),
                "end": INVOKE_CLOSE + "\n"} for name, schema in functions.items()]
    calls = {"type": "tags_with_separator", "tags": invokes, "separator": "", "at_least_one": True,
             "stop_after_first": not parallel}
    return {"open": TOOL_CALLS_START + "\n", "calls": calls, "close": TOOL_CALLS_END, "excludes": ()}


def _parameters_format(tool: str, schema: dict[str, Any]) -> dict[str, Any]:
    """A call's parameters exactly as ``_render_tool_calls`` writes them (and the parser reads them):
    one line each, in the schema's order, the required ones present; no parameter at all is an
    empty line. A schema without ``properties`` takes no parameters."""
    props = schema.get("properties") or {}
    if not isinstance(props, dict):
        raise ChatFormatError(f"tool {tool!r}: parameters.properties must be an object")
    required = set(schema.get("required") or ())
    params = [_parameter_format(tool, key, sub) for key, sub in props.items()]
    if not params:
        return {"type": "const_string", "value": "\n"}

    def optional(f):
        return {"type": "optional", "content": f}

    if required & set(props):
        return {"type": "sequence", "elements": [f if key in required else optional(f)
                                                 for key, f in zip(props, params)]}
    # all optional: the first one present decides the alternative, so the grammar stays unambiguous
    firsts = [{"type": "sequence", "elements": [f, *map(optional, params[i + 1:])]} for i, f in enumerate(params)]
    return {"type": "or", "elements": [{"type": "const_string", "value": "\n"}, *firsts]}


def _parameter_format(tool: str, key: str, schema: Any) -> dict[str, Any]:
    if not isinstance(schema, dict) or '"' in key:
        raise ChatFormatError(f"tool {tool!r}: parameter {key!r} needs a JSON schema object and a name free "
                              "of quotes")
    kinds = schema.get("type")
    kinds = set(kinds) if isinstance(kinds, list) else {kinds}
    forms = []
    if "string" in kinds:  # as is, string="true"
        if "const" in schema or "enum" in schema:
            values = [schema["const"]] if "const" in schema else schema["enum"]
            text = {"type": "or", "elements": [{"type": "const_string", "value": v} for v in values
                                               if isinstance(v, str)]}
        elif isinstance(schema.get("pattern"), str):
            text = {"type": "regex", "pattern": schema["pattern"]}
        else:
            text = _free_text()
        forms.append({"type": "tag", "begin": f'{PARAM_OPEN}{key}" string="true">', "content": text,
                      "end": PARAM_CLOSE + "\n"})
    if kinds != {"string"}:  # JSON, string="false" (a schema without "type" may take any JSON value)
        sub = {k: v for k, v in schema.items() if k != "type"} if "string" in kinds else schema
        if "string" in kinds:
            sub["type"] = sorted(kinds - {"string"})
        forms.append({"type": "tag", "begin": f'{PARAM_OPEN}{key}" string="false">',
                      "content": {"type": "json_schema", "json_schema": sub, "max_whitespace_cnt": 1,
                                  "excludes": list(SPECIAL_TOKENS)},
                      "end": PARAM_CLOSE + "\n"})
    return forms[0] if len(forms) == 1 else {"type": "or", "elements": forms}


def apply_chat_template(tokenizer: Tokenizer, messages: list[Message], **kwargs: Any) -> list[int]:
    """Token ids of ``encode_messages(messages, **kwargs)`` under a ``tokenizers.Tokenizer``.

    The tokenizer must know every protocol token as a single added token; otherwise the prompt
    would silently be BPE-split into text the model was never trained on.
    """
    for token in SPECIAL_TOKENS:
        if len(tokenizer.encode(token, add_special_tokens=False).ids) != 1:
            raise ValueError(f"tokenizer does not encode {token!r} as a single special token")
    return tokenizer.encode(encode_messages(messages, **kwargs), add_special_tokens=False).ids


# --------------------------------------------------------------------------------------------
# Completion parsing
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ReasoningDelta:
    text: str


@dataclass(frozen=True)
class ContentDelta:
    text: str


@dataclass(frozen=True)
class ToolCall:
    index: int
    name: str
    arguments_json: str


ChatEvent = ReasoningDelta | ContentDelta | ToolCall


def _format_error(problem: str, offset: int) -> ChatFormatError:
    return ChatFormatError(f"{problem} at character offset {offset}")


class _Cursor:
    """Sequential reader over one complete DSML invoke body, reporting absolute offsets."""

    def __init__(self, text: str, base: int) -> None:
        self.text, self.base, self.pos = text, base, 0

    def at(self, literal: str) -> bool:
        return self.text.startswith(literal, self.pos)

    def done(self) -> bool:
        return self.pos == len(self.text)

    def offset(self) -> int:
        return self.base + self.pos

    def expect(self, literal: str, what: str) -> None:
        if not self.at(literal):
            found = self.text[self.pos:self.pos + 30]
            raise _format_error(f"malformed DSML: expected {what} {literal!r}, found {found!r}",
                                self.offset())
        self.pos += len(literal)

    def read_until(self, literal: str, what: str) -> str:
        end = self.text.find(literal, self.pos)
        if end == -1:
            raise _format_error(f"malformed DSML: missing {what} {literal!r}", self.offset())
        value, self.pos = self.text[self.pos:end], end + len(literal)
        return value


def _parse_invoke(body: str, base: int) -> tuple[str, dict[str, Any]]:
    """Parse ``NAME">\\n{params}\\n`` (the text between ``<｜DSML｜invoke name="`` and
    ``</｜DSML｜invoke>``); ``base`` is the absolute offset of ``body[0]``."""
    cur = _Cursor(body, base)
    name = cur.read_until('"', "closing quote of the tool name")
    cur.expect(">\n", "end of the invoke tag")
    arguments: dict[str, Any] = {}
    while cur.at(PARAM_OPEN):
        start = cur.offset()
        cur.expect(PARAM_OPEN, "parameter tag")
        key = cur.read_until('"', "closing quote of the parameter name")
        cur.expect(' string="', "parameter attribute")
        flag = cur.read_until('"', "closing quote of the string attribute")
        if flag not in ("true", "false"):
            raise _format_error(f'malformed DSML: string="{flag}" must be "true" or "false"', start)
        cur.expect(">", "end of the parameter tag")
        value_at = cur.offset()
        value = cur.read_until(PARAM_CLOSE, "parameter close tag")
        cur.expect("\n", "newline after the parameter")
        if key in arguments:
            raise _format_error(f"malformed DSML: duplicate parameter {key!r} in tool {name!r}",
                                start)
        if flag == "true":
            arguments[key] = value
        else:
            try:
                arguments[key] = json.loads(value)
            except json.JSONDecodeError:
                raise _format_error(f'malformed DSML: parameter {key!r} has string="false" '
                                    f"but its value {value[:30]!r} is not JSON", value_at) from None
    if not arguments:
        cur.expect("\n", "parameter or end of the invoke")
    if not cur.done():
        raise _format_error(f"malformed DSML: unexpected text {body[cur.pos:cur.pos + 30]!r} "
                            "in invoke", cur.offset())
    return name, arguments


def _marker_regex(markers: tuple[str, ...]) -> re.Pattern[str]:
    # Longest first, so that at equal start the longer marker wins.
    return re.compile("|".join(re.escape(m) for m in sorted(markers, key=len, reverse=True)))


_REASONING_MARKERS = SPECIAL_TOKENS  # includes </think>, the only legal one
_CONTENT_MARKERS = (*SPECIAL_TOKENS, TOOL_CALLS_START)  # EOS and the tool-calls opener are legal
_REASONING_RE = _marker_regex(_REASONING_MARKERS)
_CONTENT_RE = _marker_regex(_CONTENT_MARKERS)


class StreamingChatParser:
    """Incremental parser of a model completion (the text generated after the prompt).

    ``feed`` returns the events that the text seen so far determines. Text that could still
    turn out to be the start of a marker (``</think>``, the tool-calls opener, EOS, ...) is held
    back, so events never need retracting, and the concatenated events are independent of how
    the completion was split into deltas. Tool calls are emitted whole, once their invoke closes.
    """

    # the markers each text state watches for, and the one that opens the tool calls (a subclass
    # reads another family's markup: sparseek.tokenizer.template.TemplateReplyParser)
    _reasoning_markers, _reasoning_re = _REASONING_MARKERS, _REASONING_RE
    _content_markers, _content_re = _CONTENT_MARKERS, _CONTENT_RE
    _tools_open = TOOL_CALLS_START

    def __init__(self, thinking_mode: ThinkingMode = "chat") -> None:
        _check_mode(thinking_mode)
        # In thinking mode the prompt ended with <think>, so generation starts inside it.
        self._state = "reasoning" if thinking_mode == "thinking" else "content"
        self._buf = ""
        self._offset = 0  # offset of self._buf[0] in the whole completion
        self._reasoning: list[str] = []
        self._content: list[str] = []
        self._tool_calls: list[ToolCall] = []
        self._finished = False

    def feed(self, delta: str) -> list[ChatEvent]:
        if self._finished:
            raise RuntimeError("feed() after finish()")
        self._buf += delta
        events: list[ChatEvent] = []
        while self._step(events, final=False):
            pass
        return events

    def finish(self) -> list[ChatEvent]:
        """Flush held-back text and check that the completion ended in a valid place."""
        if self._finished:
            raise RuntimeError("finish() called twice")
        events: list[ChatEvent] = []
        while self._step(events, final=True):
            pass
        end = self._offset + len(self._buf)
        if self._state == "reasoning":
            raise _format_error("completion ended inside the reasoning: missing </think>", end)
        if self._state.startswith("tool_calls"):
            raise _format_error("completion ended inside an unterminated tool_calls block", end)
        if self._buf:  # only a truncated end-of-sentence token can be left over
            raise _format_error("completion ended with a truncated end-of-sentence token",
                                self._offset)
        self._finished = True
        return events

    @property
    def consumed(self) -> int:
        """Characters of the completion turned into events so far (the rest is held back)."""
        return self._offset

    @property
    def state(self) -> str:
        """What the parser is reading: "reasoning", "content", a "tool_calls..." state or "done"."""
        return self._state

    def message(self) -> Message:
        """The parsed assistant message; only available after ``finish``."""
        if not self._finished:
            raise RuntimeError("message() before finish()")
        return {
            "role": "assistant",
            "content": "".join(self._content),
            "reasoning_content": "".join(self._reasoning),
            "tool_calls": [
                {"type": "function", "function": {"name": c.name, "arguments": c.arguments_json}}
                for c in self._tool_calls
            ],
        }

    # -- internals ----------------------------------------------------------------------------

    def _consume(self, n: int) -> str:
        taken, self._buf = self._buf[:n], self._buf[n:]
        self._offset += n
        return taken

    def _step(self, events: list[ChatEvent], final: bool) -> bool:
        """Advance as far as the buffer allows; True if the state machine should run again."""
        if not self._buf:
            return False
        if self._state == "reasoning":
            return self._text_step(events, final, self._reasoning_re, self._reasoning_markers)
        if self._state == "content":
            return self._text_step(events, final, self._content_re, self._content_markers)
        return self._tools_step(events)

    def _tools_step(self, events: list[ChatEvent]) -> bool:
        """The states after the tool-calls opener (DSML's here)."""
        if self._state == "tool_calls_open":  # the block holds at least one invoke
            return self._expect({"\n" + INVOKE_OPEN: "tool_calls_invoke"})
        if self._state == "tool_calls_invoke":
            return self._invoke_step(events)
        if self._state == "tool_calls_next":
            return self._expect({"\n" + INVOKE_OPEN: "tool_calls_invoke",
                                 "\n" + TOOL_CALLS_END: "after_tool_calls"})
        if self._state == "after_tool_calls":
            return self._expect({EOS: "done"})
        raise _format_error("unexpected text after the end-of-sentence token", self._offset)

    def _text_step(self, events: list[ChatEvent], final: bool, regex: re.Pattern[str],
                   markers: tuple[str, ...]) -> bool:
        match = regex.search(self._buf)
        limit = match.start() if match else len(self._buf)
        if not final:
            # Hold back from the earliest point whose suffix could still grow into a marker that
            # starts before any complete match (e.g. "\n\n<｜DSML｜" before "tool_calls>").
            longest = max(map(len, markers))
            for hold in range(max(0, len(self._buf) - longest + 1), limit):
                tail = self._buf[hold:]
                if any(m.startswith(tail) and m != tail for m in markers):
                    self._emit_text(events, self._consume(hold))
                    return False
        self._emit_text(events, self._consume(limit))
        if match is None:
            return False
        marker, at = match.group(), self._offset
        self._consume(len(marker))
        if self._state == "reasoning" and marker == THINK_END:
            self._state = "content"
        elif self._state == "content" and marker == EOS:
            self._state = "done"
        elif self._state == "content" and marker == self._tools_open:
            self._state = "tool_calls_open"
        else:
            raise _format_error(f"unexpected special token {marker!r} in the {self._state}", at)
        return True

    def _emit_text(self, events: list[ChatEvent], text: str) -> None:
        if not text:
            return
        if self._state == "reasoning":
            self._reasoning.append(text)
            events.append(ReasoningDelta(text))
        else:
            self._content.append(text)
            events.append(ContentDelta(text))

    def _expect(self, transitions: dict[str, str]) -> bool:
        """Consume the literal that must come next and move to the state it leads to."""
        for literal, next_state in transitions.items():
            if self._buf.startswith(literal):
                self._consume(len(literal))
                self._state = next_state
                return True
        if any(literal.startswith(self._buf) for literal in transitions):
            return False  # a prefix of a legal continuation: wait for more text
        # No snippet of what was found: a streaming caller may not have seen all of it yet, and
        # the message should not depend on how the completion was split.
        wanted = " or ".join(repr(literal) for literal in transitions)
        raise _format_error(f"malformed DSML: expected {wanted}", self._offset)

    def _invoke_step(self, events: list[ChatEvent]) -> bool:
        end = self._buf.find(INVOKE_CLOSE)
        if end == -1:
            return False  # finish() reports a block that never closes
        name, arguments = _parse_invoke(self._buf[:end], self._offset)
        self._consume(end + len(INVOKE_CLOSE))
        call = ToolCall(len(self._tool_calls), name, _json(arguments))
        self._tool_calls.append(call)
        events.append(call)
        self._state = "tool_calls_next"
        return True


def parse_completion(text: str, thinking_mode: ThinkingMode = "chat") -> Message:
    """Parse a whole completion into ``{"role", "content", "reasoning_content", "tool_calls"}``.

    In thinking mode ``text`` starts inside the think block (``reasoning</think>answer``). The
    trailing EOS is optional, since engines usually strip the stop token; text after it is not.
    """
    parser = StreamingChatParser(thinking_mode)
    parser.feed(text)
    parser.finish()
    return parser.message()


@functools.cache
def v4_jinja_template() -> str:
    """DeepSeek-V4's chat format as a Jinja chat template, for runtimes that render one (llama.cpp,
    Ollama, LM Studio, transformers' ``apply_chat_template``): what ``encode_messages`` writes for
    conversations of system, user, assistant (reasoning, tool calls with object arguments) and tool
    messages, with tools passed beside the messages (``tools=``) and ``thinking`` /
    ``enable_thinking`` choosing the mode. Task tokens, developer and latest_reminder messages,
    response formats and reasoning effort are sparseek's encoder's alone (the template refuses
    the roles). Built from the encoder's own constants, so the two cannot drift apart."""
    def lit(text: str) -> str:  # a Jinja string literal
        return json.dumps(text, ensure_ascii=False)

    head, tail = TOOLS_TEMPLATE.split("{tool_schemas}")
    return "".join([
        "{%- set think = (thinking is defined and thinking) or (enable_thinking is defined and enable_thinking) -%}",
        "{%- set has_tools = tools is defined and tools -%}",
        "{%- set ns = namespace(last_user=-1, prev='', tools_done=false) -%}",
        "{%- for m in messages -%}{%- if m.role in ['user', 'tool'] -%}{%- set ns.last_user = loop.index0 -%}",
        "{%- endif -%}{%- endfor -%}",
        "{%- macro tools_block() -%}",
        "{{- ", lit("\n\n" + head), " -}}",
        "{%- for t in tools -%}{{- (t.function | tojson) + (", lit("\n"), " if not loop.last else '') -}}{%- endfor -%}",
        "{{- ", lit(tail), " -}}",
        "{%- endmacro -%}",
        "{{- bos_token -}}",
        "{%- if has_tools and (not messages or messages[0].role != 'system') -%}{{- tools_block() -}}",
        "{%- set ns.tools_done = true -%}{%- endif -%}",
        "{%- for m in messages -%}",
        "{%- if m.role == 'system' -%}",
        "{{- m.content or '' -}}",
        "{%- if has_tools and not ns.tools_done -%}{{- tools_block() -}}{%- set ns.tools_done = true -%}{%- endif -%}",
        "{%- elif m.role in ['user', 'tool'] -%}",
        "{%- if ns.prev in ['user', 'tool'] -%}{{- ", lit("\n\n"), " -}}{%- else -%}{{- ", lit(USER), " -}}{%- endif -%}",
        "{%- if m.role == 'tool' -%}{{- '<tool_result>' + (m.content or '') + '</tool_result>' -}}",
        "{%- else -%}{{- m.content or '' -}}{%- endif -%}",
        "{%- set next_role = messages[loop.index0 + 1].role if not loop.last else '' -%}",
        "{%- if next_role == 'assistant' or (loop.last and add_generation_prompt) -%}",
        "{{- ", lit(ASSISTANT), " + (", lit(THINK_START), " if think and (has_tools or loop.index0 >= ns.last_user) else ",
        lit(THINK_END), ") -}}",
        "{%- endif -%}",
        "{%- elif m.role == 'assistant' -%}",
        "{%- if think and (has_tools or loop.index0 > ns.last_user) -%}{{- (m.reasoning_content or '') + ",
        lit(THINK_END), " -}}{%- endif -%}",
        "{{- m.content or '' -}}",
        "{%- if m.tool_calls -%}",
        "{{- ", lit(TOOL_CALLS_START + "\n"), " -}}",
        "{%- for c in m.tool_calls -%}",
        "{%- set f = c.function if c.function is defined else c -%}",
        "{%- if f.arguments is not mapping -%}{{- raise_exception('tool call arguments must be an object (a JSON ",
        "string is for sparseek\\'s own encoder)') -}}{%- endif -%}",
        "{{- ", lit(INVOKE_OPEN), " + f.name + ", lit('">\n'), " -}}",
        "{%- if not f.arguments -%}{{- ", lit("\n"), " -}}{%- endif -%}",
        "{%- for k, v in f.arguments.items() -%}",
        "{%- if v is string -%}{{- ", lit(PARAM_OPEN), " + k + ", lit('" string="true">'), " + v -}}",
        "{%- else -%}{{- ", lit(PARAM_OPEN), " + k + ", lit('" string="false">'), " + (v | tojson) -}}{%- endif -%}",
        "{{- ", lit(PARAM_CLOSE + "\n"), " -}}",
        "{%- endfor -%}",
        "{{- ", lit(INVOKE_CLOSE), " + (", lit("\n"), " if not loop.last else '') -}}",
        "{%- endfor -%}",
        "{{- ", lit("\n" + TOOL_CALLS_END), " -}}",
        "{%- endif -%}",
        "{{- eos_token -}}",
        "{%- else -%}{{- raise_exception('role ' + m.role + ' has no place in this template: use sparseek\\'s ",
        "DeepSeek-V4 encoder') -}}",
        "{%- endif -%}",
        "{%- set ns.prev = m.role -%}",
        "{%- endfor -%}",
    ])
