"""Prometheus pieces the router and the workers share: histogram buckets, the KV transfer
metrics both export, and how a registry is served (/metrics body, a port of its own).

Each component builds its metrics on its own registry (tests and several components in one
process never collide on the global one); the router's are in moeserve.router.metrics, a
worker's in moeserve.worker.metrics.
"""

from __future__ import annotations

from wsgiref.simple_server import WSGIServer

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
    start_http_server,
)

__all__ = ["KVTransferMetrics", "render", "start_metrics_server",
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
