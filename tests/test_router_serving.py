"""Router admission: past max_inflight a request is refused (429 / RESOURCE_EXHAUSTED)."""

from __future__ import annotations

import asyncio

import pytest

from moeserve.common.errors import ResourceExhaustedError
from moeserve.common.metrics import render
from moeserve.common.sampling import SamplingParams
from moeserve.router.metrics import RouterMetrics
from moeserve.router.protocol import error_from_exception
from moeserve.router.serving import Router
from moeserve.router.settings import RouterSettings


def test_backpressure_refuses_beyond_max_inflight() -> None:
    metrics = RouterMetrics()
    router = Router(None, metrics, RouterSettings(max_inflight=0), "m", 4)  # type: ignore[arg-type]

    async def go() -> None:
        async for _ in router.generate("r", [1, 2, 3], SamplingParams()):
            pass

    with pytest.raises(ResourceExhaustedError) as info:
        asyncio.run(go())
    assert error_from_exception(info.value)[0] == 429
    assert router.inflight == 0
    text = render(metrics.registry)[0].decode()
    assert 'moeserve:router_requests_rejected_total{reason="max_inflight"} 1.0' in text


def test_round_robin_alternates_decode_workers_with_prefill_picks_in_between() -> None:
    from moeserve.router.prefix_index import PrefixIndex
    from moeserve.router.workers import WorkerPool

    async def picks() -> list[str]:
        metrics = RouterMetrics()
        pool = WorkerPool(["127.0.0.1:1", "127.0.0.1:2"], ["127.0.0.1:3", "127.0.0.1:4"],
                          PrefixIndex(), metrics)
        router = Router(pool, metrics, RouterSettings(policy="round_robin"), "m", 4)
        decoders = [c for c in pool.clients.values() if "decode" in c.roles]
        prefills = [c for c in pool.clients.values() if "prefill" in c.roles]
        picked = []
        for _ in range(4):  # each request picks its decode worker, then its prefill worker
            picked.append(router.pick(decoders, [], 0)[0].address)
            router.pick(prefills, [], 0)
        return picked

    assert sorted(asyncio.run(picks())) == ["127.0.0.1:3", "127.0.0.1:3", "127.0.0.1:4",
                                             "127.0.0.1:4"]
