"""``GET /metrics``: the server's state and history in Prometheus' text format (``prometheus_client``).

The names follow vLLM's (``vllm:num_requests_running`` -> ``sparseek:num_requests_running``, ...), so
dashboards and alerts built for a vLLM deployment need only the prefix changed:

* gauges, read when scraped: requests running (sequences in the batch) and waiting (queued in the
  engine loop or not yet taken by it), the batch's slots, the share of the cache's positions in use;
* counters: prompt and generated tokens, finished requests by ``finished_reason`` (stop / length /
  abort), prompt tokens read from the prefix cache, speculative draft tokens proposed and accepted,
  engine steps that failed;
* histograms: time to first token, time per output token after the first, end-to-end latency and
  its phases (waiting in the queue, prefill until the first token, decode after it, and the whole
  time since scheduled), prompt and generation lengths per request, the requests' ``max_tokens``
  and ``n``;
* ``lora_requests_info`` (vLLM's, which LoRA-aware gateways route on): the adapters that running
  and waiting requests use, in its labels.

Per-request series carry the name a request addressed as ``model_name``: a LoRA adapter's own name
for requests to it (``--lora-modules NAME=...``), so each adapter's tokens and latency show apart;
sum over ``model_name`` for the whole server. The engine's gauges carry the served model's name.

Every sequence is observed on the engine thread as its deltas are published
(``AsyncEngine.listeners``), so the times are the engine's, not the network's. A request of
``n`` completions counts once per completion, as vLLM counts them.
"""

from __future__ import annotations

import threading
import time

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

PREFIX = "sparseek:"
# vLLM's buckets (seconds, tokens), cut to the ranges a single-node server sees
_TTFT = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
         80.0, 160.0, 640.0)
_TPOT = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
_E2E = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0,
        960.0, 1920.0, 7680.0)
_N = (1, 2, 5, 10, 20)
_TOKENS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000, 100000, 200000, 500000,
           1000000)


class ServerMetrics:
    """The metrics of one served model; ``observe`` is the engine's listener."""

    def __init__(self, engine, model_name: str):
        self.registry = CollectorRegistry()
        self.engine, self.model_name = engine, model_name
        lab = ["model_name"]

        def counter(name, doc, extra=()):
            return Counter(PREFIX + name, doc, lab + list(extra), registry=self.registry)

        def histogram(name, doc, buckets):
            return Histogram(PREFIX + name, doc, lab, buckets=buckets, registry=self.registry)

        self.prompt_tokens = counter("prompt_tokens", "Prompt tokens of the requests started")
        self.generation_tokens = counter("generation_tokens", "Tokens generated")
        self.finished = counter("request_success", "Requests finished, by reason", ["finished_reason"])
        self.cached_tokens = counter("prefix_cache_hit_tokens", "Prompt tokens restored from the prefix cache")
        self.drafted = counter("spec_decode_num_draft_tokens", "MTP draft tokens proposed")
        self.accepted = counter("spec_decode_num_accepted_tokens", "MTP draft tokens accepted")
        self.ttft = histogram("time_to_first_token_seconds", "Time from submission to the first token", _TTFT)
        self.tpot = histogram("time_per_output_token_seconds", "Time per output token after the first", _TPOT)
        self.e2e = histogram("e2e_request_latency_seconds", "Time from submission to the last token", _E2E)
        self.prompt_len = histogram("request_prompt_tokens", "Prompt tokens per request", _TOKENS)
        self.gen_len = histogram("request_generation_tokens", "Tokens generated per request", _TOKENS)
        self.queue_time = histogram("request_queue_time_seconds", "Time from submission until scheduled", _E2E)
        self.prefill_time = histogram("request_prefill_time_seconds", "Time from scheduled to the first token", _E2E)
        self.decode_time = histogram("request_decode_time_seconds", "Time from the first token to the last", _E2E)
        self.inference_time = histogram("request_inference_time_seconds", "Time from scheduled to the last token",
                                        _E2E)
        self.max_tokens = histogram("request_params_max_tokens", "max_tokens of each completion", _TOKENS)
        self.n = histogram("request_params_n", "n (completions) of each request", _N)
        self.registry.register(_EngineState(self))
        # id(seq) -> times of its first and last tokens (unfinished sequences)
        self._seen: dict[int, tuple[float, float]] = {}
        self._lock = threading.Lock()
        engine.listeners.append(self.observe)

    def observe(self, req, seq, delta) -> None:
        """One published delta of ``seq`` (a sequence of ``req``), on the engine thread."""
        now = time.monotonic()
        m = seq.params.lora or self.model_name  # the name the request addressed
        n = len(delta.token_ids)
        scheduled = seq.scheduled if seq.scheduled is not None else req.submitted
        with self._lock:
            first, last = self._seen.get(id(seq), (None, None))  # when its first / previous tokens came
            if last is None and n:  # its first token(s): the prompt was read
                first = now
                self.ttft.labels(m).observe(now - req.submitted)
                self.queue_time.labels(m).observe(max(0.0, scheduled - req.submitted))
                self.prefill_time.labels(m).observe(now - scheduled)
                self.prompt_tokens.labels(m).inc(len(seq.out.prompt_token_ids))
                self.cached_tokens.labels(m).inc(seq.out.num_cached_tokens)
            elif n:  # a speculative step may bring several: each gets its share of the wait
                for _ in range(n):
                    self.tpot.labels(m).observe((now - last) / n)
            if n:
                self._seen[id(seq)] = (first, now)
                self.generation_tokens.labels(m).inc(n)
            if delta.finish_reason is not None:
                self._seen.pop(id(seq), None)
                out = seq.out
                self.finished.labels(m, delta.finish_reason).inc()
                self.e2e.labels(m).observe(now - req.submitted)
                self.inference_time.labels(m).observe(now - scheduled)
                self.decode_time.labels(m).observe(now - first if first is not None else 0.0)
                self.prompt_len.labels(m).observe(len(out.prompt_token_ids))
                self.gen_len.labels(m).observe(len(out.token_ids))
                self.max_tokens.labels(m).observe(seq.params.max_tokens)
                if out.sample == 0:  # once per request
                    self.n.labels(m).observe(seq.params.n)
                self.drafted.labels(m).inc(out.drafted)
                self.accepted.labels(m).inc(out.accepted)

    def exposition(self) -> tuple[bytes, str]:
        """The text a scrape gets, and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class _EngineState:
    """Gauges and counters read off the engine at scrape time."""

    def __init__(self, metrics: ServerMetrics):
        self.metrics = metrics

    def collect(self):
        engine, m = self.metrics.engine, self.metrics.model_name
        llm = engine.llm
        waiting_q, running_q = (list(q) for q in llm._queues)
        waiting, running = len(waiting_q), len(running_q)
        load = engine.load
        # the cache holds max_seq_len positions a row: the share the running sequences fill
        used = sum(len(s.out.prompt_token_ids) + len(s.out.token_ids) for s in running_q)
        usage = used / (llm.max_batch_size * llm.max_seq_len)
        for name, doc, value in (
                ("num_requests_running", "Sequences in the running batch", running),
                ("num_requests_waiting", "Sequences waiting for a slot (in the engine loop or its inbox)",
                 waiting + load["queued"]),
                ("num_batch_slots", "Sequences the batch holds at most (max_batch_size)", engine.max_batch_size),
                ("kv_cache_usage_perc", "Share of the cache's positions the running sequences fill (0-1)", usage)):
            g = GaugeMetricFamily(PREFIX + name, doc, labels=["model_name"])
            g.add_metric([m], value)
            yield g
        if llm.lora_rows is not None:
            # vLLM's: the value is the scrape's time, the adapters in use are in the labels
            def names(q):  # (a finished sequence may wait in the running list for the loop to retire it)
                return ",".join(sorted({s.params.lora for s in q
                                        if s.params.lora and s.out.finish_reason is None}))
            g = GaugeMetricFamily(PREFIX + "lora_requests_info", "LoRA adapters of the running and waiting requests",
                                  labels=["max_lora", "waiting_lora_adapters", "running_lora_adapters"])
            g.add_metric([str(len(llm.lora_rows.names)), names(waiting_q), names(running_q)], time.time())
            yield g
        c = CounterMetricFamily(PREFIX + "engine_steps_failed", "Engine steps that raised (their requests failed)",
                                labels=["model_name"])
        c.add_metric([m], engine.steps_failed)
        yield c


__all__ = ["ServerMetrics", "PREFIX"]
