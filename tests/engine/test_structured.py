"""Structured outputs: every completion parses as its JSON schema or regex says, sampled or greedy,
batched with unconstrained requests that stay as they are alone."""

from __future__ import annotations

import json
import re
from dataclasses import replace

import pytest

from sparseek.engine import LLM, SamplingParams
from sparseek.tokenizer.chat import ChatFormatError, _render_tool_calls, parse_completion, reply_format

pytest.importorskip("xgrammar")

SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"}, "kind": {"enum": ["cat", "dog", "eel"]},
                                           "n": {"type": "integer", "minimum": 0, "maximum": 99}},
          "required": ["ok", "kind", "n"]}


def _llm(model, tok, **kw):
    return LLM(model, tok, **{"max_batch_size": 4, "max_seq_len": 256, **kw})


def test_json_schema_and_regex_hold_batched_with_free_requests(model, tok):
    llm = _llm(model, tok)
    free = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    params = [SamplingParams(max_tokens=80, temperature=1.0, seed=s, json_schema=SCHEMA) for s in range(3)]
    params += [SamplingParams(max_tokens=80, temperature=0, json_schema=SCHEMA),
               SamplingParams(max_tokens=30, temperature=0.9, seed=7, regex=r"[0-9]{3}-[a-z]{2}"),
               SamplingParams(max_tokens=30, temperature=0, json_schema=True), free]
    prompts = ["x = ", "def f():", "{", "import json", "id: ", "data = ", "class A:"]
    outs = llm.generate(prompts, params)
    for o in outs[:4]:
        value = json.loads(o.text)
        assert set(value) == {"ok", "kind", "n"} and isinstance(value["ok"], bool)
        assert value["kind"] in ("cat", "dog", "eel") and 0 <= value["n"] <= 99 and o.finish_reason == "stop"
    assert re.fullmatch(r"[0-9]{3}-[a-z]{2}", outs[4].text) and outs[4].finish_reason == "stop"
    assert outs[5].finish_reason == "length" or json.loads(outs[5].text) is not None
    assert len({o.text for o in outs[:3]}) > 1  # sampled apart: the mask does not make them equal
    alone = _llm(model, tok).generate([prompts[-1]], free)[0]
    assert outs[-1].token_ids == alone.token_ids  # a free request is untouched by its neighbours' grammars


def test_structured_streaming_and_bad_specs(model, tok):
    llm = _llm(model, tok)
    sp = SamplingParams(max_tokens=80, temperature=0.7, seed=3, json_schema=SCHEMA)
    text = "".join(d.text for d in llm.stream("q", sp))
    assert text == llm.generate(["q"], sp)[0].text and json.loads(text)["kind"] in ("cat", "dog", "eel")
    # properties come in the schema's order, not sorted (xgrammar follows the order it is given)
    unsorted = {"type": "object", "properties": {"zeta": {"enum": [1]}, "alpha": {"enum": [2]}},
                "required": ["zeta", "alpha"]}
    assert llm.generate(["q"], SamplingParams(max_tokens=40, temperature=0, json_schema=unsorted))[0].text == \
        '{"zeta": 1, "alpha": 2}'
    with pytest.raises(ValueError, match="regex"):
        llm.generate(["q"], SamplingParams(regex="([a-z"))
    with pytest.raises(ValueError, match="json_schema"):
        SamplingParams(json_schema="{}")
    with pytest.raises(ValueError, match="not given with json_schema"):
        SamplingParams(json_schema=True, regex="a")
    with pytest.raises(ValueError, match="tokenizer"):
        LLM(model, None, max_seq_len=64).generate([[1, 2]], SamplingParams(json_schema=True))


TOOLS = [{"type": "function", "function": {"name": "go", "parameters": {
             "type": "object", "required": ["to", "n"],
             "properties": {"to": {"type": "string", "enum": ["x", "yz"]}, "n": {"type": "integer", "minimum": 1,
                                                                                  "maximum": 9},
                            "fast": {"type": "boolean"}, "tag": {"type": ["string", "null"], "pattern": "[a-c]"}}}}},
         {"type": "function", "function": {"name": "ping", "parameters": {"type": "object", "properties": {}}}},
         {"type": "function", "function": {"name": "opt", "parameters": {
             "type": "object", "properties": {"a": {"type": "boolean"}, "b": {"enum": [1, 2]}}}}}]


def _guide(tok, tag):
    from sparseek.engine.structured import make_guide

    return make_guide(tok, 512, {tok.eos_id}, structural_tag=tag)


def _calls(message) -> list[tuple[str, dict]]:
    return [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in message["tool_calls"]]


def _render(calls):
    return _render_tool_calls([{"type": "function", "function": {"name": n, "arguments": json.dumps(a)}}
                               for n, a in calls], 0)


@pytest.mark.parametrize("thinking", [False, True])
def test_reply_format_takes_what_the_chat_format_writes_and_nothing_else(tok, thinking):
    """The grammar of a forced tool call accepts exactly the DSML the prompt encoder renders (and
    the parser reads), each call's arguments as its tool's schema allows."""
    head = "I should call go.</think>" if thinking else ""
    good = [[("go", {"to": "yz", "n": 3})], [("go", {"to": "x", "n": 9, "fast": False, "tag": None})],
            [("go", {"to": "x", "n": 1, "tag": "b"}), ("ping", {}), ("opt", {})],
            [("opt", {"b": 2})], [("opt", {"a": True, "b": 1})]]
    bad = [[("go", {"n": 3})], [("go", {"to": "q", "n": 3})], [("go", {"to": "x", "n": 10})],
           [("go", {"n": 3, "to": "x"})], [("go", {"to": "x", "n": 1, "tag": "d"})], [("nope", {})],
           [("opt", {"b": 3})], [("opt", {"a": "yes"})]]
    required = reply_format(thinking, tools=TOOLS, tool_choice="required")
    for calls, ok in [(c, True) for c in good] + [(c, False) for c in bad]:
        g = _guide(tok, required)
        text = head + _render(calls)
        assert (g.matcher.accept_string(text) and g.matcher.accept_token(tok.eos_id)) == ok, text
        if ok:
            assert g.done and _calls(parse_completion(text, "thinking" if thinking else "chat")) == calls
    one = reply_format(thinking, tools=TOOLS, tool_choice="required", parallel_tool_calls=False)
    named = reply_format(thinking, tools=TOOLS, tool_choice="ping")
    for tag, calls, ok in ((one, [("ping", {})], True), (one, [("ping", {}), ("ping", {})], False),
                           (named, [("ping", {})], True), (named, [("opt", {})], False)):
        g = _guide(tok, tag)
        assert (g.matcher.accept_string(head + _render(calls)) and g.matcher.accept_token(tok.eos_id)) == ok
    if thinking:  # special tokens cannot hide in the reasoning
        assert not _guide(tok, named).matcher.accept_string("a<｜User｜>b</think>")
    # "auto" (strict tools): a free answer, which may end in a held tool-call block and then stops
    auto = reply_format(thinking, tools=TOOLS, tool_choice="auto")
    call = _render([("go", {"to": "x", "n": 3})])
    for text, ok in (("Hello.", True), ("", True), ("a\n\nb", True), ("Let me see." + call, True), (call, True),
                     ("Hi" + _render([("go", {"to": "q", "n": 3})]), False), ("Hi" + call + "more", False),
                     ("a <｜User｜> b", False), ("a ｜DSML｜ b", False)):
        g = _guide(tok, auto)
        assert (g.matcher.accept_string(head + text) and g.matcher.accept_token(tok.eos_id)) == ok, text
    with pytest.raises(ChatFormatError, match="not among the tools"):
        reply_format(thinking, tools=TOOLS, tool_choice="fly")
    with pytest.raises(ChatFormatError, match="at least one tool"):
        reply_format(thinking, tools=[], tool_choice="required")


def test_forced_tool_calls_sampled_from_a_random_model_always_parse(model, tok):
    """Whatever a (random) model samples under the grammar, the reply is tool calls that parse,
    with arguments of their schemas; a named tool is called once; thinking keeps its reasoning free
    and then holds a JSON answer to its schema."""
    llm = _llm(model, tok, max_seq_len=512)
    # one call each: a random model, free to go on, would rarely close the block in time
    required = reply_format(False, tools=TOOLS[:2], tool_choice="required", parallel_tool_calls=False)
    params = [SamplingParams(max_tokens=400, temperature=1.0, seed=0, structural_tag=required)]
    params.append(SamplingParams(max_tokens=400, temperature=0.8, seed=5,
                                 structural_tag=reply_format(False, tools=TOOLS, tool_choice="opt")))
    # "auto": free text first; pushed towards "\n", "<" and the DSML token, which the grammar lets in
    # only as the start of a tool-call block, the model soon opens one
    nudge = {tok.token_to_id("｜DSML｜"): 100, tok.encode("\n")[0]: 8, tok.encode("<")[0]: 8}
    params.append(SamplingParams(max_tokens=400, temperature=1.0, seed=0, logit_bias=nudge, structural_tag=reply_format(
        False, tools=TOOLS[:2], tool_choice="auto", parallel_tool_calls=False)))
    outs = llm.generate(["a", "d", "e"], [replace(p, skip_special_tokens=False) for p in params])
    auto = outs.pop()
    assert auto.finish_reason == "stop" and "｜DSML｜" not in auto.text.split("\n\n<｜DSML｜tool_calls>")[0]
    assert parse_completion(auto.text)["content"] == auto.text.split("\n\n<｜DSML｜tool_calls>")[0]
    assert all(o.finish_reason == "stop" and o.text.startswith("\n\n<｜DSML｜tool_calls>") for o in outs)
    for o in outs[:1] + [auto]:
        for name, a in _calls(parse_completion(o.text)):
            if name == "go":
                assert a["to"] in ("x", "yz") and 1 <= a["n"] <= 9 and set(a) <= {"to", "n", "fast", "tag"}
                assert a.get("tag") in (None, "a", "b", "c") and a.get("fast") in (None, True, False)
            else:
                assert name == "ping" and a == {}
    [(name, a)] = _calls(parse_completion(outs[1].text))
    assert name == "opt" and set(a) <= {"a", "b"}
    think = reply_format(True, json_schema=SCHEMA)
    sp = SamplingParams(max_tokens=120, temperature=1.0, seed=2, structural_tag=think, skip_special_tokens=False,
                        logit_bias={tok.token_to_id("</think>"): 4.0})
    o = llm.generate(["q"], sp)[0]
    reply = parse_completion(o.text, "thinking")
    assert o.finish_reason == "stop" and set(json.loads(reply["content"])) == {"ok", "kind", "n"}


def test_structured_outputs_under_speculative_decoding(model, tok):
    """The MTP drafts are held to the grammar too (each draft masked after the ones before it):
    greedy tokens equal plain greedy decoding's, sampled ones still parse."""
    spec, plain = _llm(model, tok, speculative_tokens=2), _llm(model, tok)
    greedy = [SamplingParams(max_tokens=80, temperature=0, json_schema=SCHEMA),
              SamplingParams(max_tokens=30, temperature=0, regex=r"[0-9]{3}-[a-z]{2}")]
    prompts = ["x = ", "id: "]
    want = plain.generate(prompts, greedy)
    got = spec.generate(prompts, greedy)
    assert [o.token_ids for o in got] == [o.token_ids for o in want]
    assert json.loads(got[0].text)["kind"] in ("cat", "dog", "eel") and re.fullmatch(r"[0-9]{3}-[a-z]{2}", got[1].text)
    assert got[0].drafted > 0
    sampled = spec.generate(["a", "b"], [SamplingParams(max_tokens=80, temperature=1.0, seed=s, json_schema=SCHEMA)
                                         for s in range(2)])
    assert all(set(json.loads(o.text)) == {"ok", "kind", "n"} and o.finish_reason == "stop" for o in sampled)


def test_llm_chat_forces_a_named_tool(model, tok):
    llm = _llm(model, tok, max_seq_len=1024)
    msgs = [{"role": "system", "content": "", "tools": TOOLS}, {"role": "user", "content": "go"}]
    out = llm.chat(msgs, SamplingParams(max_tokens=300, temperature=1.0, seed=3), tool_choice="ping")
    assert out.finish_reason == "stop" and _calls(out.message) == [("ping", {})] and not out.message["content"]
    with pytest.raises(ChatFormatError, match="not among the tools"):
        llm.chat(msgs, tool_choice="fly")


@pytest.mark.parametrize("style", ["V3_TOOLS_STYLE", "V31_TOOLS_STYLE"])
def test_forced_tool_calls_in_a_template_s_layout(model, tok, style):
    """A checkpoint with its own template (V3 / R1, V3.1): forced calls are held to the layout the
    template writes, the arguments to each tool's schema; what a random model samples parses."""
    import copy

    import tests.tokenizer.test_template as templates

    t = copy.copy(tok)
    t.chat_template = getattr(templates, style)
    markup = t.tool_markup()
    required = reply_format(False, tools=TOOLS, tool_choice="required", markup=markup)
    for calls, ok in (([("go", {"to": "yz", "n": 3}), ("ping", {})], True), ([("opt", {"b": 2})], True),
                      ([("go", {"to": "q", "n": 3})], False), ([("nope", {})], False), ([], False)):
        g = _guide(t, required)
        text = markup.render([(n, json.dumps(a)) for n, a in calls])
        assert (g.matcher.accept_string(text) and g.matcher.accept_token(tok.eos_id)) == ok, text
        assert not ok or _calls(t.parse_reply(text, "chat")) == calls
    llm = _llm(model, t, max_seq_len=1024)
    msgs = [{"role": "system", "content": "", "tools": TOOLS}, {"role": "user", "content": "go"}]
    out = llm.chat(msgs, SamplingParams(max_tokens=300, temperature=1.0, seed=3), tool_choice="go")
    [(name, a)] = _calls(out.message)
    assert out.finish_reason == "stop" and name == "go" and not out.message["content"]
    assert a["to"] in ("x", "yz") and 1 <= a["n"] <= 9 and set(a) <= {"to", "n", "fast", "tag"}
