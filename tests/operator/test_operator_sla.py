"""SLA autoscaling against the API emulator with the real kopf operator, load from a fake
metrics source: sizes follow load, scale to zero after idle, wake on held router requests."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

import pytest
import yaml

from moeserve.common.spec import MoEDeployment
from moeserve.operator.planner import LoadSample

REPO = Path(__file__).resolve().parents[2]
API = "moeserve.io/v1alpha1"
pytestmark = [pytest.mark.timeout(150), pytest.mark.slow]


class FakeMetrics:
    """What Prometheus would answer, set by the test."""

    def __init__(self) -> None:
        self.load = LoadSample()
        self._lock = threading.Lock()

    def set(self, load: LoadSample) -> None:
        with self._lock:
            self.load = load

    def sample(self, dep: MoEDeployment) -> LoadSample:
        with self._lock:
            return self.load


def sts_names(cluster: Any) -> set[str]:
    return {o["metadata"]["name"] for o in cluster.objects("apps/v1", "StatefulSet")}


def replicas(cluster: Any, role: str) -> int | None:
    pool = cluster.get(API, "MoEWorkerPool", f"tiny-{role}")
    return None if pool is None else pool["spec"]["replicas"]


def test_sla_sizes_scale_to_zero_and_wake(cluster_factory: Any) -> None:
    metrics = FakeMetrics()
    # Per group: 1000 prompt tokens/s, 100 generated tokens/s (see the spec below).
    metrics.set(LoadSample(prefill_tokens_per_s=1500, decode_tokens_per_s=250))

    async def scenario() -> None:
        async with cluster_factory(metrics_source=metrics, autoscale_seconds=0.3) as cluster:
            body = yaml.safe_load((REPO / "examples/tiny-cpu.yaml").read_text())
            body["spec"]["autoscaling"] = {
                "mode": "sla", "ttftSeconds": 2, "itlSeconds": 0.2, "intervalSeconds": 1,
                "prefillTokensPerSecondPerGroup": 1000, "decodeTokensPerSecondPerGroup": 100,
                "minPrefill": 1, "maxPrefill": 4, "minDecode": 1, "maxDecode": 6,
                "scaleDownDelaySeconds": 0,
                "scaleToZero": {"enabled": True, "idleSeconds": 2}}
            await cluster.create(body)
            # Load needs 2 prefill groups (1500 / (1000 * 0.9)) and 3 decode (250 / (100 * 0.9)).
            await cluster.wait_for("sized for load", lambda: (replicas(cluster, "prefill"),
                                   replicas(cluster, "decode")) == (2, 3) or None, timeout=30)
            await cluster.wait_for("groups follow", lambda: {
                "tiny-prefill-1", "tiny-decode-2"} <= sts_names(cluster))
            events = await cluster.wait_for("Scaled event", lambda: [
                e for e in cluster.objects("v1", "Event") if e.get("reason") == "Scaled"])
            assert "decode" in events[0]["message"]

            # No load for idleSeconds: both pools to zero, no worker groups left.
            metrics.set(LoadSample())
            await cluster.wait_for("scaled to zero", lambda: (replicas(cluster, "prefill"),
                                   replicas(cluster, "decode")) == (0, 0), timeout=30)
            await cluster.wait_for("groups gone", lambda: not sts_names(cluster), timeout=30)

            # The router holds a request: the pools wake, decode with a prefill group.
            metrics.set(LoadSample(held_requests=1))
            await cluster.wait_for("woken", lambda: (replicas(cluster, "prefill"),
                                   replicas(cluster, "decode")) == (1, 1), timeout=30)
            await cluster.wait_for("groups back", lambda: sts_names(cluster) == {
                "tiny-prefill-0", "tiny-decode-0"}, timeout=30)

    asyncio.run(scenario())
