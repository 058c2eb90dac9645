"""Prefix-aware routing across two decode workers vs round robin, on a shared-prefix workload."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest

from moeserve.deploy.local import ClusterSpec, LocalCluster
from tests.reliability_helpers import metric

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

PREFIX_BLOCKS = 4  # of 64 tokens


def _workload() -> list[list[int]]:
    """Two prefix groups, each sent four times in a row, with distinct 20-token tails."""
    groups = [[(g * 131 + i * 17) % 500 + 2 for i in range(64 * PREFIX_BLOCKS)] for g in (1, 2)]
    return [groups[g] + [(r * 37 + j) % 500 + 2 for j in range(20)]
            for g in range(2) for r in range(4)]  # fmt: skip


def _run(model_dir: Path, policy: str) -> tuple[float, float, list[float]]:
    spec = ClusterSpec(model=str(model_dir), prefill=0, decode=2, port=0, policy=policy,
                       num_kv_blocks=64, metrics=False)  # fmt: skip
    with LocalCluster(spec, log=None) as c:
        for prompt in _workload():
            body = {"prompt": prompt, "max_tokens": 1, "temperature": 0}
            assert httpx.post(f"{c.url}/v1/completions", json=body, timeout=60).status_code == 200
            time.sleep(0.3)  # let the worker's KV events reach the router's prefix index
        metrics = f"{c.url}/metrics"
        hits = metric(metrics, "moeserve:prefix_cache_hits_total")
        queries = metric(metrics, "moeserve:prefix_cache_queries_total")
        per_worker = [
            metric(metrics, "moeserve:router_routed_requests_total", f'worker="{w.address}"')
            for w in c.children if w.name.startswith("decode")
        ]  # fmt: skip
    return hits, queries, per_worker


def test_prefix_policy_follows_the_cache_where_round_robin_splits(model_dir: Path) -> None:
    prefix_tokens = 64 * PREFIX_BLOCKS
    hits, queries, per_worker = _run(model_dir, "prefix")
    # Every request after the first of its group lands where its prefix is cached.
    assert hits == 6 * prefix_tokens, (hits, queries)
    # ...and the cold first requests of the two groups still spread over both workers.
    assert sorted(per_worker) == [4, 4]
    rr_hits, rr_queries, rr_per_worker = _run(model_dir, "round_robin")
    assert rr_per_worker == [4, 4]
    # Round robin alternates workers, so half of the repeats miss their prefix.
    assert rr_hits == 4 * prefix_tokens < hits
    assert hits / queries > rr_hits / rr_queries
