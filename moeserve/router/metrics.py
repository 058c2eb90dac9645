"""Prometheus metrics of the router (the workers' are in moeserve.worker.metrics), named as
vLLM / Dynamo users expect, and the pieces both share (buckets, KV transfer, rendering).

vLLM's ``vllm:<name>`` becomes ``moeserve:<name>``, so existing dashboards and HPA rules port by
renaming the prefix. Each component builds its metrics on its own registry (tests and several
components in one process never collide on the global one). A series that both the router and a
worker export (prompt and generated tokens, TTFT, ...) is told apart by the ``moeserve_pool``
target label the chart's ServiceMonitor adds (router, prefill, decode): every query picks one.
"""

from __future__ import annotations

from wsgiref.simple_server import WSGIServer

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    start_http_server,
)

__all__ = ["RouterMetrics", "KVTransferMetrics", "render", "start_metrics_server",
           "LATENCY_BUCKETS", "ITL_BUCKETS", "TRANSFER_BUCKETS"]

LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5,
    0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0,
)  # fmt: skip
ITL_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05,
    0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5,
)  # fmt: skip
TRANSFER_BUCKETS = (
    0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
)  # fmt: skip


class KVTransferMetrics:
    def __init__(self, registry: CollectorRegistry):
        self.kv_transfer_bytes = Counter(
            "moeserve:kv_transfer_bytes",
            "Bytes of KV cache moved between workers with NIXL.",
            registry=registry,
        )
        self.kv_transfer_seconds = Histogram(
            "moeserve:kv_transfer_seconds",
            "Time of one KV transfer (READ posted to completion).",
            buckets=TRANSFER_BUCKETS,
            registry=registry,
        )
        self.kv_transfer_failures = Counter(
            "moeserve:kv_transfer_failures",
            "KV transfers that failed or timed out (the decode worker recomputed).",
            registry=registry,
        )


class RouterMetrics(KVTransferMetrics):
    """Metrics of one router replica; per-worker gauges come from the workers' load reports."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        super().__init__(self.registry)
        r = self.registry
        worker = ["worker", "role"]
        self.num_requests_running = Gauge(
            "moeserve:num_requests_running", "Requests running, per worker.", worker, registry=r
        )
        self.num_requests_waiting = Gauge(
            "moeserve:num_requests_waiting", "Requests waiting, per worker.", worker, registry=r
        )
        self.kv_cache_usage_perc = Gauge(
            "moeserve:kv_cache_usage_perc", "KV usage (0..1), per worker.", worker, registry=r
        )
        self.prefix_cache_queries = Counter(
            "moeserve:prefix_cache_queries",
            "Prompt tokens routed, per chosen worker (the denominator of the hit rate).",
            worker,
            registry=r,
        )
        self.prefix_cache_hits = Counter(
            "moeserve:prefix_cache_hits",
            "Prompt tokens the chosen worker already cached, per worker.",
            worker,
            registry=r,
        )
        self.requests_in_flight = Gauge(
            "moeserve:router_requests_in_flight", "Requests this router is serving.", registry=r
        )
        self.requests_rejected = Counter(
            "moeserve:router_requests_rejected",
            "Requests refused, by reason.",
            ["reason"],
            registry=r,
        )
        self.request_success = Counter(
            "moeserve:request_success",
            "Finished requests by reason.",
            ["finished_reason"],
            registry=r,
        )
        self.routed = Counter(
            "moeserve:router_routed_requests", "Routing decisions.", worker, registry=r
        )
        self.disaggregated = Counter(
            "moeserve:router_disaggregated_requests",
            "Requests by prefill placement: remote (prefill worker) or local (decode worker).",
            ["mode"],
            registry=r,
        )
        self.prompt_tokens = Counter(
            "moeserve:prompt_tokens", "Prompt tokens received.", registry=r
        )
        self.generation_tokens = Counter(
            "moeserve:generation_tokens", "Tokens generated.", registry=r
        )
        self.time_to_first_token = Histogram(
            "moeserve:time_to_first_token_seconds",
            "Time to first token.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.inter_token_latency = Histogram(
            "moeserve:inter_token_latency_seconds",
            "Time between streamed tokens.",
            buckets=ITL_BUCKETS,
            registry=r,
        )
        self.e2e_request_latency = Histogram(
            "moeserve:e2e_request_latency_seconds",
            "Request latency, arrival to last token.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )

        # Reliability: what the failure paths did, so a dashboard shows faults being absorbed.
        self.migrations = Counter(
            "moeserve:router_migrations",
            "Requests moved to another decode worker, by when (before_first_token, mid_stream).",
            ["when"],
            registry=r,
        )
        self.migration_limit_hit = Counter(
            "moeserve:router_migration_limit_hit",
            "Requests failed with a retryable error after the per-request migration limit.",
            registry=r,
        )
        self.handoff_retries = Counter(
            "moeserve:router_handoff_retries",
            "P->D handoff phases retried on another worker, by phase.",
            ["phase"],
            registry=r,
        )
        self.handoff_fallbacks = Counter(
            "moeserve:router_handoff_fallbacks",
            "Handoffs that fell back to prefill on the decode worker, by the phase that failed.",
            ["phase"],
            registry=r,
        )
        self.phase_timeouts = Counter(
            "moeserve:router_phase_timeouts",
            "Phase deadlines that expired (prefill, first_token, stream_stall).",
            ["phase"],
            registry=r,
        )
        self.worker_available = Gauge(
            "moeserve:router_worker_available",
            "1 when the router routes to the worker (healthy, not ejected, not draining).",
            worker,
            registry=r,
        )
        self.worker_ejections = Counter(
            "moeserve:router_worker_ejections",
            "Passive-health ejections (errors, timeouts), per worker.",
            worker,
            registry=r,
        )
        self.incompatible_pairs = Gauge(
            "moeserve:router_incompatible_pairs",
            "Prefill/decode pairs the router refuses to pair (fingerprint mismatch).",
            registry=r,
        )

    def worker_load(
        self, worker: str, role: str, running: int, waiting: int, kv_usage: float
    ) -> None:
        self.num_requests_running.labels(worker, role).set(running)
        self.num_requests_waiting.labels(worker, role).set(waiting)
        self.kv_cache_usage_perc.labels(worker, role).set(kv_usage)

    def forget_worker(self, worker: str, role: str) -> None:
        for gauge in (self.num_requests_running, self.num_requests_waiting,
                      self.kv_cache_usage_perc):  # fmt: skip
            try:
                gauge.remove(worker, role)
            except KeyError:
                pass


def render(registry: CollectorRegistry) -> tuple[bytes, str]:
    """(body, content type) of a /metrics response."""
    return generate_latest(registry), CONTENT_TYPE_LATEST


def start_metrics_server(port: int, host: str, registry: CollectorRegistry) -> WSGIServer:
    """/metrics on its own port (a thread), always in the classic text format.

    prometheus_client's server answers a scraper that prefers OpenMetrics, as Prometheus does,
    with every ``:`` escaped to ``_`` (``moeserve:num_requests_waiting`` is stored as
    ``moeserve_num_requests_waiting``), so no moeserve query would find the series. Without the
    Accept header it serves the text format, names as written, like the router's HTTP port.
    """
    httpd, _ = start_http_server(port, addr=host, registry=registry)
    negotiating = httpd.get_app()

    def text_format(environ: dict, start_response):  # noqa: ANN202 (WSGI)
        environ.pop("HTTP_ACCEPT", None)
        return negotiating(environ, start_response)

    httpd.set_app(text_format)
    return httpd
