"""Prometheus pieces the router and the workers share: histogram buckets, the KV transfer
metrics both export, and how a registry is served (/metrics body, a port of its own).

Each component builds its metrics on its own registry (tests and several components in one
process never collide on the global one); the router's are in moeserve.router.metrics, a
worker's in moeserve.worker.metrics.
"""

from __future__ import annotations

import hmac
import os
from collections.abc import Mapping, Sequence
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

from moeserve.common.spec import ENV_METRICS_KEYS

__all__ = ["KVTransferMetrics", "ServingMetrics", "bearer_ok", "render", "start_metrics_server",
           "worker_metrics_keys", "LATENCY_BUCKETS", "ITL_BUCKETS", "TRANSFER_BUCKETS"]

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


class ServingMetrics(KVTransferMetrics):
    """The series the router and every worker both export: one definition of their names,
    types, labels and buckets, so a dashboard or HPA query reads either pool the same way.

    ``docs`` gives each series' help text by attribute name where the two count different
    things (the router per chosen worker, a worker its own batch). ``per_worker``: label names
    of the load gauges and prefix-cache counters (the router labels them by worker and role, a
    worker exports its own, unlabelled). ``per_request``: label names of the request series
    (tokens, finished requests, TTFT, ITL; the router's ``model_name``), before any own label.
    """

    def __init__(self, registry: CollectorRegistry, docs: Mapping[str, str],
                 per_worker: Sequence[str] = (), per_request: Sequence[str] = ()):
        super().__init__(registry)
        self.registry = registry
        r = registry

        def load(name: str) -> Gauge:
            return Gauge(f"moeserve:{name}", docs[name], per_worker, registry=r)

        def cache(name: str) -> Counter:
            return Counter(f"moeserve:{name}", docs[name], per_worker, registry=r)

        self.num_requests_running = load("num_requests_running")
        self.num_requests_waiting = load("num_requests_waiting")
        self.kv_cache_usage_perc = load("kv_cache_usage_perc")
        self.prefix_cache_queries = cache("prefix_cache_queries")
        self.prefix_cache_hits = cache("prefix_cache_hits")
        req = list(per_request)
        self.prompt_tokens = Counter("moeserve:prompt_tokens", "Prompt tokens received.",
                                     req, registry=r)
        self.generation_tokens = Counter("moeserve:generation_tokens", "Tokens generated.",
                                         req, registry=r)
        self.request_success = Counter("moeserve:request_success", "Finished requests by reason.",
                                       [*req, "finished_reason"], registry=r)
        self.time_to_first_token = Histogram(
            "moeserve:time_to_first_token_seconds", docs["time_to_first_token"], req,
            buckets=LATENCY_BUCKETS, registry=r)
        self.inter_token_latency = Histogram(
            "moeserve:inter_token_latency_seconds", docs["inter_token_latency"], req,
            buckets=ITL_BUCKETS, registry=r)


def render(registry: CollectorRegistry) -> tuple[bytes, str]:
    """(body, content type) of a /metrics response."""
    return generate_latest(registry), CONTENT_TYPE_LATEST


def bearer_ok(header: str | bytes | None, keys: Sequence[bytes]) -> bool:
    """``Authorization: Bearer <key>`` names one of ``keys``; every key is compared, each in
    constant time (``hmac.compare_digest``), so the answer time tells nothing of a guess."""
    if header is None:
        return False
    text = header.decode("latin-1") if isinstance(header, bytes) else header
    scheme, _, token = text.strip().partition(" ")
    raw = token.strip().encode("latin-1", "replace") if scheme.lower() == "bearer" else b""
    ok = False
    for key in keys:
        ok |= hmac.compare_digest(raw, key)
    return ok and bool(raw)


def worker_metrics_keys(plane_tokens: Sequence[str] = (),
                        env: Mapping[str, str] | None = None) -> list[str]:  # fmt: skip
    """Keys a worker's metrics port wants: none (open, as the router's without
    --api-key-metrics) unless the deployment's metrics are keyed (``MOESERVE_METRICS_KEYS``,
    set by `moeserve up --api-key-metrics` and the operator under ``spec.router.apiKeyMetrics``).
    Then those keys, which Prometheus sends to the router and workers alike, or this worker's
    worker-plane tokens (``plane_tokens``: for whoever holds the deployment's secret)."""
    env = os.environ if env is None else env
    raw = env.get(ENV_METRICS_KEYS, "")
    keys = [k.strip() for k in raw.replace("\n", ",").split(",") if k.strip()]
    return list(dict.fromkeys([*keys, *plane_tokens])) if keys else []


_DENIED = b"Invalid or missing API key: send 'Authorization: Bearer <key>'.\n"


def start_metrics_server(port: int, host: str, registry: CollectorRegistry,
                         keys: Sequence[str] = ()) -> WSGIServer:
    """/metrics on its own port (a thread), always in the classic text format.

    prometheus_client's server answers a scraper that prefers OpenMetrics, as Prometheus does,
    with every ``:`` escaped to ``_`` (``moeserve:num_requests_waiting`` is stored as
    ``moeserve_num_requests_waiting``), so no moeserve query would find the series. Without the
    Accept header it serves the text format, names as written, like the router's HTTP port.

    ``keys``: when given, every path but ``/health`` answers 401 without a bearer key among
    them. ``/health`` then answers a bare 200 (a liveness probe cannot send a key) and no series.
    """
    httpd, _ = start_http_server(port, addr=host, registry=registry)
    negotiating = httpd.get_app()
    secrets = [k.encode() for k in keys]

    def text_format(environ: dict, start_response):  # noqa: ANN202 (WSGI)
        environ.pop("HTTP_ACCEPT", None)
        if secrets and environ.get("PATH_INFO") == "/health":
            start_response("200 OK", [("Content-Type", "text/plain")])
            return [b"ok\n"]
        if secrets and not bearer_ok(environ.get("HTTP_AUTHORIZATION"), secrets):
            start_response("401 Unauthorized", [("Content-Type", "text/plain"),
                                                ("WWW-Authenticate", 'Bearer realm="moeserve"')])
            return [_DENIED]
        return negotiating(environ, start_response)

    httpd.set_app(text_format)
    return httpd
