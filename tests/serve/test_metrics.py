"""``GET /metrics``: what the server did, in Prometheus' format -- token counters equal the usage
the responses reported, one latency observation per completion, gauges back to idle; a listener
that raises does not fail the engine's step."""

from __future__ import annotations

import json

import pytest

from sparseek.engine import LLM
from sparseek.serve import build_app

pytest.importorskip("fastapi")
parser = pytest.importorskip("prometheus_client.parser")
from fastapi.testclient import TestClient  # noqa: E402


def _scrape(client) -> dict:
    """{(metric sample name, frozenset of its labels): value}."""
    r = client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    out = {}
    for family in parser.text_string_to_metric_families(r.text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def _value(scrape: dict, name: str, **labels) -> float:
    key = (f"sparseek:{name}", frozenset({"model_name": "dbg", **labels}.items()))
    return scrape.get(key, 0.0)


def test_metrics_count_what_the_requests_used(model, tok):
    llm = LLM(model, tok, max_batch_size=4, max_seq_len=256)
    with TestClient(build_app(llm, "dbg", api_key="k")) as client:
        before = _scrape(client)  # served without a key, as /health
        assert _value(before, "num_batch_slots") == 4 and _value(before, "num_requests_running") == 0
        usage = []
        ban = {str(i): -100 for i in range(16)}  # no special tokens: every completion runs to its length
        for body in ({"prompt": ["def f(", "import os\n"], "max_tokens": 7, "temperature": 0, "logit_bias": ban},
                     {"prompt": "class A:", "max_tokens": 5, "temperature": 0, "n": 2, "seed": 1,
                      "logit_bias": ban}):
            r = client.post("/v1/completions", headers={"Authorization": "Bearer k"}, json=body)
            assert r.status_code == 200, r.text
            usage.append(r.json()["usage"])
        r = client.post("/v1/chat/completions", headers={"Authorization": "Bearer k"},
                        json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 6, "stream": True,
                              "stream_options": {"include_usage": True}, "logit_bias": ban})
        chunks = [ln for ln in r.text.split("\n") if ln.startswith("data: {")]
        usage.append(json.loads(chunks[-1][len("data: "):])["usage"])
        got = _scrape(client)
    completions = 2 + 2 + 1
    assert _value(got, "generation_tokens_total") == sum(u["completion_tokens"] for u in usage)
    # usage counts a prompt of n completions once; the metrics once per completion (vLLM's way)
    prompts = usage[0]["prompt_tokens"] + 2 * usage[1]["prompt_tokens"] + usage[2]["prompt_tokens"]
    assert _value(got, "prompt_tokens_total") == prompts
    assert _value(got, "request_success_total", finished_reason="length") == completions
    for hist in ("time_to_first_token_seconds", "e2e_request_latency_seconds", "request_prompt_tokens",
                 "request_generation_tokens"):
        assert _value(got, f"{hist}_count") == completions, hist
    assert _value(got, "request_generation_tokens_sum") == _value(got, "generation_tokens_total")
    # every token after a completion's first waited for its step
    assert _value(got, "time_per_output_token_seconds_count") == _value(got, "generation_tokens_total") - completions
    assert _value(got, "e2e_request_latency_seconds_sum") >= _value(got, "time_to_first_token_seconds_sum") > 0
    # a request's phases add up: queue + prefill = first token, queue + inference = e2e,
    # prefill + decode = inference
    phase = {k: _value(got, f"request_{k}_time_seconds_sum") for k in ("queue", "prefill", "decode", "inference")}
    for k in phase:
        assert _value(got, f"request_{k}_time_seconds_count") == completions, k
    assert phase["queue"] + phase["prefill"] == pytest.approx(_value(got, "time_to_first_token_seconds_sum"))
    assert phase["queue"] + phase["inference"] == pytest.approx(_value(got, "e2e_request_latency_seconds_sum"))
    assert phase["prefill"] + phase["decode"] == pytest.approx(phase["inference"])
    assert phase["decode"] > 0 and phase["queue"] >= 0
    assert _value(got, "request_params_max_tokens_sum") == 7 + 7 + 5 + 5 + 6
    assert _value(got, "request_params_n_count") == completions - 1  # the n = 2 request once
    assert _value(got, "request_params_n_sum") == completions
    assert not any(name == "sparseek:lora_requests_info" for name, _ in got)  # no adapters served
    assert _value(got, "num_requests_running") == _value(got, "num_requests_waiting") == 0
    assert _value(got, "kv_cache_usage_perc") == 0
    assert _value(got, "engine_steps_failed_total") == 0


def test_a_listener_that_fails_never_fails_the_step(model, tok):
    llm = LLM(model, tok, max_batch_size=2, max_seq_len=128)
    app = build_app(llm, "dbg")
    engine = app.state.engine

    def broken(*_):
        raise RuntimeError("listener bug")
    engine.listeners.insert(0, broken)
    with TestClient(app) as client:
        r = client.post("/v1/completions", json={"prompt": "x = ", "max_tokens": 3, "temperature": 0})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
        assert _value(_scrape(client), "generation_tokens_total") == 3  # the metrics listener still ran


def test_gauges_read_the_engine_when_scraped(model, tok):
    from types import SimpleNamespace

    llm = LLM(model, tok, max_batch_size=4, max_seq_len=100)
    app = build_app(llm, "dbg")
    seq = SimpleNamespace(out=SimpleNamespace(prompt_token_ids=[1] * 30, token_ids=[2] * 10))
    llm._queues = ([seq, seq, seq], [seq])  # mid-run: three waiting, one running with 40 positions
    got = _scrape(TestClient(app))  # no lifespan: the engine thread never starts to change them
    assert _value(got, "num_requests_running") == 1 and _value(got, "num_requests_waiting") == 3
    assert _value(got, "kv_cache_usage_perc") == 40 / 400


def test_adapter_requests_are_counted_under_the_adapters_name(model, tok, tmp_path):
    """Requests to a LoRA adapter carry its name as model_name; lora_requests_info (vLLM's) lists
    the adapters in use."""
    import copy

    from tests.model.test_multi_lora import _adapters

    dirs = _adapters(model, tmp_path, [("tuned", 4, ("wq_a", "experts"))])
    llm = LLM(copy.deepcopy(model), tok, max_batch_size=4, max_seq_len=256, lora_modules=dirs)
    ban = {str(i): -100 for i in range(16)}
    with TestClient(build_app(llm, "dbg")) as client:
        for name, n in (("dbg", 3), ("tuned", 5), ("tuned", 4)):
            r = client.post("/v1/completions", json={"model": name, "prompt": "x = ", "max_tokens": n,
                                                     "temperature": 0, "logit_bias": ban})
            assert r.status_code == 200, r.text
        got = _scrape(client)
        assert _value(got, "generation_tokens_total") == 3
        assert got[("sparseek:generation_tokens_total", frozenset({"model_name": "tuned"}.items()))] == 9
        assert got[("sparseek:e2e_request_latency_seconds_count", frozenset({"model_name": "tuned"}.items()))] == 2
        [(labels, value)] = [(dict(k), v) for (n, k), v in got.items() if n == "sparseek:lora_requests_info"]
        assert labels == {"max_lora": "1", "waiting_lora_adapters": "", "running_lora_adapters": ""} and value > 0
        # mid-run (the engine's queues as the loop holds them): the adapters in use, by queue
        from types import SimpleNamespace

        def seq(lora):
            return SimpleNamespace(params=SimpleNamespace(lora=lora),
                                   out=SimpleNamespace(prompt_token_ids=[1], token_ids=[], finish_reason=None))
        llm._queues = ([seq("tuned"), seq(None)], [seq("tuned"), seq("tuned")])
        got = _scrape(client)
        [labels] = [dict(k) for (n, k), _ in got.items() if n == "sparseek:lora_requests_info"]
        assert labels["running_lora_adapters"] == labels["waiting_lora_adapters"] == "tuned"
        llm._queues = ((), ())
