"""How a worker process stops: SIGTERM/SIGINT start a drain, a later one is ignored during
teardown, and a rank of the EP group can stop the whole group (split out of worker/server.py)."""

from __future__ import annotations

import asyncio
import contextlib
import signal

from moeserve.worker.parallel.group import ParallelContext

__all__ = ["ignore_stop_signals", "on_stop_signals", "wait_group_stopped"]


def ignore_stop_signals() -> None:
    """Stopped on a signal: one more (Ctrl-C then `moeserve up`'s SIGTERM, or the EP launcher
    forwarding one) must not kill the interpreter's teardown, which restores the default
    handlers early and then takes a while (torch), turning a clean exit into -15."""
    with contextlib.suppress(ValueError):  # not the main thread (Ray)
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, signal.SIG_IGN)


def on_stop_signals(stop: asyncio.Event) -> None:
    """SIGTERM (Kubernetes, `moeserve up`) and SIGINT (Ctrl-C reaches every process of the
    terminal's group) both drain, however often they come. signal.signal, not the loop's
    add_signal_handler: under uvloop, asyncio.Runner's own SIGINT handler (cancel the main task,
    which would cut the drain and server.stop() short with a traceback) stays in place beside
    it. Not possible off the main thread: an embedding host such as Ray handles signals."""
    loop = asyncio.get_running_loop()

    def on_signal(signum: int, frame: object) -> None:
        with contextlib.suppress(RuntimeError):  # one more after the loop closed: exiting anyway
            loop.call_soon_threadsafe(stop.set)

    with contextlib.suppress(ValueError):
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, on_signal)


async def wait_group_stopped(group: ParallelContext) -> None:
    while not group.stopped.is_set():
        await asyncio.sleep(0.2)
