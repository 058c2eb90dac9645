"""Prometheus metrics of the router (the workers' are in moeserve.worker.metrics), named as
vLLM / Dynamo users expect; the pieces shared with the workers (buckets, KV transfer,
rendering) are in moeserve.common.metrics.

vLLM's ``vllm:<name>`` becomes ``moeserve:<name>``, so existing dashboards and HPA rules port by
renaming the prefix. Each component builds its metrics on its own registry (tests and several
components in one process never collide on the global one). A series that both the router and a
worker export (prompt and generated tokens, TTFT, ...) is told apart by the ``moeserve_pool``
target label the chart's ServiceMonitor adds (router, prefill, decode): every query picks one.
The router's request series (tokens, finished requests, TTFT, ITL, E2E) carry ``model_name``,
the served name, as vLLM's do.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from moeserve.common.metrics import LATENCY_BUCKETS, ServingMetrics

__all__ = ["RouterMetrics"]

WORKER = ("worker", "role")
_DOCS = {
    "num_requests_running": "Requests running, per worker.",
    "num_requests_waiting": "Requests waiting, per worker.",
    "kv_cache_usage_perc": "KV usage (0..1), per worker.",
    "prefix_cache_queries": "Prompt tokens routed, per chosen worker (the denominator of the "
                            "hit rate).",
    "prefix_cache_hits": "Prompt tokens the chosen worker already cached, per worker.",
    "time_to_first_token": "Time to first token.",
    "inter_token_latency": "Time between streamed tokens.",
}


_PER_MODEL = ("prompt_tokens", "generation_tokens", "time_to_first_token",
              "inter_token_latency", "e2e_request_latency")


class _ByReason:
    """request_success with ``model_name`` bound: ``.labels(reason)`` as before."""

    def __init__(self, family: Counter, model: str) -> None:
        self.family, self.model = family, model

    def labels(self, reason: str) -> Any:
        return self.family.labels(self.model, reason)


class RouterMetrics(ServingMetrics):
    """Metrics of one router replica; per-worker gauges come from the workers' load reports.

    The request series are recorded through children bound to ``model_name`` (``bind_model``,
    which the Frontend calls with the served name), so callers use them unlabelled."""

    def __init__(self, registry: CollectorRegistry | None = None, model_name: str = ""):
        super().__init__(registry or CollectorRegistry(), _DOCS, per_worker=WORKER,
                         per_request=("model_name",))  # fmt: skip
        self._routing_series(self.registry)
        self._reliability_series(self.registry)
        self._families = {a: getattr(self, a) for a in (*_PER_MODEL, "request_success")}
        self.model_name: str | None = None
        self.bind_model(model_name)

    def bind_model(self, name: str) -> None:
        """Record the request series under ``model_name=name`` from now on."""
        old, self.model_name = self.model_name, name
        for attr in _PER_MODEL:
            family = self._families[attr]
            if old is not None and old != name:
                family.remove(old)  # the placeholder series of an unnamed start
            setattr(self, attr, family.labels(name))
        if old is not None and old != name:
            self._families["request_success"].clear()
        self.request_success = _ByReason(self._families["request_success"], name)

    def _routing_series(self, r: CollectorRegistry) -> None:
        self.requests_in_flight = Gauge(
            "moeserve:router_requests_in_flight", "Requests this router is serving.", registry=r
        )
        self.requests_rejected = Counter(
            "moeserve:router_requests_rejected", "Requests refused, by reason.", ["reason"],
            registry=r,
        )
        self.routed = Counter(
            "moeserve:router_routed_requests", "Routing decisions.", WORKER, registry=r
        )
        self.disaggregated = Counter(
            "moeserve:router_disaggregated_requests",
            "Requests by prefill placement: remote (prefill worker) or local (decode worker).",
            ["mode"],
            registry=r,
        )
        self.e2e_request_latency = Histogram(
            "moeserve:e2e_request_latency_seconds",
            "Request latency, arrival to last token.",
            ["model_name"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )

    def _reliability_series(self, r: CollectorRegistry) -> None:
        """What the failure paths did, so a dashboard shows faults being absorbed."""
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
            WORKER,
            registry=r,
        )
        self.worker_ejections = Counter(
            "moeserve:router_worker_ejections",
            "Passive-health ejections (errors, timeouts), per worker.",
            WORKER,
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
