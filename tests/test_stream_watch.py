"""The router's per-stream wait bound (router/stream_watch.py): a decode stream's next message
within its timeout, at once when the worker is found gone, and never a cancel outside a wait
(one there would end an SSE response silently in Starlette's send)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest

from moeserve.router.stream_watch import StreamWatch


async def _paced(gaps: list[float]) -> AsyncIterator[int]:
    """A message after each gap, then silence."""
    for i, gap in enumerate(gaps):
        await asyncio.sleep(gap)
        yield i
    await asyncio.Event().wait()


def test_messages_in_time_never_time_out_however_long_the_stream() -> None:
    async def run() -> list[int]:
        watch, stream = StreamWatch(), _paced([0.03] * 20)  # 0.6 s of messages, 0.1 s bound
        try:
            return [await watch.next(stream, 0.1) for _ in range(20)]
        finally:
            watch.close()

    assert asyncio.run(run()) == list(range(20))


def test_a_silent_stream_times_out_after_its_own_wait_not_an_earlier_ones() -> None:
    async def run() -> float:
        watch, stream = StreamWatch(), _paced([0.15])
        await watch.next(stream, 0.2)  # arms the timer for 0.2 s; the message comes at 0.15
        start = time.perf_counter()
        with pytest.raises(TimeoutError):
            await watch.next(stream, 0.2)  # the first timer fires 0.05 s in: this wait runs on
        watch.close()
        return time.perf_counter() - start

    assert 0.18 <= asyncio.run(run()) < 1.0


def test_lost_worker_ends_the_wait_under_way_and_the_next_at_once() -> None:
    async def run() -> tuple[float, float]:
        watch, stream = StreamWatch(), _paced([])
        asyncio.get_running_loop().call_later(0.05, watch.worker_lost, "health probe failed")
        start = time.perf_counter()
        with pytest.raises(TimeoutError):
            await watch.next(stream, 30)
        first = time.perf_counter() - start
        start = time.perf_counter()
        with pytest.raises(TimeoutError):
            await watch.next(stream, 30)
        watch.close()
        assert watch.lost == "health probe failed"
        return first, time.perf_counter() - start

    first, second = asyncio.run(run())
    assert first < 5 and second < 5  # against a 30 s bound: ended, not waited out


def test_no_cancel_lands_between_waits() -> None:
    """The consumer spends longer than the bound handing each message on (a slow client):
    the timer that fires then must not cancel it."""

    async def run() -> list[int]:
        watch, stream = StreamWatch(), _paced([0.0] * 3)
        got = []
        for _ in range(3):
            got.append(await watch.next(stream, 0.05))
            await asyncio.sleep(0.12)  # past the bound, outside a wait
        watch.close()
        return got

    assert asyncio.run(run()) == [0, 1, 2]


def test_someone_elses_cancel_stays_a_cancel() -> None:
    async def run() -> None:
        watch, stream = StreamWatch(), _paced([])
        task = asyncio.ensure_future(watch.next(stream, 30))
        await asyncio.sleep(0.02)
        task.cancel()  # the client went away
        with pytest.raises(asyncio.CancelledError):
            await task
        watch.close()

    asyncio.run(run())


def test_timeout_and_a_cancel_at_once_is_a_cancel() -> None:
    async def run() -> None:
        watch, stream = StreamWatch(), _paced([])

        async def waiter() -> None:
            await watch.next(stream, 0.05)

        task = asyncio.ensure_future(waiter())
        await asyncio.sleep(0.01)
        watch.worker_lost("gone")  # this watch cancels...
        task.cancel()  # ...and so does the client, in the same loop turn
        with pytest.raises(asyncio.CancelledError):
            await task
        watch.close()

    asyncio.run(run())
