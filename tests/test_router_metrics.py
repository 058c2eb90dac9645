"""Router and worker metrics carry the vLLM/Dynamo-style names users look for."""

from __future__ import annotations

from moeserve.common.metrics import render
from moeserve.router.metrics import RouterMetrics
from moeserve.worker.metrics import WorkerMetrics


def test_router_metric_names() -> None:
    m = RouterMetrics()
    m.bind_model("deepseek-v3")
    m.worker_load("d0", "decode", running=2, waiting=1, kv_usage=0.25)
    m.prefix_cache_hits.labels("d0", "decode").inc(128)
    m.kv_transfer_bytes.inc(4096)
    m.time_to_first_token.observe(0.05)
    m.inter_token_latency.observe(0.01)
    body, content_type = render(m.registry)
    text = body.decode()
    assert content_type.startswith("text/plain")
    for line in [
        'moeserve:num_requests_running{role="decode",worker="d0"} 2.0',
        'moeserve:num_requests_waiting{role="decode",worker="d0"} 1.0',
        'moeserve:kv_cache_usage_perc{role="decode",worker="d0"} 0.25',
        'moeserve:prefix_cache_hits_total{role="decode",worker="d0"} 128.0',
        "moeserve:kv_transfer_bytes_total 4096.0",
        'moeserve:time_to_first_token_seconds_count{model_name="deepseek-v3"} 1.0',
        'moeserve:inter_token_latency_seconds_count{model_name="deepseek-v3"} 1.0',
        "moeserve:kv_transfer_seconds_count 0.0",
    ]:
        assert line in text, line
    m.request_success.labels("stop").inc()
    text = render(m.registry)[0].decode()
    assert 'moeserve:request_success_total{finished_reason="stop",model_name="deepseek-v3"}' \
        in text
    assert 'model_name=""' not in text  # the unnamed placeholder went with bind_model
    m.forget_worker("d0", "decode")
    assert 'worker="d0"} 2.0' not in render(m.registry)[0].decode()


def test_worker_metrics_independent_registries() -> None:
    a, b = WorkerMetrics(), WorkerMetrics()  # no duplicate-registration error
    a.num_requests_waiting.set(3)
    assert b"moeserve:num_requests_waiting 3.0" in render(a.registry)[0]
    assert b"moeserve:num_requests_waiting 0.0" in render(b.registry)[0]


def test_worker_stream_timing(monkeypatch) -> None:
    """A worker times its own stream: TTFT from arrival, ITL between messages, TPOT at the end."""
    from moeserve.worker import metrics as worker_metrics

    clock = iter([1.5, 1.5, 1.75, 2.5])
    monkeypatch.setattr(worker_metrics.time, "perf_counter", lambda: next(clock))
    m = WorkerMetrics()
    timing = worker_metrics.StreamTiming(m, arrived=1.0)
    timing.tokens(1, False)  # first token 0.5 s after arrival
    timing.tokens(0, False)  # an empty message times nothing
    timing.tokens(2, False)  # 0.25 s later
    timing.tokens(1, True)  # 0.75 s later; 4 tokens over 1.0 s after the first: TPOT 1/3 s
    text = render(m.registry)[0].decode()
    assert "moeserve:time_to_first_token_seconds_sum 0.5" in text
    assert "moeserve:inter_token_latency_seconds_count 2.0" in text
    assert "moeserve:inter_token_latency_seconds_sum 1.0" in text
    assert "moeserve:request_time_per_output_token_seconds_sum 0.333" in text


def test_metrics_port_keeps_colons_for_an_openmetrics_scraper() -> None:
    """Prometheus asks for OpenMetrics first; the series must keep the names queries use."""
    import httpx

    from moeserve.common.metrics import start_metrics_server

    m = WorkerMetrics()
    m.num_requests_waiting.set(2)
    httpd = start_metrics_server(0, "127.0.0.1", m.registry)
    try:
        accept = ("application/openmetrics-text;version=1.0.0,application/openmetrics-text;"
                  "version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1")
        resp = httpx.get(f"http://127.0.0.1:{httpd.server_port}/metrics",
                         headers={"Accept": accept}, timeout=5)
        assert "moeserve:num_requests_waiting 2.0" in resp.text.splitlines()
    finally:
        httpd.shutdown()
        httpd.server_close()
