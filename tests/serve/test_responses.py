"""The Responses API: input items become the conversation the chat endpoint would see, the reply
becomes reasoning / message / function_call items, a stream's typed events add up to the whole
response, and the official client reads both."""

from __future__ import annotations

import json

import pytest

from sparseek.engine import LLM
from sparseek.serve import build_app
from sparseek.serve.responses import ResponsesRequest
from sparseek.tokenizer.chat import encode_messages
from tests.serve.test_api import AUTH, KEY, TOOL_REPLY, _scripted

fastapi = pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

TOOLS = [{"type": "function", "name": "get_weather", "description": "Weather by city",
          "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}}}}]


@pytest.fixture(scope="module")
def client(model, tok):
    llm = LLM(model, tok, max_batch_size=4, max_seq_len=1024)
    with TestClient(build_app(llm, "dbg", api_key=KEY)) as c:
        yield c


def _events(text: str) -> list[dict]:
    """Named server-sent events: each ``event:`` line names its data's type; no [DONE]."""
    out = []
    for block in text.strip().split("\n\n"):
        head, data = block.split("\n")
        event = json.loads(data[len("data: "):])
        assert head == f"event: {event['type']}"
        out.append(event)
    return out


def test_input_items_are_the_chat_conversation():
    """A tool round trip in the Responses shape gives the prompt the chat shape gives."""
    call = {"type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": '{"city": "Paris"}'}
    body = ResponsesRequest(instructions="Be brief.", tools=TOOLS, reasoning={"effort": "high"}, input=[
        {"role": "user", "content": "Weather in Paris?"},
        {"type": "reasoning", "id": "rs_1", "summary": [], "content": [{"type": "reasoning_text", "text": "Look it up."}]},
        call, {"type": "function_call_output", "call_id": "c1", "output": "sunny"},
        {"role": "user", "content": [{"type": "input_text", "text": "And"}, {"type": "input_text", "text": "Rome?"}]}])
    chat = [{"role": "system", "content": "Be brief.", "tools": [{"type": "function", "function": {
                "name": "get_weather", "description": "Weather by city", "parameters": TOOLS[0]["parameters"]}}]},
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": "", "reasoning_content": "Look it up.", "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
            {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
            {"role": "user", "content": "And\nRome?"}]
    req = body.chat()
    assert req.reasoning_effort == "high" and req.thinking(False) == (True, "high")
    assert encode_messages(req.conversation(), "thinking") == encode_messages(chat, "thinking")


@pytest.mark.parametrize("stream", [False, True])
def test_reasoning_text_and_tool_call_items(client, tok, monkeypatch, stream):
    _scripted(monkeypatch, tok, "The user wants weather.</think>" + TOOL_REPLY)
    r = client.post("/v1/responses", headers=AUTH, json={
        "input": "Weather in Paris?", "tools": TOOLS, "reasoning": {"effort": "high"}, "max_output_tokens": 200,
        "stream": stream})
    assert r.status_code == 200, r.text
    if stream:
        events = _events(r.text)
        assert [e["sequence_number"] for e in events] == list(range(len(events)))
        assert [e["type"] for e in events[:2]] == ["response.created", "response.in_progress"]
        resp = events[-1]["response"]
        assert events[-1]["type"] == "response.completed"
        deltas = {}  # the deltas add up to each item's final text
        for e in events:
            if e["type"].endswith(".delta"):
                deltas[e["item_id"]] = deltas.get(e["item_id"], "") + e["delta"]
        done = [e["item"] for e in events if e["type"] == "response.output_item.done"]
        assert done == resp["output"]
        added = [e["item"]["id"] for e in events if e["type"] == "response.output_item.added"]
        assert added == [it["id"] for it in resp["output"]]
        for it in resp["output"]:
            assert deltas[it["id"]] == (it["arguments"] if it["type"] == "function_call" else it["content"][0]["text"])
    else:
        resp = r.json()
    assert resp["object"] == "response" and resp["status"] == "completed" and resp["id"].startswith("resp-")
    rs, msg, fc = resp["output"]
    assert rs["type"] == "reasoning" and rs["content"] == [{"type": "reasoning_text", "text": "The user wants weather."}]
    assert msg["type"] == "message" and msg["role"] == "assistant" and msg["content"][0]["text"] == "Let me check."
    assert fc["type"] == "function_call" and fc["name"] == "get_weather" and fc["call_id"].startswith("call-")
    assert json.loads(fc["arguments"]) == {"city": "Paris", "days": 3}
    n_think = len(tok.encode("The user wants weather.</think>"))
    u = resp["usage"]
    assert u["output_tokens_details"]["reasoning_tokens"] == n_think
    assert u["output_tokens"] == len(tok.encode("The user wants weather.</think>" + TOOL_REPLY)) + 1  # + EOS
    assert u["total_tokens"] == u["input_tokens"] + u["output_tokens"]
    assert u["input_tokens_details"]["cached_tokens"] in (0, u["input_tokens"])  # all: the other param's prompt


def test_same_reply_as_chat_and_the_official_client(client, tok, monkeypatch):
    """Greedy: the Responses API answers what the chat endpoint answers; the openai client parses
    both shapes, streamed or whole (its stream helper rebuilds the response from the events); a
    cut reply is "incomplete"."""
    openai = pytest.importorskip("openai")
    cli = openai.OpenAI(api_key=KEY, base_url="http://testserver/v1", http_client=client, max_retries=0)
    chat = cli.chat.completions.create(model="dbg", messages=[{"role": "user", "content": "hi"}], max_tokens=12,
                                       temperature=0).choices[0]
    resp = cli.responses.create(model="dbg", input="hi", max_output_tokens=12, temperature=0)
    assert resp.output_text == (chat.message.content or "")
    assert resp.status == ("incomplete" if chat.finish_reason == "length" else "completed")
    if resp.status == "incomplete":
        assert resp.incomplete_details.reason == "max_output_tokens"
    text = "".join(e.delta for e in cli.responses.create(model="dbg", input="hi", max_output_tokens=12,
                                                         temperature=0, stream=True)
                   if e.type == "response.output_text.delta")
    assert text == resp.output_text
    _scripted(monkeypatch, tok, "Hm.</think>" + TOOL_REPLY)
    with cli.responses.stream(model="dbg", input="Weather?", tools=TOOLS, reasoning={"effort": "high"},
                              max_output_tokens=200) as s:
        kinds = [e.type for e in s]
        final = s.get_final_response()
    assert kinds.count("response.output_item.added") == 3 and final.output_text == "Let me check."
    rs, msg, fc = final.output
    assert rs.content[0].text == "Hm." and fc.name == "get_weather" and fc.call_id.startswith("call-")


def test_forced_function_call(client):
    pytest.importorskip("xgrammar")
    tools = [{"type": "function", "name": "go", "parameters": {
        "type": "object", "properties": {"to": {"enum": ["x", "y"]}}, "required": ["to"]}}]
    r = client.post("/v1/responses", headers=AUTH, json={
        "input": "where?", "tools": tools, "tool_choice": {"type": "function", "name": "go"}, "max_output_tokens": 300,
        "temperature": 1.0, "seed": 2})
    [fc] = r.json()["output"]
    assert fc["type"] == "function_call" and fc["name"] == "go" and json.loads(fc["arguments"])["to"] in ("x", "y")


@pytest.mark.parametrize("body, param, words", [
    ({"input": []}, "input", "empty"),
    ({"input": [{"type": "image_generation_call"}]}, "input", "not supported"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "u"}]}]}, "input", "text parts"),
    ({"input": "x", "tools": [{"type": "web_search"}]}, "tools", "only function tools"),
    ({"input": "x", "text": {"format": {"type": "xml"}}}, "text", "text.format.type"),
    ({"input": "x", "reasoning": {"effort": "huge"}}, "reasoning", "reasoning.effort"),
    ({"input": "x", "max_output_tokens": 5000}, "max_output_tokens", "maximum context length"),
    ({"input": "x", "frobnicate": 1}, "frobnicate", "unknown field"),
])
def test_bad_requests_name_the_problem(client, body, param, words):
    r = client.post("/v1/responses", headers=AUTH, json=body)
    err = r.json()["error"]
    assert r.status_code == 400 and words in err["message"] and err["param"] == param, r.text


def test_stored_responses_continue_a_conversation(client, tok, monkeypatch):
    """previous_response_id continues a stored response: the prompt is the whole conversation's
    (its input and reply, a tool result after it; not its instructions); GET reads a response
    back, DELETE forgets it, and store: false keeps nothing."""
    _scripted(monkeypatch, tok, TOOL_REPLY)
    first = client.post("/v1/responses", headers=AUTH, json={
        "input": "Weather in Paris?", "instructions": "Be brief.", "tools": TOOLS, "max_output_tokens": 200}).json()
    [msg, fc] = first["output"]
    assert first["store"] is True and fc["type"] == "function_call"
    assert client.get(f"/v1/responses/{first['id']}", headers=AUTH).json() == first
    _scripted(monkeypatch, tok, "It is sunny.")
    second = client.post("/v1/responses", headers=AUTH, json={
        "previous_response_id": first["id"], "tools": TOOLS, "max_output_tokens": 50,
        "input": [{"type": "function_call_output", "call_id": fc["call_id"], "output": "sunny"}]}).json()
    assert second["output"][0]["content"][0]["text"] == "It is sunny." and second["previous_response_id"] == first["id"]
    chat = [{"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": msg["content"][0]["text"], "tool_calls": [
                {"id": fc["call_id"], "type": "function", "function": {"name": fc["name"], "arguments": fc["arguments"]}}]},
            {"role": "tool", "tool_call_id": fc["call_id"], "content": "sunny"}]
    tools = [{"type": "function", "function": {k: TOOLS[0][k] for k in ("name", "description", "parameters")}}]
    want = client.post("/tokenize", headers=AUTH, json={"messages": chat, "tools": tools}).json()["count"]
    assert second["usage"]["input_tokens"] == want  # the instructions ("Be brief.") stayed with the first
    assert client.delete(f"/v1/responses/{first['id']}", headers=AUTH).json()["deleted"] is True
    for r in (client.get(f"/v1/responses/{first['id']}", headers=AUTH),
              client.post("/v1/responses", headers=AUTH, json={"previous_response_id": first["id"], "input": "x"})):
        assert r.status_code == 404 and "not found" in r.json()["error"]["message"]
    assert r.json()["error"]["param"] == "previous_response_id"
    gone = client.post("/v1/responses", headers=AUTH, json={"input": "x", "store": False, "max_output_tokens": 2}).json()
    assert gone["store"] is False and client.get(f"/v1/responses/{gone['id']}", headers=AUTH).status_code == 404
