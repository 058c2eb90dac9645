"""Admission and drain for one worker: a bounded number of requests, and none after SIGTERM.

Every Prefill / Generate passes the gate. Past ``max_queued`` requests held (running, waiting or
streaming) new ones get RESOURCE_EXHAUSTED, so a flood queues at the router's bound rather than
growing this process. After SIGTERM (``start_drain``) new ones get UNAVAILABLE, the worker reports
NOT_SERVING and ``draining`` in its load stream (routers stop sending at once), and ``drain``
waits until what it holds has finished, or the grace period ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterator

from moeserve.common.errors import ResourceExhaustedError, UnavailableError

__all__ = ["WorkerGate"]

logger = logging.getLogger(__name__)


class WorkerGate:
    def __init__(self, max_queued: int):
        if max_queued < 1:
            raise ValueError(f"max_queued must be >= 1, got {max_queued}")
        self.max_queued = max_queued
        self.active = 0
        self.draining = False
        self._idle = asyncio.Event()
        self._idle.set()

    @contextlib.contextmanager
    def admit(self, what: str) -> Iterator[None]:
        """Hold one slot for the body of the ``with``; raises when the worker takes no more."""
        if self.draining:
            raise UnavailableError(f"worker is draining; {what} refused, retry elsewhere")
        if self.active >= self.max_queued:
            raise ResourceExhaustedError(
                f"worker holds {self.active} requests (--max-queued {self.max_queued}); "
                f"{what} refused, retry later"
            )
        self.active += 1
        self._idle.clear()
        try:
            yield
        finally:
            self.active -= 1
            if self.active == 0:
                self._idle.set()

    def start_drain(self) -> None:
        if not self.draining:
            # A requested stop is routine: INFO, so a clean Ctrl-C prints nothing at WARNING.
            logger.info("draining: no new requests; finishing %d held", self.active)
        self.draining = True

    async def drain(self, grace_s: float, pending: Callable[[], int] = lambda: 0) -> bool:
        """Wait for held requests (and ``pending()`` other holdings, e.g. KV leases) to end.

        True when everything finished inside ``grace_s``.
        """
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline:
            if self.active == 0 and pending() == 0:
                return True
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._idle.wait(), min(0.05, deadline - time.monotonic()))
            if self.active == 0 and pending() > 0:
                await asyncio.sleep(0.05)
        logger.warning("drain grace of %.1f s over with %d requests held", grace_s, self.active)
        return self.active == 0 and pending() == 0
