"""Statistics for `moeserve bench`: per-request records in, the `vllm bench serve` metrics out.

Pure functions (no I/O, no clock), so the numbers are unit-tested against known inputs:
TTFT (time to the first content chunk), TPOT ((e2e - TTFT) / (output tokens - 1), only for
requests with more than one output token), ITL (every gap between content chunks, pooled over
all requests) and end-to-end latency, each as mean / p50 / p90 / p99 in milliseconds, plus
request, output and total token throughput.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

__all__ = ["PERCENTILES", "RequestRecord", "distribution", "format_table", "percentile",
           "summarize"]  # fmt: skip

PERCENTILES = (50, 90, 99)

# (summary key, section title, short name) in the order the table prints them.
_LATENCY_METRICS = (
    ("ttft_ms", "Time to First Token", "TTFT"),
    ("tpot_ms", "Time per Output Token (excl. 1st token)", "TPOT"),
    ("itl_ms", "Inter-token Latency", "ITL"),
    ("e2e_latency_ms", "End-to-end Latency", "E2EL"),
)


@dataclass
class RequestRecord:
    ok: bool = False
    prompt_len: int = 0
    output_len: int = 0  # the max_tokens asked for
    output_tokens: int = 0  # what came back
    ttft_s: float = 0.0
    latency_s: float = 0.0
    itl_s: list[float] = field(default_factory=list)
    error: str | None = None

    @property
    def tpot_s(self) -> float | None:
        if self.output_tokens < 2:
            return None
        return (self.latency_s - self.ttft_s) / (self.output_tokens - 1)


def percentile(values: list[float], p: float) -> float:
    """The p-th percentile with linear interpolation between closest ranks (numpy's default
    ``np.percentile``, which vllm bench serve uses). NaN for no values."""
    if not 0 <= p <= 100:
        raise ValueError(f"percentile must be within [0, 100], got {p}")
    if not values:
        return math.nan
    xs = sorted(values)
    k = (len(xs) - 1) * p / 100
    lo = math.floor(k)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def distribution(values: list[float], scale: float = 1.0) -> dict[str, float]:
    """``{"mean", "p50", "p90", "p99"}`` of ``values`` times ``scale``; zeros when empty (as vllm
    reports a metric no request produced, e.g. TPOT when every output is one token)."""
    if not values:
        return {"mean": 0.0, **{f"p{p}": 0.0 for p in PERCENTILES}}
    out = {"mean": math.fsum(values) / len(values) * scale}
    for p in PERCENTILES:
        out[f"p{p}"] = percentile(values, p) * scale
    return out


def summarize(
    records: list[RequestRecord], duration_s: float, max_concurrency: int = 0
) -> dict[str, Any]:
    """The run's summary: counts, throughputs, latency distributions (ms), errors by message."""
    ok = [r for r in records if r.ok]
    out_tokens = sum(r.output_tokens for r in ok)
    in_tokens = sum(r.prompt_len for r in ok)
    rate = (lambda n: n / duration_s) if duration_s > 0 else (lambda n: 0.0)
    tpots = [t for r in ok if (t := r.tpot_s) is not None]
    errors = Counter(r.error or "unknown error" for r in records if not r.ok)
    return {
        "duration_s": duration_s,
        "completed": len(ok),
        "failed": len(records) - len(ok),
        "max_concurrency": max_concurrency,
        "total_input_tokens": in_tokens,
        "total_output_tokens": out_tokens,
        # ignore_eos should make every output exactly as long as asked; say so when it is not
        "short_outputs": sum(r.output_tokens < r.output_len for r in ok),
        "request_throughput": rate(len(ok)),
        "output_throughput": rate(out_tokens),
        "total_token_throughput": rate(in_tokens + out_tokens),
        "ttft_ms": distribution([r.ttft_s for r in ok], 1e3),
        "tpot_ms": distribution(tpots, 1e3),
        "itl_ms": distribution([x for r in ok for x in r.itl_s], 1e3),
        "e2e_latency_ms": distribution([r.latency_s for r in ok], 1e3),
        "errors": dict(errors.most_common(10)),
    }


def format_table(s: dict[str, Any]) -> str:
    """The summary as `vllm bench serve` prints it (its row names, plus p90)."""
    width = 50

    def row(name: str, value: Any) -> str:
        return f"{name:<40}{value}"

    def rule(title: str, fill: str) -> str:
        return f"{title:{fill}^{width}}"

    lines = [
        rule(" Serving Benchmark Result ", "="),
        row("Successful requests:", s["completed"]),
        row("Failed requests:", s["failed"]),
    ]
    if s.get("max_concurrency"):
        lines.append(row("Maximum request concurrency:", s["max_concurrency"]))
    lines += [
        row("Benchmark duration (s):", f"{s['duration_s']:.2f}"),
        row("Total input tokens:", s["total_input_tokens"]),
        row("Total generated tokens:", s["total_output_tokens"]),
        row("Request throughput (req/s):", f"{s['request_throughput']:.2f}"),
        row("Output token throughput (tok/s):", f"{s['output_throughput']:.2f}"),
        row("Total token throughput (tok/s):", f"{s['total_token_throughput']:.2f}"),
    ]
    for key, title, short in _LATENCY_METRICS:
        lines.append(rule(title, "-"))
        for stat, value in s[key].items():
            label = "Mean" if stat == "mean" else stat.upper()
            lines.append(row(f"{label} {short} (ms):", f"{value:.2f}"))
    lines.append("=" * width)
    if s.get("short_outputs"):
        lines.append(f"warning: {s['short_outputs']} requests returned fewer tokens than asked")
    for err, n in s["errors"].items():
        lines.append(f"error ({n}x): {err}")
    return "\n".join(lines)
