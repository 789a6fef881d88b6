"""Prometheus metrics, served at `GET /metrics`. Every name and label is listed in the README.

One registry per app (not the process-global default), so two apps in one process, as in the
unit tests, never share counts. Latency buckets span a GPU's milliseconds and a small CPU's
seconds.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1, 2.5)
E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320, 640)


REJECTION_REASONS = ("requests", "tokens", "concurrency", "queue_full")
MODEL_STATES = ("unloaded", "loading", "ready", "failed", "unloading")


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("llm_requests", "HTTP requests by route, model and status code",
                                ["route", "model", "status"], registry=r)
        self.ttft = Histogram("llm_time_to_first_token_seconds", "Time from request to first token",
                              ["model"], buckets=TTFT_BUCKETS, registry=r)
        self.itl = Histogram("llm_inter_token_latency_seconds", "Time between tokens of one answer",
                             ["model"], buckets=ITL_BUCKETS, registry=r)
        self.e2e = Histogram("llm_e2e_request_latency_seconds", "Time from request to last token",
                             ["route", "model"], buckets=E2E_BUCKETS, registry=r)
        self.prompt_tokens = Counter("llm_prompt_tokens", "Prompt tokens processed", ["model"], registry=r)
        self.generation_tokens = Counter("llm_generation_tokens", "Tokens generated", ["model"], registry=r)
        self.constrained = Counter("llm_constrained_requests", "Answered requests whose answers had to match a "
                                   "grammar, by route, model and kind (json, regex, grammar, structural_tag, tools)",
                                   ["route", "model", "kind"], registry=r)
        self.tool_calls = Counter("llm_tool_calls", "Tool calls in answers", ["model"], registry=r)
        self.running = Gauge("llm_requests_running", "Generation requests being served", ["model"], registry=r)
        self.waiting = Gauge("llm_requests_waiting", "Generation requests queued for a slot", ["model"], registry=r)
        self.kv_cache = Gauge("llm_kv_cache_usage_ratio", "Fraction of the KV cache budget in use "
                              "(engines that report it)", ["model"], registry=r)
        self.alias_requests = Counter("llm_alias_requests", "Requests to an alias by the model (variant) "
                                      "that served them", ["alias", "model"], registry=r)
        self.model_state = Gauge("llm_model_state", "1 for each model's current state (unloaded, loading, "
                                 "ready, failed, unloading)", ["model", "state"], registry=r)
        self.model_memory = Gauge("llm_model_memory_bytes", "Memory a model holds (the larger of its "
                                  "estimate and what its load measured)", ["model"], registry=r)
        self.log_dropped = Counter("llm_request_log_dropped", "Request log rows dropped because the "
                                   "buffer was full (database slow or down)", registry=r)
        self.limits_store_failures = Counter(
            "llm_limits_store_failures", "Per-key limit operations that could not use Redis (--redis-url): "
            "an error, a timeout past --redis-timeout, or Redis known to be down that second; by operation "
            "(admit, charge, peek, release, renew)", ["op"], registry=r)
        self.limits_store_up = Gauge("llm_limits_store_up", "1 while Redis (--redis-url) answers, 0 after a "
                                     "failure until it answers again", registry=r)
        self.log_errors = Counter("llm_request_log_write_errors", "Failed request log writes (retried)",
                                  registry=r)
        self.batch_lines = Counter("llm_batch_lines", "Batch lines run to a result, by endpoint and outcome "
                                   "(ok, failed: in the error file)", ["endpoint", "outcome"], registry=r)
        self.batch_running = Gauge("llm_batch_lines_running", "Batch lines running on this server", registry=r)
        self.log_backlog = Gauge("llm_request_log_backlog", "Request log rows not yet written", registry=r)
        self.rejections = Counter("llm_rate_limit_rejections", "Requests answered 429, by reason "
                                  "(requests, tokens, concurrency, queue_full)", ["reason"], registry=r)
        # every reason exists from the start at 0, so rate() and alerts see the first rejection
        for reason in REJECTION_REASONS:
            self.rejections.labels(reason)

    def forget_model(self, model: str) -> None:
        """A removed model's gauges go (a stale "unloading 1" would alert forever); its counters
        and histograms stay, so rates over a window that saw it remain right."""
        for gauge in (self.running, self.waiting, self.kv_cache, self.model_memory):
            try:
                gauge.remove(model)
            except KeyError:
                pass
        for state in MODEL_STATES:
            try:
                self.model_state.remove(model, state)
            except KeyError:
                pass

    def render(self) -> bytes:
        return generate_latest(self.registry)
