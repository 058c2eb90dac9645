"""The decode worker's wait for a KV READ: it notices the end of a transfer as it happens
(tens of microseconds at device speed), not at the event loop's next millisecond timer."""

from __future__ import annotations

import asyncio
import time

from moeserve.worker.kv_handoff import agent as agent_module
from moeserve.worker.kv_handoff import decode
from moeserve.worker.kv_handoff.agent import (
    POLL_SLEEP_S,
    YIELD_MAX_S,
    YIELD_MIN_S,
    KVTransferAgent,
    TransferHandle,
    TransferResult,
    TransferState,
    yield_budget_s,
)
from moeserve.worker.kv_handoff.decode import KVPuller
from moeserve.worker.metrics import WorkerMetrics


class FakeAgent:
    """A READ that ends once ``polls`` polls have seen it pending."""

    def __init__(self, polls: int) -> None:
        self.left = polls

    def poll(self, handle: TransferHandle) -> TransferState:
        self.left -= 1
        return TransferState.PENDING if self.left >= 0 else TransferState.DONE


def _sleeps(monkeypatch, polls: int, num_bytes: int, clock_step_s: float) -> list[float]:
    """The delays the wait asked the loop for, on a clock that advances per poll."""
    asked: list[float] = []
    now = [1000.0]

    async def sleep(delay: float) -> None:
        asked.append(delay)

    def monotonic() -> float:
        now[0] += clock_step_s
        return now[0]

    monkeypatch.setattr(decode.asyncio, "sleep", sleep)
    monkeypatch.setattr(decode.time, "monotonic", monotonic)
    puller = KVPuller(FakeAgent(polls), WorkerMetrics(), timeout_s=10.0)  # type: ignore[arg-type]
    handle = TransferHandle("peer", 8, num_bytes, time.time())
    assert asyncio.run(puller._wait(handle)) is True
    return asked


def test_a_transfer_at_device_speed_is_polled_without_sleeping(monkeypatch) -> None:
    # 30 MiB (a 1000-token V2-Lite prompt) ends after 200 polls 5 us apart (1 ms)
    asked = _sleeps(monkeypatch, polls=200, num_bytes=30 << 20, clock_step_s=5e-6)
    assert len(asked) == 200 and set(asked) == {0}


def test_a_slow_transfer_then_sleeps_a_millisecond_at_a_time(monkeypatch) -> None:
    asked = _sleeps(monkeypatch, polls=2000, num_bytes=1 << 20, clock_step_s=5e-6)
    yielded = asked.index(POLL_SLEEP_S)
    assert set(asked[:yielded]) == {0} and set(asked[yielded:]) == {POLL_SLEEP_S}
    # the yielding lasted the budget of 1 MiB, then no longer (one clock read a poll, 5 us)
    assert abs(yielded * 5e-6 - yield_budget_s(1 << 20)) < 20e-6


def test_the_yield_budget_grows_with_the_bytes_and_is_bounded() -> None:
    small, large, huge = yield_budget_s(1 << 20), yield_budget_s(64 << 20), yield_budget_s(1 << 34)
    assert YIELD_MIN_S < small < large < huge == YIELD_MAX_S


def test_the_blocking_wait_polls_by_the_same_rule(monkeypatch) -> None:
    # KVTransferAgent.wait (benchmarks, tools) spins within the budget, then sleeps 1 ms
    asked: list[float] = []
    now = [1000.0]

    def monotonic() -> float:
        now[0] += 5e-6
        return now[0]

    monkeypatch.setattr(agent_module.time, "monotonic", monotonic)
    monkeypatch.setattr(agent_module.time, "sleep", asked.append)
    fake = FakeAgent(polls=2000)
    agent = KVTransferAgent.__new__(KVTransferAgent)  # no NIXL: poll and finish are faked
    agent.poll = fake.poll  # type: ignore[method-assign]
    agent.finish = lambda h, timed_out=False: TransferResult(not timed_out, h.num_bytes, 0.0)  # type: ignore[method-assign]
    result = agent.wait(TransferHandle("peer", 1, 1 << 20, time.time()), timeout_s=10.0)
    assert result.ok
    yielded = asked.index(POLL_SLEEP_S)
    assert set(asked[:yielded]) == {0} and set(asked[yielded:]) == {POLL_SLEEP_S}
    assert abs(yielded * 5e-6 - yield_budget_s(1 << 20)) < 20e-6
