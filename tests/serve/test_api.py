"""The OpenAI-compatible server: answers equal the engine's, streams equal whole answers, bad
requests get 400s that name the problem, the server survives a failed step, and the official
OpenAI client talks to it (with concurrent requests batched together)."""

from __future__ import annotations

import asyncio
import json
import re
import socket
import threading
import time

import pytest

from sparseek.checkpoint.adapters import merge_adapters
from sparseek.engine import LLM, SamplingParams
from sparseek.engine.async_engine import AsyncEngine, EngineBusy
from sparseek.serve import build_app
from sparseek.serve.protocol import ChatText

fastapi = pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

KEY = "sk-test"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def specials(tok):
    """logit_bias that bans the special tokens (a random model emits them anywhere)."""
    return {str(i): -100 for i in range(16)}


def _llm(model, tok, **kw):
    return LLM(model, tok, **{"max_batch_size": 4, "max_seq_len": 256, **kw})


@pytest.fixture(scope="module")
def client(model, tok):
    with TestClient(build_app(_llm(model, tok), "dbg", api_key=KEY)) as c:
        yield c


def _events(text: str) -> list:
    """The JSON chunks of a server-sent-event stream, which must end with [DONE]."""
    lines = [ln[len("data: "):] for ln in text.split("\n\n") if ln.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(x) for x in lines[:-1]]


def test_completion_equals_the_engine(client, model, tok):
    prompts = ["def main(", "import os\n"]
    params = SamplingParams(max_tokens=12, temperature=0, logprobs=3)
    want = _llm(model, tok).generate(prompts, params)
    r = client.post("/v1/completions", headers=AUTH,
                    json={"prompt": prompts, "max_tokens": 12, "temperature": 0, "logprobs": 3})
    assert r.status_code == 200, r.text
    body = r.json()
    assert [c["index"] for c in body["choices"]] == [0, 1]
    for c, w in zip(body["choices"], want):
        assert c["text"] == w.text and c["finish_reason"] == w.finish_reason
        lp = c["logprobs"]
        assert lp["token_logprobs"] == pytest.approx([e[t] for t, e in zip(w.token_ids, w.logprobs)])
        assert lp["tokens"] == [tok.token_bytes(t).decode("utf-8", "replace") for t in w.token_ids]
        assert all(len(t) <= 3 for t in lp["top_logprobs"])
    n_prompt = sum(len(w.prompt_token_ids) for w in want)
    assert body["usage"] == {"prompt_tokens": n_prompt, "completion_tokens": 24, "total_tokens": n_prompt + 24,
                             "prompt_tokens_details": {"cached_tokens": 0}}  # short prompts: never cached


def test_vllm_sampling_extras_equal_the_engine(client, model, tok):
    """vLLM's include_stop_str_in_output, allowed_token_ids, bad_words and truncate_prompt_tokens
    reach the engine (the same text as it gives), and a prompt too long for the context fits once
    truncated (the usage counts what was read; echo returns the kept part)."""
    free = _llm(model, tok).generate(["def main("], SamplingParams(max_tokens=16, temperature=0))[0]
    stop = free.text[6:8]
    extras = {"include_stop_str_in_output": True, "stop": stop, "allowed_token_ids": list(range(40, 300)),
              "bad_words": [tok.decode(free.token_ids[2:4]).strip() or "x"]}
    want = _llm(model, tok).generate(["def main("], SamplingParams(
        max_tokens=16, temperature=0, stop=stop, include_stop_str_in_output=True,
        allowed_token_ids=list(range(40, 300)), bad_words=extras["bad_words"]))[0]
    r = client.post("/v1/completions", headers=AUTH, json={"prompt": "def main(", "max_tokens": 16,
                                                            "temperature": 0, **extras})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == want.text and want.token_ids != free.token_ids
    long_ids = list(range(20, 320))  # 300 tokens: more than the 256-token context
    assert client.post("/v1/completions", headers=AUTH, json={"prompt": long_ids, "max_tokens": 4}).status_code == 400
    r = client.post("/v1/completions", headers=AUTH, json={"prompt": long_ids, "max_tokens": 4, "temperature": 0,
                                                            "truncate_prompt_tokens": 100, "echo": True})
    want = _llm(model, tok).generate([long_ids[-100:]], SamplingParams(max_tokens=4, temperature=0))[0]
    body = r.json()
    assert r.status_code == 200 and body["usage"]["prompt_tokens"] == 100
    assert body["choices"][0]["text"] == tok.decode(long_ids[-100:]) + want.text
    r = client.post("/v1/completions", headers=AUTH, json={"prompt": "x", "truncate_prompt_tokens": 0})
    assert r.status_code == 400 and r.json()["error"]["param"] == "truncate_prompt_tokens"


def test_stream_equals_whole_answer(client):
    req = {"prompt": "class A:", "max_tokens": 10, "temperature": 0.8, "seed": 5, "n": 2, "stop": ["\n\n"],
           "logprobs": 1}
    whole = client.post("/v1/completions", headers=AUTH, json=req).json()
    r = client.post("/v1/completions", headers=AUTH,
                    json={**req, "stream": True, "stream_options": {"include_usage": True}})
    chunks = _events(r.text)
    text, reasons, offsets = {0: "", 1: ""}, {}, {0: [], 1: []}
    for c in chunks[:-1]:
        for ch in c["choices"]:
            text[ch["index"]] += ch["text"]
            offsets[ch["index"]] += ch["logprobs"]["text_offset"]
            if ch["finish_reason"]:
                reasons[ch["index"]] = ch["finish_reason"]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == whole["usage"]
    assert all("usage" not in c for c in chunks[:-1])
    r = client.post("/v1/completions", headers=AUTH,
                    json={**req, "stream": True, "stream_options": {"continuous_usage_stats": True}})
    counts = [c["usage"]["completion_tokens"] for c in _events(r.text)]
    assert counts == sorted(counts) and counts[-1] == whole["usage"]["completion_tokens"]
    for ch in whole["choices"]:
        assert text[ch["index"]] == ch["text"] and reasons[ch["index"]] == ch["finish_reason"]
        assert offsets[ch["index"]] == ch["logprobs"]["text_offset"]
    assert whole["choices"][0]["text"] != whole["choices"][1]["text"]  # n samples, sampled apart


def test_echo_with_prompt_logprobs(client, model, tok):
    r = client.post("/v1/completions", headers=AUTH,
                    json={"prompt": "x = 1\n", "max_tokens": 3, "temperature": 0, "echo": True, "logprobs": 1})
    c = r.json()["choices"][0]
    ids = tok.encode("x = 1\n", add_bos=True)
    assert c["text"].startswith("x = 1\n")
    lp = c["logprobs"]["token_logprobs"]
    assert len(lp) == len(ids) + 3 and lp[0] is None and all(v is not None for v in lp[1:])
    want = _llm(model, tok).generate([ids], SamplingParams(max_tokens=3, temperature=0, prompt_logprobs=1))[0]
    assert lp[1:len(ids)] == pytest.approx([e[t] for t, e in zip(ids[1:], want.prompt_logprobs[1:])])


def test_chat_equals_the_engine(client, model, tok, specials):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}]
    bias = {int(k): v for k, v in specials.items()}
    llm = _llm(model, tok)
    want = llm.chat(messages, SamplingParams(max_tokens=10, temperature=0, logit_bias=bias))
    r = client.post("/v1/chat/completions", headers=AUTH,
                    json={"messages": messages, "max_tokens": 10, "temperature": 0, "logit_bias": specials,
                          "logprobs": True, "top_logprobs": 2})
    assert r.status_code == 200, r.text
    body = r.json()
    [c] = body["choices"]
    assert c["message"]["content"] == want.message["content"] and c["message"]["role"] == "assistant"
    assert [e["bytes"] for e in c["logprobs"]["content"]] == [list(tok.token_bytes(t)) for t in want.token_ids]
    assert all(len(e["top_logprobs"]) == 2 for e in c["logprobs"]["content"])
    assert body["usage"]["prompt_tokens"] == len(want.prompt_token_ids)
    # streamed: the same content, the role first
    r = client.post("/v1/chat/completions", headers=AUTH,
                    json={"messages": messages, "max_tokens": 10, "temperature": 0, "logit_bias": specials,
                          "stream": True})
    chunks = _events(r.text)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == want.message["content"]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_usage_counts_prompt_tokens_the_prefix_cache_spared(client):
    body = {"messages": [{"role": "user", "content": "tell me about the ocean " * 12}], "max_tokens": 2,
            "temperature": 0}
    first, again = (client.post("/v1/chat/completions", headers=AUTH, json=body).json()["usage"] for _ in range(2))
    assert first["prompt_tokens"] == again["prompt_tokens"] > 48
    assert first["prompt_tokens_details"]["cached_tokens"] == 0
    assert again["prompt_tokens_details"]["cached_tokens"] == again["prompt_tokens"]  # read nothing again
    r = client.post("/v1/responses", headers=AUTH, json={"input": body["messages"], "max_output_tokens": 2,
                                                         "temperature": 0}).json()["usage"]
    assert r["input_tokens_details"]["cached_tokens"] == r["input_tokens"] == first["prompt_tokens"]


def test_chat_thinking_reports_reasoning(client, tok, specials):
    bias = {**specials, str(tok.token_to_id("</think>")): 0}  # the model may end its reasoning
    r = client.post("/v1/chat/completions", headers=AUTH,
                    json={"messages": [{"role": "user", "content": "2+2?"}], "max_tokens": 6, "temperature": 0,
                          "logit_bias": bias, "chat_template_kwargs": {"thinking": True}})
    msg = r.json()["choices"][0]["message"]
    # a reply cut inside the reasoning keeps its text as reasoning, not as the answer
    assert msg["reasoning_content"] and not msg["content"]


def test_chat_text_parses_tool_calls_as_streamed_or_whole():
    completion = ("Let me check.\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name=\"get_weather\">\n"
                  "<｜DSML｜parameter name=\"city\" string=\"true\">Paris</｜DSML｜parameter>\n"
                  "<｜DSML｜parameter name=\"days\" string=\"false\">3</｜DSML｜parameter>\n"
                  "</｜DSML｜invoke>\n</｜DSML｜tool_calls>")
    whole = ChatText(False)
    evs = whole.feed(completion, True)
    streamed, parts = ChatText(False), []
    for i in range(0, len(completion), 7):
        chunk = completion[i:i + 7]
        parts += streamed.feed(chunk, i + 7 >= len(completion))
    assert ChatText.delta(parts, []) == ChatText.delta(evs, []) == {"content": "Let me check."}
    for t in (whole, streamed):
        [call] = t.tool_calls
        assert call["function"] == {"name": "get_weather", "arguments": json.dumps({"city": "Paris", "days": 3})}
        assert call["id"].startswith("call-") and call["type"] == "function"
    broken = ChatText(False)  # </think> where an answer is: the text is kept as content
    evs = broken.feed("ok </think> then", False) + broken.feed(" more", True)
    assert broken.broken and ChatText.delta(evs, []) == {"content": "ok </think> then more"}


@pytest.mark.parametrize("body, status, param, words", [
    ({"prompt": "x", "foo": 1}, 400, "foo", "unknown field"),
    ({"prompt": "x", "temperature": "hot"}, 400, "temperature", "temperature"),
    ({"prompt": "x", "top_p": 0}, 400, "top_p", "top_p"),
    ({"prompt": "x", "max_tokens": 0}, 400, "max_tokens", "max_tokens"),
    ({"prompt": "x " * 400, "max_tokens": 4}, 400, "max_tokens", "maximum context length is 256"),
    ({"prompt": [1, 2, 99999]}, 400, "prompt", "outside"),
    ({"prompt": []}, 400, "prompt", "empty"),
    ({"prompt": "x", "model": "gpt-4"}, 404, "model", "does not exist"),
    ({"prompt": "x", "logit_bias": {"7": 500}}, 400, "logit_bias", "[-100, 100]"),
    ({"prompt": "x", "suffix": "y"}, 400, "suffix", "not supported"),
    ([1, 2], 400, None, "JSON object"),
])
def test_bad_completion_requests_name_the_problem(client, body, status, param, words):
    r = client.post("/v1/completions", headers=AUTH, json=body)
    assert r.status_code == status
    err = r.json()["error"]
    assert words in err["message"] and err["param"] == param and err["type"]


@pytest.mark.parametrize("body, words", [
    ({"messages": [{"role": "wizard", "content": "x"}]}, "unknown role"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "user", "content": "x"}], "tool_choice": "required"}, "tool_choice"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "u"}}]}]}, "text parts"),
    ({"messages": [{"role": "user", "content": "x"}], "chat_template_kwargs": {"thinkin": True}}, "thinkin"),
])
def test_bad_chat_requests_name_the_problem(client, body, words):
    r = client.post("/v1/chat/completions", headers=AUTH, json=body)
    assert r.status_code == 400 and words in r.json()["error"]["message"]


def test_api_key_and_open_endpoints(client):
    assert client.post("/v1/completions", json={"prompt": "x"}).status_code == 401
    r = client.get("/v1/models", headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert client.get("/v1/models", headers=AUTH).json()["data"][0]["id"] == "dbg"
    assert client.get("/health").json()["status"] == "ok"  # no key: load balancers probe it
    r = client.post("/v1/completions", headers=AUTH, content=b"{not json")
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]


def test_a_failed_step_fails_its_request_and_the_server_lives(model, tok):
    llm = _llm(model, tok)
    real, calls = llm._decode, []

    def flaky(running, cache):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("simulated device error")
        return real(running, cache)

    llm._decode = flaky
    with TestClient(build_app(llm, "dbg")) as c:
        req = {"prompt": "abc", "max_tokens": 5, "temperature": 0}
        r = c.post("/v1/completions", json=req)
        assert r.status_code == 500 and "simulated device error" in r.json()["error"]["message"]
        r = c.post("/v1/completions", json=req)
        assert r.status_code == 200
        assert r.json()["choices"][0]["text"] == _llm(model, tok).generate(["abc"], SamplingParams(
            max_tokens=5, temperature=0))[0].text
        assert c.get("/health").json()["steps_failed"] == 1


def test_abort_frees_the_slot_and_spares_the_others(model, tok):
    """A reader that stops (a client that went away) aborts its request at the next step; the
    request batched with it goes on to the same tokens as alone."""
    llm = _llm(model, tok, max_batch_size=2)
    keep = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)
    alone = _llm(model, tok).generate(["hello world"], keep)[0]
    engine = AsyncEngine(llm).start()

    async def run():
        a = engine.submit("x = [", SamplingParams(max_tokens=200, temperature=0, ignore_eos=True))
        b = engine.submit("hello world", keep)
        got_a = []
        async for d in a:
            got_a.append(d)
            if len(got_a) == 3:
                break  # the reader goes away
        ids = [t async for d in b for t in d.token_ids]
        return got_a, ids

    try:
        got_a, ids = asyncio.run(run())
        assert ids == alone.token_ids
        deadline = time.time() + 10
        while engine.load["in_flight"] and time.time() < deadline:
            time.sleep(0.05)
        assert engine.load == {"in_flight": 0, "queued": 0, "aborted": 1}
        assert len(got_a) == 3
    finally:
        engine.shutdown()


def test_busy_engine_refuses_past_its_queue(model, tok):
    engine = AsyncEngine(_llm(model, tok, max_batch_size=1), max_waiting=1)  # not started: nothing drains

    async def run():
        engine.submit([1, 2, 3])
        engine.submit([1, 2, 3])
        with pytest.raises(EngineBusy, match="too many requests"):
            engine.submit([1, 2, 3])
        with pytest.raises(ValueError, match="outside"):
            engine.submit([1, 2, 10**6])

    asyncio.run(run())
    assert engine.load["queued"] == 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_openai_client_with_concurrent_requests(model, tok, specials, monkeypatch):
    """The official client against a real uvicorn server: concurrent requests share the batch
    and each gets what it gets alone; streaming through the client yields the same text."""
    openai = pytest.importorskip("openai")
    import uvicorn

    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(build_app(_llm(model, tok), "dbg", api_key=KEY), host="127.0.0.1",
                                           port=port, log_level="warning"))
    th = threading.Thread(target=server.run, daemon=True)
    th.start()
    try:
        deadline = time.time() + 30
        while not server.started and time.time() < deadline:
            time.sleep(0.05)
        cli = openai.OpenAI(api_key=KEY, base_url=f"http://127.0.0.1:{port}/v1", max_retries=0)
        prompts = ["def f(x):", "import sys", "for i in range(", "while True:", "# a comment", "print("]
        lengths = [12, 5, 9, 16, 3, 7]
        alone = [_llm(model, tok).generate([p], SamplingParams(max_tokens=n, temperature=0))[0].text
                 for p, n in zip(prompts, lengths)]
        results = [None] * len(prompts)

        def ask(i):
            r = cli.completions.create(model="dbg", prompt=prompts[i], max_tokens=lengths[i], temperature=0)
            results[i] = r.choices[0].text

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(prompts))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert results == alone
        msgs = [{"role": "user", "content": "hi"}]
        whole = cli.chat.completions.create(model="dbg", messages=msgs, max_tokens=8, temperature=0,
                                            logit_bias=specials)
        parts = [c.choices[0].delta.content or "" for c in cli.chat.completions.create(
            model="dbg", messages=msgs, max_tokens=8, temperature=0, logit_bias=specials, stream=True) if c.choices]
        assert "".join(parts) == whole.choices[0].message.content and whole.usage.completion_tokens == 8
        with pytest.raises(openai.BadRequestError, match="unknown field"):
            cli.completions.create(model="dbg", prompt="x", extra_body={"nonsense": 1})
        # a streaming client that goes away mid-answer frees its slot; each forward is slowed so the
        # 250-token answer cannot finish before the client asks /health (the debug model is fast)
        import httpx

        forward = model.forward

        def slow_forward(*a, **k):
            time.sleep(0.01)
            return forward(*a, **k)

        monkeypatch.setattr(model, "forward", slow_forward)

        with httpx.Client(base_url=f"http://127.0.0.1:{port}", headers=AUTH, timeout=30) as h:
            with h.stream("POST", "/v1/completions", json={"prompt": "x", "max_tokens": 250, "temperature": 0,
                                                           "ignore_eos": True, "stream": True}) as r:
                lines = [ln for _, ln in zip(range(8), r.iter_lines()) if ln]
                assert len(lines) == 4 and h.get("/health").json()["in_flight"] == 1
            deadline = time.time() + 20
            while h.get("/health").json()["in_flight"] and time.time() < deadline:
                time.sleep(0.05)
            health = h.get("/health").json()
            assert health["in_flight"] == 0 and health["aborted"] == 1
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(api_key="bad", base_url=f"http://127.0.0.1:{port}/v1", max_retries=0).models.list()
    finally:
        server.should_exit = True
        th.join(10)


def test_a_server_bug_is_a_500_in_the_api_shape(model, tok, monkeypatch):
    from sparseek.serve import protocol

    def broken(*a, **k):
        raise KeyError("oops")

    monkeypatch.setattr(protocol.TokenText, "completion", broken)
    with TestClient(build_app(_llm(model, tok), "dbg"), raise_server_exceptions=False) as c:
        r = c.post("/v1/completions", json={"prompt": "a", "max_tokens": 2, "logprobs": 1})
        assert r.status_code == 500 and "KeyError" in r.json()["error"]["message"]
        assert c.post("/v1/completions", json={"prompt": "a", "max_tokens": 2}).status_code == 200


def test_tokenize_counts_what_the_endpoints_count(client, tok, specials):
    r = client.post("/tokenize", headers=AUTH, json={"prompt": "def f(x): return x"}).json()
    use = client.post("/v1/completions", headers=AUTH, json={"prompt": "def f(x): return x", "max_tokens": 1}).json()
    assert r["count"] == len(r["tokens"]) == use["usage"]["prompt_tokens"] and r["max_model_len"] == 256
    back = client.post("/detokenize", headers=AUTH, json={"tokens": r["tokens"]}).json()["prompt"]
    assert back == tok.decode(tok.encode("def f(x): return x", add_bos=True))
    msgs = [{"role": "user", "content": "hi there"}]
    r = client.post("/tokenize", headers=AUTH, json={"messages": msgs, "chat_template_kwargs": {"thinking": True}})
    use = client.post("/v1/chat/completions", headers=AUTH, json={
        "messages": msgs, "chat_template_kwargs": {"thinking": True}, "max_tokens": 1}).json()["usage"]
    assert r.json()["count"] == use["prompt_tokens"]
    assert r.json()["tokens"][-1] == tok.token_to_id("<think>")
    assert client.post("/tokenize", json={"prompt": "x"}).status_code == 401
    for bad in ({"prompt": "x", "messages": msgs}, {}, {"prompt": 3}):
        assert client.post("/tokenize", headers=AUTH, json=bad).status_code == 400
    r = client.post("/detokenize", headers=AUTH, json={"tokens": [1, 10**6]})
    assert r.status_code == 400 and "outside" in r.json()["error"]["message"]


TOOL_REPLY = ("Let me check.\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name=\"get_weather\">\n"
              "<｜DSML｜parameter name=\"city\" string=\"true\">Paris</｜DSML｜parameter>\n"
              "<｜DSML｜parameter name=\"days\" string=\"false\">3</｜DSML｜parameter>\n"
              "</｜DSML｜invoke>\n</｜DSML｜tool_calls>")


def _scripted(monkeypatch, tok, text: str):
    """Make the engine "sample" ``text`` then EOS, token by token (one request at a time)."""
    import torch

    from sparseek.engine import llm as engine_llm

    script = tok.encode(text) + [tok.eos_id]
    pos = [0]

    def sample(logits, params, generators):
        pos[0] += 1
        return torch.tensor([script[min(pos[0] - 1, len(script) - 1)]] * logits.shape[0])

    monkeypatch.setattr(engine_llm, "sample", sample)
    return pos


@pytest.fixture(scope="module")
def long_client(model, tok):
    """Room for DeepSeek's tool-use instructions (~670 tokens with the test tokenizer)."""
    with TestClient(build_app(_llm(model, tok, max_seq_len=1024), "dbg", api_key=KEY)) as c:
        yield c


@pytest.mark.parametrize("stream", [False, True])
def test_chat_tool_calls_and_reasoning_through_the_server(long_client, tok, monkeypatch, stream):
    """A reply in DeepSeek-V4's format, token by token through the whole server: reasoning apart
    from the answer, the tool call whole with its JSON arguments, finish_reason "tool_calls"."""
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}}}}}]
    pos = _scripted(monkeypatch, tok, "The user wants weather.</think>" + TOOL_REPLY)
    req = {"messages": [{"role": "user", "content": "Weather in Paris?"}], "tools": tools, "max_tokens": 200,
           "reasoning_effort": "high", "stream": stream}
    r = long_client.post("/v1/chat/completions", headers=AUTH, json=req)
    assert r.status_code == 200, r.text
    if stream:
        chunks = _events(r.text)
        deltas = [c["choices"][0]["delta"] for c in chunks]
        reasoning = "".join(d.get("reasoning_content", "") for d in deltas)
        content = "".join(d.get("content", "") for d in deltas)
        calls = [tc for d in deltas for tc in d.get("tool_calls", [])]
        reason = chunks[-1]["choices"][0]["finish_reason"]
    else:
        [c] = r.json()["choices"]
        reasoning, content = c["message"]["reasoning_content"], c["message"]["content"]
        calls, reason = c["message"]["tool_calls"], c["finish_reason"]
    assert reasoning == "The user wants weather." and content == "Let me check."
    assert len(calls) == 1 and calls[0]["function"] == {"name": "get_weather",
                                                         "arguments": json.dumps({"city": "Paris", "days": 3})}
    assert calls[0]["id"].startswith("call-") and reason == "tool_calls"
    assert pos[0] == len(tok.encode("The user wants weather.</think>" + TOOL_REPLY)) + 1  # up to EOS
    # the prompt carried the tool schema (DeepSeek's format puts it in the system message)
    n = long_client.post("/tokenize", headers=AUTH, json={k: v for k, v in req.items() if k != "stream"}).json()["count"]
    n0 = long_client.post("/tokenize", headers=AUTH, json={"messages": req["messages"], "reasoning_effort": "high"}).json()
    assert n > n0["count"] + 20


def test_structured_outputs_through_the_api(client):
    pytest.importorskip("xgrammar")
    schema = {"type": "object", "properties": {"city": {"enum": ["Paris", "Rome"]}, "days": {"type": "boolean"}},
              "required": ["city", "days"]}
    fmt = {"type": "json_schema", "json_schema": {"name": "trip", "schema": schema}}
    msgs = [{"role": "user", "content": "plan"}]
    for stream in (False, True):
        r = client.post("/v1/chat/completions", headers=AUTH, json={
            "messages": msgs, "response_format": fmt, "max_tokens": 60, "temperature": 0.9, "seed": 1,
            "stream": stream})
        content = ("".join(c["choices"][0]["delta"].get("content", "") for c in _events(r.text)) if stream
                   else r.json()["choices"][0]["message"]["content"])
        value = json.loads(content)
        assert value["city"] in ("Paris", "Rome") and isinstance(value["days"], bool)
    r = client.post("/v1/chat/completions", headers=AUTH, json={
        "messages": msgs, "response_format": {"type": "json_object"}, "max_tokens": 60, "temperature": 0})
    assert r.json()["choices"][0]["finish_reason"] == "length" or isinstance(
        json.loads(r.json()["choices"][0]["message"]["content"]), dict)
    r = client.post("/v1/completions", headers=AUTH, json={"prompt": "id", "guided_regex": "[A-Z]{2}[0-9]{4}",
                                                          "max_tokens": 20, "temperature": 1, "seed": 3})
    assert re.fullmatch("[A-Z]{2}[0-9]{4}", r.json()["choices"][0]["text"])
    # in thinking mode the reasoning stays free and the answer after </think> is held
    r = client.post("/v1/chat/completions", headers=AUTH, json={
        "messages": msgs, "response_format": fmt, "max_tokens": 80, "temperature": 0.9, "seed": 1,
        "chat_template_kwargs": {"thinking": True}, "logit_bias": {"5": 5}})  # 5: </think>, to end it soon
    value = json.loads(r.json()["choices"][0]["message"]["content"])
    assert value["city"] in ("Paris", "Rome") and isinstance(value["days"], bool)
    for body, words in (
            ({"messages": msgs, "guided_regex": "(["}, "cannot be compiled"),
            ({"messages": msgs, "guided_json": "{not json"}, "not JSON"),
            ({"messages": msgs, "response_format": {"type": "xml"}}, "response_format.type")):
        r = client.post("/v1/chat/completions", headers=AUTH, json=body)
        assert r.status_code == 400 and words in r.json()["error"]["message"], r.text


def test_forced_tool_choice_through_the_api(long_client):
    """tool_choice "required" or a named function holds the reply to tool calls of the request's
    tools, their arguments to the tools' schemas; streamed or whole, finish_reason "tool_calls"."""
    pytest.importorskip("xgrammar")
    tools = [{"type": "function", "function": {"name": "go", "parameters": {
                 "type": "object", "properties": {"to": {"enum": ["x", "y"]}}, "required": ["to"]}}},
             {"type": "function", "function": {"name": "now"}}]
    msgs = [{"role": "user", "content": "where?"}]
    for choice, stream in (("required", False), ({"type": "function", "function": {"name": "go"}}, True)):
        r = long_client.post("/v1/chat/completions", headers=AUTH, json={
            "messages": msgs, "tools": tools, "tool_choice": choice, "parallel_tool_calls": False,
            "max_tokens": 300, "temperature": 1.0, "seed": 4, "stream": stream})
        assert r.status_code == 200, r.text
        if stream:
            chunks = _events(r.text)
            calls = [tc for c in chunks for tc in c["choices"][0]["delta"].get("tool_calls", [])]
            content = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
            reason = chunks[-1]["choices"][0]["finish_reason"]
        else:
            [c] = r.json()["choices"]
            calls, content, reason = c["message"]["tool_calls"], c["message"]["content"] or "", c["finish_reason"]
        assert reason == "tool_calls" and content == "" and len(calls) == 1
        name, args = calls[0]["function"]["name"], json.loads(calls[0]["function"]["arguments"])
        assert (name, args) in (("now", {}), ("go", {"to": "x"}), ("go", {"to": "y"}))
        assert isinstance(choice, str) or name == "go"
    # a strict tool under "auto": the answer is free, a tool-call block it opens is held (the bias
    # pushes a random model towards "\n", "<" and the DSML token, allowed only to open the block)
    strict = [{"type": "function", "function": {**tools[0]["function"], "strict": True}}]
    r = long_client.post("/v1/chat/completions", headers=AUTH, json={
        "messages": msgs, "tools": strict, "parallel_tool_calls": False, "max_tokens": 300, "temperature": 1.0,
        "seed": 0, "logit_bias": {"6": 100, "213": 8, "42": 8}})  # 6: ｜DSML｜, 213: "\n", 42: "<"
    [c] = r.json()["choices"]
    assert c["finish_reason"] == "tool_calls" and "｜DSML｜" not in (c["message"]["content"] or "")
    assert [(t["function"]["name"], json.loads(t["function"]["arguments"])["to"] in ("x", "y"))
            for t in c["message"]["tool_calls"]] == [("go", True)]
    for body, param, words in (
            ({"tool_choice": {"type": "function", "function": {"name": "fly"}}}, "tool_choice", "not among the tools"),
            ({"tools": strict, "response_format": {"type": "json_object"}}, "tool_choice", "a strict tool"),
            ({"tool_choice": {"type": "function", "name": "go"}}, "tool_choice", "'required'"),
            ({"tool_choice": "required", "response_format": {"type": "json_object"}}, "tool_choice", "not both"),
            ({"tools": [{"type": "function", "function": {"name": "a\"b"}}], "tool_choice": "required"}, "tools",
             "quotes")):
        r = long_client.post("/v1/chat/completions", headers=AUTH, json={"messages": msgs, "tools": tools, **body})
        err = r.json()["error"]
        assert r.status_code == 400 and words in err["message"] and err["param"] == param, r.text


@pytest.mark.parametrize("stream", [False, True])
def test_a_checkpoint_s_own_chat_template_through_the_server(model, tok, monkeypatch, stream):
    """A tokenizer with a Jinja template (R1 style: every reply opens in reasoning) is served in
    that format: the prompt is the template's, the reply's reasoning is split off without asking
    for thinking mode, tool calls in V3 / R1's markup come back as tool_calls, and forcing them
    (held to V4's markup) is refused by name."""
    import copy

    from tests.tokenizer.test_template import R1_STYLE

    r1 = copy.copy(tok)
    r1.chat_template = R1_STYLE
    messages = [{"role": "user", "content": "2+2?"}]
    with TestClient(build_app(_llm(model, r1), "r1", api_key=KEY)) as c:
        n = c.post("/tokenize", headers=AUTH, json={"messages": messages}).json()["count"]
        assert n == len(r1.encode(r1.chat_prompt(messages)[0]))
        pos = _scripted(monkeypatch, tok, "Add them.</think>4")
        r = c.post("/v1/chat/completions", headers=AUTH, json={"messages": messages, "max_tokens": 20,
                                                               "stream": stream})
        assert r.status_code == 200, r.text
        if stream:
            deltas = [ch["choices"][0]["delta"] for ch in _events(r.text)]
            reasoning = "".join(d.get("reasoning_content", "") for d in deltas)
            content = "".join(d.get("content", "") for d in deltas)
        else:
            msg = r.json()["choices"][0]["message"]
            reasoning, content = msg["reasoning_content"], msg["content"]
        assert (reasoning.strip(), content) == ("Add them.", "4") and pos[0] > 1
        tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
        pos = _scripted(monkeypatch, tok, "Call f.</think><｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function"
                        '<｜tool▁sep｜>f\n```json\n{"x": 1}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>')
        r = c.post("/v1/chat/completions", headers=AUTH, json={"messages": messages, "tools": tools,
                                                               "max_tokens": 160, "stream": stream})
        if stream:
            calls = [tc for ch in _events(r.text) for tc in ch["choices"][0]["delta"].get("tool_calls", [])]
        else:
            calls = r.json()["choices"][0]["message"]["tool_calls"]
        assert [(tc["function"]["name"], tc["function"]["arguments"]) for tc in calls] == [("f", '{"x": 1}')]
        r = c.post("/v1/chat/completions", headers=AUTH, json={"messages": messages, "tools": tools,
                                                               "tool_choice": "required"})
        assert r.status_code == 400 and "own chat template" in r.json()["error"]["message"]
        pos = _scripted(monkeypatch, tok, "Add them.</think>4")
    # the engine's chat() speaks the same format
    pos[0] = 0
    out = _llm(model, r1).chat(messages, SamplingParams(max_tokens=20))
    assert out.prompt_token_ids == r1.encode(r1.chat_prompt(messages)[0])
    assert out.message["reasoning_content"].strip() == "Add them." and out.message["content"] == "4"
    with pytest.raises(ValueError, match="own chat template"):
        _llm(model, r1).chat([{"role": "system", "content": "", "tools": [
            {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]}, *messages],
            tool_choice="required")


def test_forced_tool_calls_in_a_template_s_layout_through_the_api(model, tok):
    """A checkpoint whose template writes V3 / R1's tool-call markup: tool_choice "required" holds
    the reply to that markup (read off the template), streamed or whole, as tool_calls."""
    pytest.importorskip("xgrammar")
    import copy

    from tests.tokenizer.test_template import V3_TOOLS_STYLE

    v3 = copy.copy(tok)
    v3.chat_template = V3_TOOLS_STYLE
    tools = [{"type": "function", "function": {"name": "go", "parameters": {
        "type": "object", "properties": {"to": {"enum": ["x", "y"]}}, "required": ["to"]}}}]
    with TestClient(build_app(_llm(model, v3, max_seq_len=512), "v3", api_key=KEY)) as c:
        for stream in (False, True):
            r = c.post("/v1/chat/completions", headers=AUTH, json={
                "messages": [{"role": "user", "content": "where?"}], "tools": tools, "tool_choice": "required",
                "parallel_tool_calls": False, "max_tokens": 200, "temperature": 1.0, "seed": 1, "stream": stream})
            assert r.status_code == 200, r.text
            if stream:
                chunks = _events(r.text)
                calls = [tc for ch in chunks for tc in ch["choices"][0]["delta"].get("tool_calls", [])]
                reason = chunks[-1]["choices"][0]["finish_reason"]
            else:
                [ch] = r.json()["choices"]
                calls, reason = ch["message"]["tool_calls"], ch["finish_reason"]
            assert reason == "tool_calls" and len(calls) == 1 and calls[0]["function"]["name"] == "go"
            assert json.loads(calls[0]["function"]["arguments"]) in ({"to": "x"}, {"to": "y"})


def test_lora_adapters_load_and_unload_through_the_api(model, tok, tmp_path, specials):
    """vLLM's /v1/load_lora_adapter and /v1/unload_lora_adapter (with --allow-runtime-lora): a loaded
    adapter is a model name at once, an unloaded one a 404; both are 403s unless allowed."""
    import copy

    from tests.model.test_multi_lora import _adapters

    dirs = _adapters(model, tmp_path, [("tuned", 4, ("wq_a", "experts"))])
    want = LLM(merge_adapters(copy.deepcopy(model), dirs["tuned"]), tok, max_seq_len=256).generate(
        ["def f("], SamplingParams(max_tokens=8, temperature=0, logit_bias={int(k): v for k, v in specials.items()})
    )[0].text
    body = {"lora_name": "tuned", "lora_path": dirs["tuned"]}
    with TestClient(build_app(_llm(copy.deepcopy(model), tok), "dbg", api_key=KEY)) as c:
        r = c.post("/v1/load_lora_adapter", headers=AUTH, json=body)
        assert r.status_code == 403 and "--allow-runtime-lora" in r.json()["error"]["message"]
    with TestClient(build_app(_llm(copy.deepcopy(model), tok), "dbg", api_key=KEY, runtime_lora=True)) as c:
        r = c.post("/v1/load_lora_adapter", headers=AUTH, json=body)
        assert r.status_code == 200 and "added" in r.text
        assert [m["id"] for m in c.get("/v1/models", headers=AUTH).json()["data"]] == ["dbg", "tuned"]
        r = c.post("/v1/completions", headers=AUTH, json={"model": "tuned", "prompt": "def f(", "max_tokens": 8,
                                                          "temperature": 0, "logit_bias": specials})
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == want
        for bad, param in (({"lora_name": "tuned", "lora_path": dirs["tuned"]}, "lora_name"),  # loaded already
                           ({"lora_name": "x", "lora_path": str(tmp_path / "none")}, "lora_path"),
                           ({"lora_name": "", "lora_path": "p"}, "lora_name"),
                           ({"lora_name": "dbg", "lora_path": dirs["tuned"]}, "lora_name")):
            r = c.post("/v1/load_lora_adapter", headers=AUTH, json=bad)
            assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
        assert c.post("/v1/unload_lora_adapter", headers=AUTH, json={"lora_name": "tuned"}).status_code == 200
        r = c.post("/v1/completions", headers=AUTH, json={"model": "tuned", "prompt": "x"})
        assert r.status_code == 404
        assert c.post("/v1/unload_lora_adapter", headers=AUTH, json={"lora_name": "tuned"}).status_code == 404


def test_unloading_an_adapter_spares_the_running_requests(model, tok, tmp_path):
    """On the engine thread between steps: an adapter in use is not unloaded; unloading another
    moves the running rows' slots, and their requests end with the tokens they get alone."""
    import copy

    from tests.model.test_multi_lora import _adapters

    dirs = _adapters(model, tmp_path, [("a", 4, ("wq_a", "experts")), ("b", 2, ("wkv", "experts"))])
    keep = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, lora="b")
    alone = LLM(merge_adapters(copy.deepcopy(model), dirs["b"]), tok, max_seq_len=256).generate(
        ["hello world"], SamplingParams(max_tokens=24, temperature=0, ignore_eos=True))[0].token_ids
    engine = AsyncEngine(_llm(copy.deepcopy(model), tok, lora_modules=dirs)).start()

    async def run():
        req = engine.submit("hello world", keep)
        ids = []
        async for d in req:
            ids += d.token_ids
            if len(ids) == 4:
                with pytest.raises(ValueError, match="in use by 1"):
                    await engine.call(lambda llm: llm.unload_lora("b"))
                await engine.call(lambda llm: llm.unload_lora("a"))  # "b" moves from slot 2 to 1
        return ids

    try:
        assert asyncio.run(run()) == alone
        assert engine.llm.lora_rows.names == ["b"]
    finally:
        engine.shutdown()


def test_generation_config_fills_what_a_request_leaves_out(model, tok, specials):
    """The checkpoint's generation_config.json (here: greedy, 5 new tokens) applies to the fields a
    request does not give, as vLLM applies it; fields given win."""
    bias = {int(k): v for k, v in specials.items()}
    llm = _llm(model, tok, generation_config={"do_sample": False, "max_new_tokens": 5})
    greedy = llm.generate(["def f("], SamplingParams(max_tokens=5, temperature=0, logit_bias=bias))[0]
    sampled = llm.generate(["def f("], SamplingParams(max_tokens=5, temperature=1.0, seed=7, logit_bias=bias))[0]
    assert greedy.text != sampled.text
    with TestClient(build_app(llm, "gc", api_key=KEY)) as c:
        def ask(**kw):
            r = c.post("/v1/completions", headers=AUTH, json={"prompt": "def f(", "logit_bias": specials, **kw})
            assert r.status_code == 200, r.text
            return r.json()["choices"][0]
        got = ask()
        assert got["text"] == greedy.text and got["finish_reason"] == "length"  # 5 tokens, not the API's 16
        assert ask(temperature=1.0, seed=7)["text"] == sampled.text
        r = c.post("/v1/chat/completions", headers=AUTH, json={"messages": [{"role": "user", "content": "hi"}],
                                                               "logit_bias": specials})
        assert r.json()["usage"]["completion_tokens"] == 5
        # the Responses API too: greedy by the file, so the same answer as the chat's
        chat = c.post("/v1/chat/completions", headers=AUTH, json={"messages": [{"role": "user", "content": "hi"}],
                                                                  "max_tokens": 3}).json()
        resp = c.post("/v1/responses", headers=AUTH, json={"input": "hi", "max_output_tokens": 3}).json()
        text = "".join(p["text"] for o in resp["output"] if o["type"] == "message" for p in o["content"])
        assert text == chat["choices"][0]["message"]["content"]


def test_lora_adapters_served_by_model_name(model, tok, tmp_path, specials):
    """--lora-modules: each adapter is a model name of its own (listed with its parent), requests
    naming it run with it, the base model stays servable, unknown names are 404s."""
    import copy

    from tests.model.test_multi_lora import _adapters

    dirs = _adapters(model, tmp_path, [("tuned", 4, ("wq_a", "experts"))])
    llm = _llm(copy.deepcopy(model), tok, lora_modules=dirs)
    bias = {int(k): v for k, v in specials.items()}
    want = {n: llm.generate(["def f("], SamplingParams(max_tokens=8, temperature=0, logit_bias=bias, lora=n))[0].text
            for n in ("tuned", None)}
    assert want["tuned"] != want[None]
    with TestClient(build_app(llm, "dbg", api_key=KEY)) as c:
        ids = [(m["id"], m.get("parent")) for m in c.get("/v1/models", headers=AUTH).json()["data"]]
        assert ids == [("dbg", None), ("tuned", "dbg")]
        for name, n in (("tuned", "tuned"), ("dbg", None)):
            r = c.post("/v1/completions", headers=AUTH, json={"model": name, "prompt": "def f(", "max_tokens": 8,
                                                              "temperature": 0, "logit_bias": specials})
            assert r.status_code == 200 and r.json()["choices"][0]["text"] == want[n]
        r = c.post("/v1/chat/completions", headers=AUTH, json={"model": "tuned", "max_tokens": 2,
                                                               "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 200, r.text
        r = c.post("/v1/responses", headers=AUTH, json={"model": "tuned", "input": "hi", "max_output_tokens": 2})
        assert r.status_code == 200, r.text
        r = c.post("/v1/completions", headers=AUTH, json={"model": "other", "prompt": "x"})
        assert r.status_code == 404 and "`tuned`" in r.json()["error"]["message"]
