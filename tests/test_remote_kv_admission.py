"""Requests whose prompt KV comes from a prefill worker obey the scheduler's limits like any.

Two bugs found under disaggregated load: KV arriving for requests while the batch was full
pushed the batch past ``max_num_seqs`` (the runner's per-step buffers are sized by it: a decode
worker with ``--max-num-seqs 2`` died on a shape mismatch), and an abort during the KV READ
freed the blocks the READ was still writing, after which the stream ended with
"no KV reservation" (INVALID_ARGUMENT) instead of "abort".
"""

from __future__ import annotations

import asyncio
import time

import pytest

from moeserve.api import worker_pb2
from moeserve.common.sampling import SamplingParams
from moeserve.worker.config import EngineConfig
from moeserve.worker.engine import LLMEngine
from moeserve.worker.engine_loop import EngineLoop
from moeserve.worker.kv_handoff.agent import TransferHandle, TransferResult, TransferState
from moeserve.worker.kv_handoff.decode import KVPuller
from moeserve.worker.metrics import WorkerMetrics
from tests.test_engine_disagg import PROMPT
from tests.test_scheduler import (
    PROMPTS,
    FakeModel,
    alone,
    check_scheduled_kv_clean,
    drive,
    make_req,
    make_sched,
    remote_kv_ready,
)


def test_remote_kv_requests_respect_max_num_seqs():
    sched, model = make_sched(max_num_seqs=2), FakeModel()
    for rid in ("a", "c"):
        sched.add_request(make_req(rid, PROMPTS[rid]))
    first = sched.schedule()  # a and c run: the batch is full
    sched.update_from_output(first, model(sched, first))
    remote = {rid: make_req(rid, PROMPTS[rid]) for rid in ("b", "d")}
    tokens = {}
    for rid, req in remote.items():
        assert sched.add_remote_kv_request(req) is not None
        remote_kv_ready(model, req)
        ref = alone(PROMPTS[rid])
        out = sched.finish_remote_kv(rid, ref[0])
        tokens[rid] = list(out.new_token_ids)
    assert sched.num_waiting == 2  # their KV is here, but the batch is full: they wait

    got, _, steps = drive(sched, [], model=model)  # asserts len(scheduled) <= max_num_seqs
    assert max(len(s.scheduled) for s in steps) == 2
    for rid in ("b", "d"):
        assert tokens[rid] + got[rid] == alone(PROMPTS[rid])
        # Admitted from the queue as a decode: its prompt is never computed here.
        assert all(s.num_scheduled_tokens.get(rid, 1) == 1 for s in steps)
    check_scheduled_kv_clean(sched)


def test_abort_during_read_keeps_blocks_until_the_read_is_over():
    sched = make_sched(num_blocks=8)  # 7 usable blocks; PROMPTS["b"] needs 5
    r = make_req("r", PROMPTS["b"])
    got = sched.add_remote_kv_request(r)
    (out,) = sched.abort_requests(["r"])
    assert (out.request_id, out.finished, out.finish_reason) == ("r", True, "abort")
    assert not sched.has_unfinished_requests() and "r" not in sched.requests
    # The READ may still be writing: no block of r's may go to another request yet.
    assert all(sched.kv.pool.ref_count(b) == 1 for b in got.block_ids)
    assert sched.add_remote_kv_request(make_req("q", PROMPTS["b"])) is None
    assert sched.finish_remote_kv("r", 5) is None  # the READ ended: now they go back
    assert sched.kv.usage == 0.0 and r.block_ids == []
    assert sched.abort_requests(["r"]) == []
    assert "r" in sched.schedule().finished_req_ids


# ------------------------------------------------ the decode worker's KVPuller around the engine


class _FakeAgent:
    """A READ that stays pending until the test says it is done."""

    name = "decode-agent"

    def __init__(self) -> None:
        self.done = False
        self.finished: list[bool] = []

    def read_blocks(self, peer, remote, local, notif):
        return TransferHandle(peer, len(local), 64 * len(local), time.monotonic())

    def poll(self, xfer):
        return TransferState.DONE if self.done else TransferState.PENDING

    def finish(self, xfer, timed_out: bool = False) -> TransferResult:
        self.finished.append(timed_out)
        return TransferResult(ok=not timed_out, num_bytes=64, seconds=0.0)


async def _start_pull(tiny_v3):
    """An engine in its loop, a pull under way with its READ pending, and the request's stream."""
    engine = LLMEngine(EngineConfig(model=str(tiny_v3), block_size=4, num_kv_blocks=64))
    loop = EngineLoop(engine, asyncio.get_running_loop())
    loop.start()
    agent = _FakeAgent()
    puller = KVPuller(agent, WorkerMetrics(), timeout_s=30.0)  # type: ignore[arg-type]
    handle = worker_pb2.KVHandle(request_id="p", num_tokens=len(PROMPT), block_ids=range(64))

    async def claimed(h, fingerprint):
        return handle

    async def nothing(*args):
        return "peer"

    puller._claim_compatible, puller._ensure_peer = claimed, nothing
    puller._release_remote = nothing
    stream = loop.open_stream("r")
    params = SamplingParams(max_tokens=4, temperature=0)
    task = asyncio.create_task(puller.pull(loop, "r", PROMPT, params, handle, 7, "fp"))
    for _ in range(500):
        if await loop.call(lambda e: "r" in e.scheduler.waiting_for_remote_kv):
            break
        await asyncio.sleep(0.01)
    return loop, agent, task, stream


def _usage(loop: EngineLoop):
    return loop.call(lambda e: e.stats().kv_usage)


def test_abort_during_read_ends_the_stream_as_abort(tiny_v3):
    async def main() -> None:
        loop, agent, task, stream = await _start_pull(tiny_v3)
        try:
            # What WorkerServicer.Abort does while the READ is pending.
            await loop.call(lambda e: loop.emit(e.abort_request("r")))
            assert await _usage(loop) > 0  # the READ may still write: blocks held
            agent.done = True
            await asyncio.wait_for(task, 10)  # before: InvalidRequestError "no KV reservation"
            out = await asyncio.wait_for(stream.get(), 10)
            assert out.finished and out.finish_reason == "abort"
            assert await _usage(loop) == 0.0
        finally:
            loop.stop()

    asyncio.run(main())


def test_cancelled_read_is_stopped_before_its_blocks_go_back(tiny_v3):
    async def main() -> None:
        loop, agent, task, _ = await _start_pull(tiny_v3)
        try:
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert agent.finished == [True]  # the READ was stopped
            await loop.call(lambda e: e.abort_request("r"))  # the Generate stream's cleanup
            assert await _usage(loop) == 0.0
            assert not await loop.call(lambda e: e.has_unfinished_requests())
        finally:
            loop.stop()

    asyncio.run(main())
