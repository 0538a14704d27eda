"""Structured outputs: every completion parses as its JSON schema or regex says, sampled or greedy,
batched with unconstrained requests that stay as they are alone."""

from __future__ import annotations

import json
import re

import pytest

from sparseek.engine import LLM, SamplingParams

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
    with pytest.raises(ValueError, match="regex"):
        llm.generate(["q"], SamplingParams(regex="([a-z"))
    with pytest.raises(ValueError, match="json_schema"):
        SamplingParams(json_schema="{}")
    with pytest.raises(ValueError, match="not given with json_schema"):
        SamplingParams(json_schema=True, regex="a")
    with pytest.raises(ValueError, match="speculative"):
        _llm(model, tok, speculative_tokens=1).generate(["q"], SamplingParams(json_schema=True))
    with pytest.raises(ValueError, match="tokenizer"):
        LLM(model, None, max_seq_len=64).generate([[1, 2]], SamplingParams(json_schema=True))
