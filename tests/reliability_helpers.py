"""Shared by the reliability e2e tests and benchmarks/soak.py: streamed greedy requests with
token ids, and how a finished request compares with the uninterrupted run."""

from __future__ import annotations

import json
import re
import threading
import time
from dataclasses import dataclass, field

import httpx

__all__ = [
    "Outcome", "classify", "metric", "prompt_ids", "reference_tokens", "rss_mib", "stream_tokens",
]


@dataclass
class Outcome:
    tokens: list[int] = field(default_factory=list)
    error: dict | None = None
    status: int = 200
    ttft_s: float | None = None
    itl_s: list[float] = field(default_factory=list)
    max_gap_s: float = 0.0
    latency_s: float = 0.0


def prompt_ids(seed: int, n: int = 40) -> list[int]:
    return [(seed * 7919 + i * 104729) % 500 + 2 for i in range(n)]


def reference_tokens(model_dir: str, prompts: list[list[int]], max_tokens: int,
                     num_kv_blocks: int = 96) -> list[list[int]]:  # fmt: skip
    """Greedy tokens of an uninterrupted in-process run (what `moeserve generate` prints)."""
    from moeserve.common.sampling import SamplingParams
    from moeserve.worker.config import EngineConfig
    from moeserve.worker.engine import LLMEngine

    engine = LLMEngine(EngineConfig(model=model_dir, num_kv_blocks=num_kv_blocks))
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    return [engine.generate([p], params)[0] for p in prompts]


def stream_tokens(url: str, prompt: list[int], max_tokens: int, timeout_s: float = 120.0,
                  client: httpx.Client | None = None, first_token: threading.Event | None = None,
                  **extra) -> Outcome:  # fmt: skip
    """One streamed greedy completion; token ids as streamed, or the error it ended with.
    ``first_token`` is set when the first token ids arrive."""
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True, "return_token_ids": True, **extra}  # fmt: skip
    out = Outcome()
    start = last = time.perf_counter()
    c = client or httpx.Client(timeout=timeout_s)
    try:
        with c.stream("POST", f"{url}/v1/completions", json=body, timeout=timeout_s) as resp:
            out.status = resp.status_code
            if resp.status_code != 200:
                resp.read()
                out.error = resp.json().get("error", {"message": resp.text})
                return out
            for line in resp.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                d = json.loads(line[6:])
                if "error" in d:
                    out.error = d["error"]
                    continue
                ids = (d["choices"][0].get("token_ids") or []) if d["choices"] else []
                now = time.perf_counter()
                if ids:
                    if out.ttft_s is None:
                        out.ttft_s = now - start
                        if first_token is not None:
                            first_token.set()
                    else:
                        out.itl_s.append((now - last) / len(ids))
                        out.max_gap_s = max(out.max_gap_s, now - last)
                    last = now
                out.tokens.extend(ids)
    except httpx.HTTPError as e:
        out.error = {"message": f"{type(e).__name__}: {e}", "type": "transport"}
    finally:
        out.latency_s = time.perf_counter() - start
        if client is None:
            c.close()
    return out


def classify(got: Outcome, want: list[int]) -> str:
    """ok | migration_limit (a clear retryable error) | lost | repeated | wrong | error."""
    if got.error is not None:
        if got.error.get("type") == "migration_limit_exceeded":
            return "migration_limit"
        return "error"
    if got.tokens == want:
        return "ok"
    if len(got.tokens) < len(want) and want[: len(got.tokens)] == got.tokens:
        return "lost"
    if len(got.tokens) > len(want) and got.tokens[: len(want)] == want:
        return "repeated"
    return "wrong"


def metric(url: str, name: str, labels: str = "") -> float:
    """Sum of a Prometheus series (all label sets containing ``labels``)."""
    text = httpx.get(url, timeout=5).text
    total = 0.0
    for m in re.finditer(rf"^{re.escape(name)}(\{{[^}}]*\}})? (\S+)$", text, re.M):
        if labels in (m.group(1) or ""):
            total += float(m.group(2))
    return total


def rss_mib(pid: int) -> float:
    """Resident set size of a process, from /proc (Linux); 0 for one that just exited."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0.0
