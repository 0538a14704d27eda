"""Checkpoints with their own Jinja chat template (V3 / R1 style): read from the tokenizer's
files, rendered as transformers renders them, and used by chat, the engine and fine-tuning."""

from __future__ import annotations

import copy
import json
import random
import re

import pytest

from sparseek.tokenizer import ChatFormatError, Tokenizer, default_tokenizer
from sparseek.tokenizer.template import opens_reasoning, render_chat_template

# Written for these tests in the style of DeepSeek-R1's template: old reasoning stripped from the
# history, every reply opened with "<think>\n", unknown roles refused through raise_exception.
R1_STYLE = (
    "{{ bos_token }}{% for m in messages if m['role'] == 'system' %}{{ m['content'] }}{% endfor %}\n"
    "{% for m in messages %}\n"
    "{% if m['role'] == 'user' %}<｜User｜>{{ m['content'] }}\n"
    "{% elif m['role'] == 'assistant' %}<｜Assistant｜>{{ (m['content'] or '').split('</think>')[-1] }}"
    "<｜end▁of▁sentence｜>\n"
    "{% elif m['role'] != 'system' %}{{ raise_exception('unknown role ' + m['role']) }}\n"
    "{% endif %}\n"
    "{% endfor %}\n"
    "{% if add_generation_prompt %}<｜Assistant｜><think>\n"
    "{% endif %}"
)
# V3.1 style: the caller's `thinking` picks the opening, tools rendered with tojson
V31_STYLE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'user' %}<｜User｜>{{ m['content'] }}"
    "{% elif m['role'] == 'assistant' %}<｜Assistant｜></think>{{ m['content'] }}<｜end▁of▁sentence｜>"
    "{% else %}{{ m['content'] }}{% endif %}{% endfor %}"
    "{% if meta is defined %}{{ meta | tojson }}{% endif %}"
    "{% if tools %}## Tools{% for t in tools %}\n{{ t['function']['name'] }}: {{ t['function'] | tojson }}{% endfor %}"
    "{% endif %}"
    "{% if add_generation_prompt %}<｜Assistant｜>{% if thinking %}<think>{% else %}</think>{% endif %}{% endif %}"
)

# The tool-call layouts of V3 / R1 (type, name, fenced JSON; calls on their own lines) and V3.1
# (name, JSON), written for these tests; an assistant turn with calls and no content writes only them.
_TURN = ("{% for m in messages %}{% if m['role'] == 'user' %}<｜User｜>{{ m['content'] }}"
         "{% elif m['role'] == 'assistant' and m['content'] is none %}<｜Assistant｜><｜tool▁calls▁begin｜>"
         "{% for t in m['tool_calls'] %}CALL{% endfor %}<｜tool▁calls▁end｜><｜end▁of▁sentence｜>"
         "{% elif m['role'] == 'assistant' %}<｜Assistant｜>{{ m['content'] }}<｜end▁of▁sentence｜>"
         "{% endif %}{% endfor %}{% if add_generation_prompt %}<｜Assistant｜>{% endif %}")
V3_TOOLS_STYLE = _TURN.replace("CALL", "{{ ('' if loop.first else '\\n') + '<｜tool▁call▁begin｜>' + t['type'] + "
                                       "'<｜tool▁sep｜>' + t['function']['name'] + '\\n```json\\n' + "
                                       "t['function']['arguments'] + '\\n```<｜tool▁call▁end｜>' }}")
V31_TOOLS_STYLE = _TURN.replace("CALL", "{{ '<｜tool▁call▁begin｜>' + t['function']['name'] + '<｜tool▁sep｜>' + "
                                        "t['function']['arguments'] + '<｜tool▁call▁end｜>' }}")
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "<think>add</think>4"}, {"role": "user", "content": "and 3+3? ü"}]


@pytest.fixture(scope="module")
def tok():
    return default_tokenizer(512)


def _with(tok, template):
    t = copy.copy(tok)
    t.chat_template = template
    return t


@pytest.mark.parametrize("template", [R1_STYLE, V31_STYLE])
@pytest.mark.parametrize("thinking", [False, True])
def test_renders_as_transformers_does(tok, template, thinking):
    transformers = pytest.importorskip("transformers")
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=tok.tk, bos_token=tok.bos_token,
                                              eos_token=tok.eos_token)
    hf.chat_template = template
    for gen in (True, False):
        want = hf.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=gen, thinking=thinking,
                                      meta={"lang": "中文"})
        got = render_chat_template(template, CHAT, bos_token=tok.bos_token, eos_token=tok.eos_token,
                                   add_generation_prompt=gen, thinking=thinking, meta={"lang": "中文"})
        assert got == want
    assert ("<think>add</think>" in got) == (template is V31_STYLE)  # R1 drops old reasoning


def test_chat_prompt_picks_the_format_and_the_reply_s_opening(tok):
    # no template: DeepSeek-V4's format, parsed in the mode asked for
    text, mode = tok.chat_prompt(CHAT[:2])
    assert text.endswith("<｜Assistant｜></think>") and mode == "chat"
    assert tok.chat_prompt(CHAT[:2], thinking=True)[1] == "thinking"
    # R1's template opens reasoning whatever is asked
    r1 = _with(tok, R1_STYLE)
    text, mode = r1.chat_prompt(CHAT)
    assert text.endswith("<｜Assistant｜><think>\n") and mode == "thinking" and "</think>" not in text
    assert r1.apply_chat(CHAT) == tok.encode(text)
    v31 = _with(tok, V31_STYLE)
    assert v31.chat_prompt(CHAT, thinking=False)[1] == "chat"
    assert v31.chat_prompt(CHAT, thinking=True)[1] == "thinking"
    assert opens_reasoning("x<think>\n") and not opens_reasoning("x</think>") and not opens_reasoning("<think>a")


def test_template_errors_name_the_problem(tok):
    r1 = _with(tok, R1_STYLE)
    with pytest.raises(ChatFormatError, match="unknown role tool"):
        r1.chat_prompt([{"role": "tool", "content": "42"}])
    with pytest.raises(ChatFormatError, match=r"messages\[1\].tools"):
        r1.chat_prompt([{"role": "system", "content": ""}, {"role": "user", "content": "hi", "tools": [WEATHER]}])
    with pytest.raises(ChatFormatError, match="reasoning_effort"):
        r1.chat_prompt(CHAT, reasoning_effort="high")
    with pytest.raises(ChatFormatError, match=r"messages\[1\].content"):
        r1.chat_prompt([{"role": "user", "content": "a"}, {"role": "user", "content": 3}])
    with pytest.raises(ValueError, match="does not parse"):
        _with(tok, "{% if %}").chat_prompt(CHAT)


def test_template_read_from_the_tokenizer_files_and_saved_back(tok, tmp_path):
    _with(tok, R1_STYLE).save(str(tmp_path / "a"))
    assert Tokenizer.from_dir(str(tmp_path / "a")).chat_template == R1_STYLE
    # transformers >= 4.43 writes chat_template.jinja beside the config; a named-template list too
    (tmp_path / "a" / "chat_template.jinja").write_text(V31_STYLE, encoding="utf-8")
    assert Tokenizer.from_dir(str(tmp_path / "a")).chat_template == V31_STYLE
    tok.save(str(tmp_path / "b"))
    cfg = json.loads((tmp_path / "b" / "tokenizer_config.json").read_text())
    assert "chat_template" not in cfg and Tokenizer.from_dir(str(tmp_path / "b")).chat_template is None
    cfg["chat_template"] = [{"name": "tool_use", "template": "x"}, {"name": "default", "template": R1_STYLE}]
    (tmp_path / "b" / "tokenizer_config.json").write_text(json.dumps(cfg))
    assert Tokenizer.from_dir(str(tmp_path / "b")).chat_template == R1_STYLE


def test_fine_tuning_examples_follow_the_template(tok):
    from sparseek.train.sft import IGNORE, encode_example

    r1 = _with(tok, R1_STYLE)
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there"}]
    ids, labels = encode_example(r1, msgs)
    text = render_chat_template(R1_STYLE, msgs, bos_token=tok.bos_token, eos_token=tok.eos_token,
                                add_generation_prompt=False)
    assert ids == tok.encode(text)
    learned = tok.decode([t for t in labels if t != IGNORE])
    assert learned == "hello there<｜end▁of▁sentence｜>"


def test_tools_reach_the_template_as_transformers_passes_them(tok):
    transformers = pytest.importorskip("transformers")
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=tok.tk, bos_token=tok.bos_token,
                                              eos_token=tok.eos_token)
    hf.chat_template = V31_STYLE
    want = hf.apply_chat_template(CHAT, tools=[WEATHER], tokenize=False, add_generation_prompt=True)
    # sparseek's conversations carry tools on the system message (V4's convention)
    ours = [{**CHAT[0], "tools": [WEATHER]}, *CHAT[1:]]
    text, _ = _with(tok, V31_STYLE).chat_prompt(ours)
    assert text == want and "get_weather: {" in text


V3_CALLS = ("<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n```json\n"
            '{"city": "Paris", "days": 3}\n```<｜tool▁call▁end｜>\n<｜tool▁call▁begin｜>function<｜tool▁sep｜>'
            'get_time\n```json\n{"tz": "CET"}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜><｜end▁of▁sentence｜>')
V31_CALLS = ('<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>get_weather<｜tool▁sep｜>{"city": "Paris", "days": 3}'
             '<｜tool▁call▁end｜><｜tool▁call▁begin｜>get_time<｜tool▁sep｜>{"tz":"CET"}<｜tool▁call▁end｜>'
             "<｜tool▁calls▁end｜><｜end▁of▁sentence｜>")


@pytest.mark.parametrize("calls", [V3_CALLS, V31_CALLS], ids=["v3-r1", "v3.1"])
@pytest.mark.parametrize("mode", ["chat", "thinking"])
def test_v3_family_replies_parse_alike_whole_or_streamed(tok, calls, mode):
    r1 = _with(tok, R1_STYLE)
    text = ("Paris in spring.</think>" if mode == "thinking" else "") + "Let me look.\n\n" + calls
    msg = r1.parse_reply(text, mode)
    assert msg["reasoning_content"] == ("Paris in spring." if mode == "thinking" else "")
    assert msg["content"] == "Let me look.\n\n"
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in msg["tool_calls"]] == [
        ("get_weather", {"city": "Paris", "days": 3}), ("get_time", {"tz": "CET"})]
    rng = random.Random(0)
    for _ in range(40):  # any split of the text gives the same events
        cuts = sorted(rng.sample(range(1, len(text)), rng.randint(1, 12)))
        parser = r1.reply_parser(mode)
        for a, b in zip([0, *cuts], [*cuts, len(text)]):
            parser.feed(text[a:b])
        parser.finish()
        assert parser.message() == msg
    # V4's parser (no template) does not read this markup: it would stay text
    assert not tok.parse_reply(text, mode)["tool_calls"]


@pytest.mark.parametrize("bad, words", [
    ("<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>get_weather{}<｜tool▁call▁end｜>", "no '<｜tool▁sep｜>'"),
    ('<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>f<｜tool▁sep｜>{"a": <｜tool▁call▁end｜>', "not JSON"),
    ("<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>f<｜tool▁sep｜>{}", "unterminated"),
    ("<｜tool▁calls▁begin｜>text", "expected"),
])
def test_malformed_v3_tool_calls_are_named(tok, bad, words):
    with pytest.raises(ChatFormatError, match=re.escape(words)):
        _with(tok, R1_STYLE).parse_reply(bad, "chat")


@pytest.mark.parametrize("template,sep", [(V3_TOOLS_STYLE, "\n"), (V31_TOOLS_STYLE, "")])
def test_tool_call_layout_is_read_off_the_template(tok, template, sep):
    """The layout forced tool calls are held to is the one the template writes: rendering calls
    with it gives the template's own text, which the reply parser reads back."""
    t = _with(tok, template)
    markup = t.tool_markup()
    assert markup.separator == sep
    calls = [("get_weather", '{"city": "Paris"}'), ("now", "{}"), ("add", '{"a": [1, 2], "b": {"c": "ü"}}')]
    turn = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None, "tool_calls": [
        {"type": "function", "function": {"name": n, "arguments": a}} for n, a in calls]}]
    text = render_chat_template(template, turn, bos_token=None, eos_token=None, add_generation_prompt=False)
    assert text.endswith(markup.render(calls) + "<｜end▁of▁sentence｜>")
    got = t.parse_reply(markup.render(calls) + "<｜end▁of▁sentence｜>", "chat")["tool_calls"]
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in got] == \
        [(n, json.loads(a)) for n, a in calls]


def test_templates_without_a_tool_layout_refuse_forced_calls(tok):
    assert tok.tool_markup() is None  # V4's format: DSML
    with pytest.raises(ChatFormatError, match="writes none that sparseek reads back"):
        _with(tok, R1_STYLE).tool_markup()


# DeepSeek-V4's format as a Jinja template (what GGUF exports carry for llama.cpp and the like)
V4_CONVERSATIONS = [
    [{"role": "user", "content": "hi"}],
    [{"role": "user", "content": "look it up"},
     {"role": "assistant", "content": "", "tool_calls": [{"type": "function",
                                                          "function": {"name": "search", "arguments": {"q": "x"}}}]},
     {"role": "tool", "content": "found"}, {"role": "user", "content": "and now? ü"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
     {"role": "assistant", "content": "hello", "reasoning_content": "greet back"}, {"role": "user", "content": "2+2?"}],
    [{"role": "system", "content": "S", "tools": [WEATHER]}, {"role": "user", "content": "weather in Paris?"},
     {"role": "assistant", "content": "", "reasoning_content": "ask the tool",
      "tool_calls": [{"id": "a", "type": "function",
                      "function": {"name": "get_weather", "arguments": {"city": "Paris", "days": 3, "o": {"k": [1, "é"]}}}},
                     {"id": "b", "type": "function", "function": {"name": "now", "arguments": {}}}]},
     {"role": "tool", "tool_call_id": "a", "content": "sunny"}, {"role": "tool", "tool_call_id": "b", "content": "noon"},
     {"role": "assistant", "content": "Sunny.", "reasoning_content": "done"}, {"role": "user", "content": "thanks"}],
    [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}, {"role": "assistant", "content": "c"}],
]


@pytest.mark.parametrize("conv", range(len(V4_CONVERSATIONS)))
@pytest.mark.parametrize("thinking", [False, True])
def test_v4_jinja_template_renders_the_encoder_s_prompt(conv, thinking):
    """Rendered by sparseek's Jinja environment and by transformers', the V4 template gives the
    prompt sparseek's own encoder writes (tools on a system message there, passed beside the
    messages to a template)."""
    transformers = pytest.importorskip("transformers")
    from sparseek.tokenizer import deepseek_v4
    from sparseek.tokenizer.chat import BOS, EOS, encode_messages, v4_jinja_template

    messages = V4_CONVERSATIONS[conv]
    want = encode_messages(messages, thinking_mode="thinking" if thinking else "chat")
    gen = messages[-1]["role"] != "assistant"
    got = render_chat_template(v4_jinja_template(), messages, bos_token=BOS, eos_token=EOS, thinking=thinking,
                               add_generation_prompt=gen)
    assert got == want
    tools = [t for m in messages for t in m.get("tools") or ()] or None
    plain = [{k: v for k, v in m.items() if k != "tools"} for m in messages]
    tok = deepseek_v4()
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=tok.tk, bos_token=BOS, eos_token=EOS)
    assert hf.apply_chat_template(plain, chat_template=v4_jinja_template(), tools=tools, tokenize=False,
                                  add_generation_prompt=gen, thinking=thinking) == want


def test_v4_jinja_template_tools_without_a_system_message_and_refusals():
    from sparseek.tokenizer.chat import BOS, EOS, encode_messages, v4_jinja_template

    messages = [{"role": "user", "content": "weather?"}]
    got = render_chat_template(v4_jinja_template(), messages, bos_token=BOS, eos_token=EOS, tools=[WEATHER])
    assert got == encode_messages([{"role": "system", "content": "", "tools": [WEATHER]}] + messages)
    with pytest.raises(ChatFormatError, match="role developer"):
        render_chat_template(v4_jinja_template(), [{"role": "developer", "content": "x"}], bos_token=BOS, eos_token=EOS)
    call = {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "f", "arguments": '{"a": 1}'}}]}
    with pytest.raises(ChatFormatError, match="arguments must be an object"):
        render_chat_template(v4_jinja_template(), messages + [call], bos_token=BOS, eos_token=EOS)
