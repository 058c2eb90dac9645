"""How long a decode stream may wait for its next message, and its end when the worker is
found gone.

Each wait is bounded (the first-token or stall timeout, within the request's deadline) and a
health probe that finds the worker gone ends it at once (the stream migrates instead of
waiting out the stall timeout). A fresh ``asyncio.timeout`` around every message cost the
router ~11 us of CPU per streamed token (a timer armed and cancelled each time, against ~90 us
for all of a token's work); here one timer per stream is armed when a wait starts later than
the timer's expiry, and re-armed only when it fires before the wait under way has run out, a
few times per timeout's length at most. Only the wait itself is ever cancelled: a cancel
landing while the stream hands its message on (Starlette's send) would end the response
silently.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import TypeVar

__all__ = ["StreamWatch"]

T = TypeVar("T")


class StreamWatch:
    """One stream's waits, on the running event loop; ``close()`` when the stream ends."""

    def __init__(self) -> None:
        self.lost: str | None = None  # why the worker is gone, once the probe said so
        self._loop = asyncio.get_running_loop()
        self._task: asyncio.Task | None = None
        self._until: float | None = None  # loop time the wait under way ends; None: not waiting
        self._timer: asyncio.TimerHandle | None = None
        self._cancelled = False  # this watch cancelled the waiting task
        self._cancelling = 0  # the task's own pending cancels when the wait began

    def worker_lost(self, reason: str) -> None:
        """The health probe's callback: a wait under way ends now."""
        self.lost = reason
        if self._until is not None:
            self._end_wait()

    async def next(self, stream: AsyncIterator[T], seconds: float) -> T:
        """``stream``'s next message; TimeoutError after ``seconds`` or once the worker is
        found lost (``lost`` says which)."""
        if self.lost is not None:
            raise TimeoutError
        task = self._task = asyncio.current_task()
        assert task is not None
        until = self._until = self._loop.time() + seconds
        if self._timer is None or self._timer.when() > until:
            if self._timer is not None:
                self._timer.cancel()
            self._timer = self._loop.call_at(until, self._on_timer)
        self._cancelling = task.cancelling()
        try:
            return await anext(stream)
        except asyncio.CancelledError:
            if self._cancelled:
                self._cancelled = False
                if task.uncancel() <= self._cancelling:
                    raise TimeoutError from None
            raise
        finally:
            self._until = None

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _on_timer(self) -> None:
        self._timer = None
        if self._until is None:  # between waits: the next one arms it again
            return
        if self._loop.time() < self._until:  # set by an earlier wait: this one runs on
            self._timer = self._loop.call_at(self._until, self._on_timer)
            return
        self._end_wait()

    def _end_wait(self) -> None:
        if not self._cancelled and self._task is not None:
            self._cancelled = True
            self._task.cancel()
