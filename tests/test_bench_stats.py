"""The bench statistics: known inputs give known mean/p50/p90/p99, numpy's (and so vllm's)."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest

from moeserve.bench_stats import RequestRecord, distribution, format_table, percentile, summarize


def test_percentile_known_values() -> None:
    xs = [4.0, 1.0, 3.0, 2.0, 10.0]  # sorted: 1 2 3 4 10
    assert percentile(xs, 50) == 3.0
    assert percentile(xs, 90) == pytest.approx(4 + 0.6 * 6)  # rank 3.6
    assert percentile(xs, 99) == pytest.approx(4 + 0.96 * 6)  # rank 3.96
    assert percentile(xs, 0) == 1.0 and percentile(xs, 100) == 10.0
    assert percentile([7.0], 99) == 7.0
    assert math.isnan(percentile([], 50))
    with pytest.raises(ValueError, match="within"):
        percentile(xs, 101)


@pytest.mark.parametrize("n", [2, 3, 10, 101, 1000])
def test_distribution_matches_numpy_linear(n: int) -> None:
    rng = random.Random(n)
    xs = [rng.expovariate(1.0) for _ in range(n)]
    d = distribution(xs, scale=1e3)
    assert d["mean"] == pytest.approx(np.mean(xs) * 1e3)
    for p in (50, 90, 99):
        assert d[f"p{p}"] == pytest.approx(np.percentile(xs, p, method="linear") * 1e3)
    assert list(d) == ["mean", "p50", "p90", "p99"]


def _rec(ttft: float, e2e: float, out: int, itl: list[float], asked: int = 0) -> RequestRecord:
    return RequestRecord(ok=True, prompt_len=10, output_len=asked or out, output_tokens=out,
                         ttft_s=ttft, latency_s=e2e, itl_s=itl)  # fmt: skip


def test_summarize_known_run() -> None:
    records = [
        _rec(0.1, 0.5, 5, [0.1] * 4),  # TPOT (0.5 - 0.1) / 4 = 0.1
        _rec(0.2, 0.8, 4, [0.2] * 3),  # TPOT 0.6 / 3 = 0.2
        _rec(0.3, 0.3, 1, [], asked=2),  # one token: no TPOT, no ITL; short of the 2 asked
        RequestRecord(prompt_len=10, output_len=5, error="HTTP 429: busy"),
        RequestRecord(prompt_len=10, output_len=5, error="HTTP 429: busy"),
    ]
    s = summarize(records, duration_s=2.0, max_concurrency=4)
    assert (s["completed"], s["failed"], s["max_concurrency"]) == (3, 2, 4)
    assert s["total_input_tokens"] == 30 and s["total_output_tokens"] == 10
    assert s["request_throughput"] == 1.5 and s["output_throughput"] == 5.0
    assert s["total_token_throughput"] == 20.0
    assert s["ttft_ms"]["mean"] == pytest.approx(200) and s["ttft_ms"]["p50"] == pytest.approx(200)
    assert s["tpot_ms"]["mean"] == pytest.approx(150) and s["tpot_ms"]["p90"] == pytest.approx(190)
    assert s["itl_ms"]["p50"] == pytest.approx(100) and s["itl_ms"]["p99"] == pytest.approx(200)
    assert s["e2e_latency_ms"]["p99"] == pytest.approx(np.percentile([300, 500, 800], 99))
    assert s["errors"] == {"HTTP 429: busy": 2} and s["short_outputs"] == 1


def test_summarize_nothing_completed_and_table() -> None:
    s = summarize([RequestRecord(error="ConnectError: refused")], duration_s=0.0)
    assert s["completed"] == 0 and s["output_throughput"] == 0.0
    assert s["ttft_ms"] == {"mean": 0.0, "p50": 0.0, "p90": 0.0, "p99": 0.0}
    table = format_table(s)
    assert "Failed requests:                        1" in table
    assert "error (1x): ConnectError: refused" in table
