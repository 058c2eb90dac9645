"""The router's hold at zero decode workers: a request waits while a real worker starts and
joins (as discovery would add it once the operator woke the pool) and then completes; the
held-requests gauge the operator's autoscaler wakes on counts it meanwhile; a hold that runs
out ends with a clear 503, not a hang."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from moeserve.common.errors import UnavailableError
from moeserve.common.sampling import SamplingParams
from moeserve.deploy.local import ClusterSpec, LocalCluster
from moeserve.router.metrics import RouterMetrics
from moeserve.router.prefix_index import PrefixIndex
from moeserve.router.serving import Router
from moeserve.router.settings import RouterSettings
from moeserve.router.wake import METRIC_REQUESTS_HELD
from moeserve.router.workers import WorkerPool
from tests.reliability_helpers import prompt_ids, reference_tokens

PROMPT = prompt_ids(7, 24)
MAX_TOKENS = 8


def _router(hold_s: float) -> tuple[Router, WorkerPool, RouterMetrics]:
    metrics = RouterMetrics()
    pool = WorkerPool([], [], PrefixIndex(), metrics)  # scaled to zero: no worker known
    settings = RouterSettings(no_worker_wait_s=0.2, wake_hold_s=hold_s)
    return Router(pool, metrics, settings, "tiny", 4), pool, metrics


def _held(metrics: RouterMetrics) -> float:
    return metrics.registry.get_sample_value(METRIC_REQUESTS_HELD) or 0.0


@pytest.mark.timeout(30)
def test_hold_runs_out_with_a_clear_503() -> None:
    async def go() -> None:
        router, _, metrics = _router(hold_s=0.5)
        started = time.monotonic()
        with pytest.raises(UnavailableError, match="woke within 0.5 s.*scaled to zero"):
            async for _ in router.generate("r", PROMPT, SamplingParams(max_tokens=2)):
                pass
        assert 0.45 <= time.monotonic() - started < 5
        assert _held(metrics) == 0

    asyncio.run(go())


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_held_request_completes_when_a_real_decode_worker_wakes(tmp_path: Path) -> None:
    from moeserve.worker.checkpoint import ensure_tiny_checkpoint

    model = ensure_tiny_checkpoint(tmp_path / "ckpt")
    want = reference_tokens(str(model), [PROMPT], MAX_TOKENS)[0]

    async def go() -> None:
        router, pool, metrics = _router(hold_s=240)
        params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0)

        async def request() -> list[int]:
            out: list[int] = []
            async for chunk in router.generate("held", PROMPT, params):
                out.extend(chunk.token_ids)
            return out

        task = asyncio.create_task(request())
        while _held(metrics) < 1:  # the autoscaler's wake signal
            await asyncio.sleep(0.05)
        assert not task.done()
        # The operator scales the decode pool up; the worker starts (weights, warm-up) and
        # discovery adds it to the router's pool.
        # The router here is built in-process without worker-plane tokens: what is tested is
        # the hold and the wake, so the worker runs with the development opt-out.
        spec = ClusterSpec(model=str(model), prefill=0, decode=1, port=0, num_kv_blocks=64,
                           insecure_worker_plane=True)
        cluster = LocalCluster(spec, log=None)
        await asyncio.to_thread(cluster.start)
        try:
            decode = next(ch for ch in cluster.children if ch.name.startswith("decode"))
            pool.set_workers({decode.address: "decode"})
            got = await asyncio.wait_for(task, 120)
            assert got == want
            assert _held(metrics) == 0
        finally:
            await pool.close()
            await asyncio.to_thread(cluster.stop)

    asyncio.run(go())
