"""Prometheus metrics one worker process exports on its /metrics port (vLLM-style names).

The latency histograms carry the router's names (``moeserve:time_to_first_token_seconds``, ...)
but time this worker only, from a request's arrival here: the prefill pool's HPA scales on its
own pods' TTFT p90, which the router's end-to-end TTFT cannot give per pod. Queries tell the two
apart by the ``moeserve_pool`` target label (router, prefill, decode) the chart's ServiceMonitor
adds; see docs/operator.md.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from moeserve.common.metrics import ITL_BUCKETS, ServingMetrics
from moeserve.worker.compile_watch import WATCH, CompileWatch

__all__ = ["WorkerMetrics", "StartupCollector", "StreamTiming"]

STEP_TOKEN_BUCKETS = (16, 64, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768)

_DOCS = {
    "num_requests_running": "Requests in the running batch.",
    "num_requests_waiting": "Requests waiting to be scheduled.",
    "kv_cache_usage_perc": "Fraction of KV blocks in use (0..1).",
    "prefix_cache_queries": "Prompt tokens looked up in the prefix cache.",
    "prefix_cache_hits": "Prompt tokens found in the prefix cache.",
    "time_to_first_token": "Time from a request's arrival at this worker to the first token it "
                           "produced (prefill: the token handed back with the KV handle; decode: "
                           "the first streamed).",
    "inter_token_latency": "Time between tokens this worker streamed.",
}


class WorkerMetrics(ServingMetrics):
    """Metrics one worker process exports on its /metrics port."""

    def __init__(self, registry: CollectorRegistry | None = None):
        super().__init__(registry or CollectorRegistry(), _DOCS)
        r = self.registry
        self.prompt_tokens_computed = Gauge(
            "moeserve:prompt_tokens_computed",
            "Prompt tokens this worker ran through the model (not cached, not transferred).",
            registry=r,
        )
        self.pinned_kv_leases = Gauge(
            "moeserve:kv_pinned_leases",
            "Prefilled requests whose blocks await a decode READ.",
            registry=r,
        )
        self.expired_kv_leases = Counter(
            "moeserve:kv_expired_leases",
            "Pinned KV released because no decode collected it.",
            registry=r,
        )
        self.time_per_output_token = Histogram(
            "moeserve:request_time_per_output_token_seconds",
            "Per request: time from the first to the last streamed token over the tokens after "
            "the first (TPOT).",
            buckets=ITL_BUCKETS,
            registry=r,
        )
        self.step_seconds = Histogram(
            "moeserve:engine_step_seconds",
            "Wall time of each engine step, by kind: decode (every running request one token) "
            "or mixed (prompt tokens computed, beside any decodes).",
            ["kind"], buckets=ITL_BUCKETS, registry=r,
        )  # fmt: skip
        self.step_prompt_tokens = Histogram(
            "moeserve:engine_step_prompt_tokens",
            "Prompt tokens each mixed step computed: many small mixed steps cost more than "
            "few full ones (each pays the step's fixed cost).",
            buckets=STEP_TOKEN_BUCKETS, registry=r,
        )  # fmt: skip
        self.step_gap_seconds = Histogram(
            "moeserve:engine_step_gap_seconds",
            "Time between two engine steps while requests were unfinished: the engine thread's "
            "work between steps (commands, outputs, housekeeping) and its waits for the GIL.",
            buckets=ITL_BUCKETS, registry=r,
        )  # fmt: skip
        r.register(StartupCollector(WATCH))

    def observe_step(self, seconds: float, prompt_tokens: int, gap: float | None = None) -> None:
        """One engine step (called from the engine thread); ``gap``: since the previous one."""
        if gap is not None:
            self.step_gap_seconds.observe(gap)
        if prompt_tokens:
            self.step_seconds.labels("mixed").observe(seconds)
            self.step_prompt_tokens.observe(prompt_tokens)
        else:
            self.step_seconds.labels("decode").observe(seconds)


class StartupCollector(Collector):
    """Start-up time by phase and compilations after ready, read from the process's
    CompileWatch at each scrape (the compilers report there, from any thread)."""

    def __init__(self, watch: CompileWatch):
        self.watch = watch

    def collect(self) -> Iterator:
        startup = GaugeMetricFamily(
            "moeserve:worker_startup_seconds",
            "Seconds this worker's start-up took, by phase: load (model, weights, KV cache), "
            "capture (decode CUDA graphs), warmup (dummy requests before ready).",
            labels=["phase"])
        for phase, seconds in self.watch.startup_seconds.items():
            startup.add_metric([phase], seconds)
        yield startup
        after = CounterMetricFamily(
            "moeserve:worker_compilations_after_ready",
            "Kernel compilations (triton), TorchDynamo frames (dynamo) and CUDA graph captures "
            "(cuda_graph) after the worker reported ready: each one stalled a request. The "
            "warm-up is meant to keep this at 0.",
            labels=["kind"])
        for kind, count in self.watch.counts_after_ready().items():
            after.add_metric([kind], count)
        yield after


class StreamTiming:
    """TTFT, inter-token latency and TPOT of one Generate stream, as this worker saw them."""

    def __init__(self, metrics: WorkerMetrics, arrived: float):
        self.metrics, self.arrived = metrics, arrived
        self.first: float | None = None
        self.last = arrived
        self.count = 0

    def tokens(self, n: int, finished: bool) -> None:
        """One stream message of ``n`` tokens arrived (``finished``: the last one)."""
        now = time.perf_counter()
        if n:
            if self.first is None:
                self.first = now
                self.metrics.time_to_first_token.observe(now - self.arrived)
            else:
                self.metrics.inter_token_latency.observe(now - self.last)
            self.last, self.count = now, self.count + n
        if finished and self.first is not None and self.count > 1:
            tpot = (self.last - self.first) / (self.count - 1)
            self.metrics.time_per_output_token.observe(tpot)
