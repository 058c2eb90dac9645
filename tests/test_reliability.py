"""Reliability pieces without processes: migration in Router.generate over fake decode stubs,
fault switch parsing, the worker gate, ejection backoff, compatibility pairing, restart ports."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest

from moeserve.api import common_pb2, worker_pb2
from moeserve.common.errors import ConfigError, ResourceExhaustedError, UnavailableError
from moeserve.common.kv_compat import compat_fingerprint
from moeserve.common.metrics import render
from moeserve.common.sampling import SamplingParams
from moeserve.deploy.supervisor import fixed_port_args
from moeserve.router.metrics import RouterMetrics
from moeserve.router.prefix_index import PrefixIndex
from moeserve.router.rpc import MigrationLimitError
from moeserve.router.serving import Router
from moeserve.router.settings import RouterSettings
from moeserve.router.workers import WorkerPool
from moeserve.worker.faults import FaultPlan, parse_faults
from moeserve.worker.gate import WorkerGate


def _next_token(seq: list[int]) -> int:
    """A deterministic 'model': the next token depends on the whole sequence so far."""
    return (sum(seq) * 31 + len(seq)) % 500


def _uninterrupted(prompt: list[int], n: int) -> list[int]:
    seq = list(prompt)
    for _ in range(n):
        seq.append(_next_token(seq))
    return seq[len(prompt):]


class _Unavailable(grpc.RpcError):
    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.UNAVAILABLE

    def details(self) -> str:
        return "connection reset"

    def trailing_metadata(self):
        return ()


class _Call:
    def __init__(self, gen):
        self._gen = gen

    def __aiter__(self):
        return self._gen

    def cancel(self) -> bool:
        return True

    def done(self) -> bool:
        return False


class _FakeDecode:
    """Streams one token per message; ``fail_after`` / ``stall_after`` messages, then breaks."""

    def __init__(self, fail_after: int | None = None, stall_after: int | None = None):
        self.fail_after, self.stall_after = fail_after, stall_after
        self.calls: list[worker_pb2.WorkerGenerateRequest] = []

    def Generate(self, req, timeout=None):  # noqa: N802 (gRPC method name)
        self.calls.append(req)

        async def gen():
            seq = list(req.prompt_token_ids)
            for i in range(req.sampling.max_tokens):
                if self.fail_after is not None and i == self.fail_after:
                    raise _Unavailable()
                if self.stall_after is not None and i == self.stall_after:
                    await asyncio.sleep(3600)
                seq.append(_next_token(seq))
                last = i == req.sampling.max_tokens - 1
                yield worker_pb2.WorkerGenerateResponse(
                    token_ids=[seq[-1]], finished=last, finish_reason="length" if last else ""
                )

        return _Call(gen())

    async def Abort(self, req, timeout=None):  # noqa: N802
        return worker_pb2.AbortResponse()


def _router(stubs: list[_FakeDecode], **settings) -> tuple[Router, WorkerPool, RouterMetrics]:
    metrics = RouterMetrics()
    addrs = [f"127.0.0.1:{9000 + i}" for i in range(len(stubs))]
    pool = WorkerPool([], addrs, PrefixIndex(), metrics)
    for addr, stub in zip(addrs, stubs, strict=True):
        client = pool.clients[addr]
        client.stub, client.healthy = stub, True
    s = RouterSettings(policy="round_robin", no_worker_wait_s=0.2, **settings)
    return Router(pool, metrics, s, "m", 4), pool, metrics


async def _collect(router: Router, prompt: list[int], n: int) -> list[int]:
    out: list[int] = []
    async for chunk in router.generate("r1", prompt, SamplingParams(max_tokens=n, temperature=0)):
        out.extend(chunk.token_ids)
    return out


def test_mid_stream_failure_migrates_without_missing_or_repeated_tokens() -> None:
    prompt = [5, 6, 7, 8, 9]

    async def go():
        broken, good = _FakeDecode(fail_after=3), _FakeDecode()
        router, pool, metrics = _router([good, broken])  # round robin starts at index 1
        got = await _collect(router, prompt, 12)
        return got, broken, good, pool, metrics

    got, broken, good, pool, metrics = asyncio.run(go())
    assert got == _uninterrupted(prompt, 12)
    resumed = good.calls[-1]
    assert list(resumed.prompt_token_ids) == prompt + got[:3]
    assert resumed.sampling.max_tokens == 9
    # Workers see the router's own id for the request (never the client's), per attempt.
    first_id = broken.calls[0].request_id
    assert first_id != "r1" and resumed.request_id == f"{first_id}.m1"
    text = render(metrics.registry)[0].decode()
    assert 'moeserve:router_migrations_total{when="mid_stream"} 1.0' in text
    assert pool.clients["127.0.0.1:9001"].ejections == 1 and len(broken.calls) == 1


def test_stalled_stream_migrates_after_stall_timeout() -> None:
    prompt = [1, 2, 3]

    async def go():
        router, _, metrics = _router([_FakeDecode(), _FakeDecode(stall_after=2)],
                                     stall_timeout_s=0.2)  # fmt: skip
        return await _collect(router, prompt, 6), metrics

    got, metrics = asyncio.run(go())
    assert got == _uninterrupted(prompt, 6)
    assert 'phase_timeouts_total{phase="stream_stall"} 1.0' in render(metrics.registry)[0].decode()


def test_migration_limit_ends_with_a_retryable_error() -> None:
    async def go():
        stubs = [_FakeDecode(fail_after=1), _FakeDecode(fail_after=1)]
        router, pool, _ = _router(stubs, max_migrations=2)
        pool.eject_base_s = 0.0  # ejection without backoff: both workers stay routable
        return await _collect(router, [1, 2], 20)

    with pytest.raises(MigrationLimitError) as info:
        asyncio.run(go())
    assert info.value.http_status == 503 and "migration limit 2" in str(info.value)


def test_parse_faults_and_named_errors() -> None:
    assert parse_faults("") == FaultPlan() and not FaultPlan().active
    plan = parse_faults("drop_stream_after=5, stall_prefill_s=1.5,fail_transfer")
    assert plan == FaultPlan(drop_stream_after=5, stall_prefill_s=1.5, fail_transfer=True)
    with pytest.raises(ConfigError, match="unknown fault 'explode'"):
        parse_faults("explode=1")
    with pytest.raises(ConfigError, match="'drop_stream_after' needs a int"):
        parse_faults("drop_stream_after=soon")


def test_worker_gate_bounds_and_drain() -> None:
    async def go() -> None:
        gate = WorkerGate(max_queued=1)
        with gate.admit("generate"):
            with pytest.raises(ResourceExhaustedError):
                with gate.admit("generate"):
                    pass
            gate.start_drain()
            task = asyncio.ensure_future(gate.drain(5.0))
            await asyncio.sleep(0.05)
            assert not task.done()
        assert await task
        with pytest.raises(UnavailableError, match="draining"):
            with gate.admit("prefill"):
                pass

    asyncio.run(go())


def test_ejection_backoff_doubles_and_incompatible_pairs_are_named() -> None:
    async def go() -> None:
        pool = WorkerPool(["p:1"], ["d:1"], PrefixIndex(), RouterMetrics(), eject_base_s=1.0,
                          eject_max_s=3.0)  # fmt: skip
        d, p = pool.clients["d:1"], pool.clients["p:1"]
        d.healthy = p.healthy = True
        for want in (1.0, 2.0, 3.0):  # doubles per fault, capped at eject_max_s
            pool.report_failure(d, "timeout")
            pool.report_failure(d, "timeout")  # the same fault: counts once
            assert not d.available()
            assert d.ejected_until - time.monotonic() == pytest.approx(want, abs=0.2)
            d.ejection.until = 0.0  # the ejection is over; the next failure is a new fault
        assert d.ejection.consecutive == 3 and d.ejections == 3
        pool.report_success(d)
        assert d.ejection.consecutive == 0
        fp = {"model": "m", "block_size": 64, "kv_dtype": "float32"}
        d.info = common_pb2.HealthResponse(compat_fingerprint=compat_fingerprint(fp))
        p.info = common_pb2.HealthResponse(
            compat_fingerprint=compat_fingerprint({**fp, "block_size": 32})
        )
        assert not pool.compatible(p, d)
        assert pool.incompatible[("p:1", "d:1")] == "block_size: ours=64 theirs=32"

    asyncio.run(go())


def test_restart_keeps_the_ports_the_child_got() -> None:
    args = ["worker", "--role", "decode", "--port", "0", "--metrics-port", "0", "--x", "0"]
    got = fixed_port_args(args, {"--port": "4100", "--metrics-port": "4101"})
    assert got == ["worker", "--role", "decode", "--port", "4100", "--metrics-port", "4101",
                   "--x", "0"]  # fmt: skip


def test_operator_grace_periods_match_the_drain_defaults() -> None:
    import argparse

    from moeserve.operator.build_router import ROUTER_DRAIN_GRACE_S
    from moeserve.operator.build_workers import PRESTOP_SLEEP_S, WORKER_DRAIN_GRACE_S
    from moeserve.worker.cli import add_worker_parser

    worker = add_worker_parser(argparse.ArgumentParser().add_subparsers())
    assert worker.get_default("drain_grace_s") == WORKER_DRAIN_GRACE_S
    assert RouterSettings().drain_grace_s == ROUTER_DRAIN_GRACE_S
    assert PRESTOP_SLEEP_S < WORKER_DRAIN_GRACE_S


def test_request_deadline_is_a_deadline_error_never_a_worker_ejection() -> None:
    """On uvloop the loop's millisecond clock fires a timer a hair before time.monotonic()
    reaches it; a request's own timeout must still end as DeadlineExceeded (504), not read as
    a stalled worker (ejection and migration: the bug `moeserve up` showed under uvloop)."""
    from moeserve.common import aio
    from moeserve.router.serving import DeadlineExceededError

    async def go():
        stubs = [_FakeDecode(stall_after=1), _FakeDecode(stall_after=1)]
        router, pool, _ = _router(stubs)
        outcomes = []
        for i in range(20):
            try:
                async for _ in router.generate(f"r{i}", [1, 2, 3], SamplingParams(max_tokens=8),
                                               timeout_s=0.02 + 0.001 * i):  # fmt: skip
                    pass
                outcomes.append("finished")
            except DeadlineExceededError:
                outcomes.append("deadline")
        return outcomes, [c.ejections for c in pool.clients.values()]

    outcomes, ejections = aio.run(go())
    assert outcomes == ["deadline"] * 20
    assert ejections == [0, 0]
