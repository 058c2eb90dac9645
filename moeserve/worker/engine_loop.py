"""Drives an LLMEngine in its own thread beside an asyncio server.

The engine is not thread-safe, so exactly one thread touches it: this loop. The event loop hands
work in as callables (``call``) and receives each request's outputs on an ``asyncio.Queue``, in
engine order. Stepping never blocks the event loop, and a slow step never blocks an RPC.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

from moeserve.common.errors import InvalidRequestError, UnavailableError
from moeserve.worker.engine import EngineCoreOutput, LLMEngine

__all__ = ["EngineLoop", "EngineDied"]

logger = logging.getLogger(__name__)
T = TypeVar("T")

# How long a thread may hold the GIL while another waits for it. The engine thread waits on the
# GPU with the GIL released and needs it back the moment a step ends; the event loop streaming
# hundreds of tokens a step holds it meanwhile, for up to Python's default 5 ms. Measured with
# benchmarks/stream_overhead.py (2-core CPU; 256 streams, a 13.7 ms step of which the engine's
# own Python takes 3 ms): steps stretched to 1.18-1.24x at 5 ms, 1.07-1.10x at 0.5 ms; 64
# streams at 10.5 ms: 1.03x either way.
ENGINE_GIL_SWITCH_INTERVAL_S = 5e-4


class EngineDied(UnavailableError, RuntimeError):
    """The engine raised inside step(); every open stream receives this and ends (UNAVAILABLE:
    the router retries the request elsewhere)."""


class EngineLoop:
    """``engine`` stepped in a daemon thread.

    ``on_tick(engine)`` runs in the engine thread every ``tick_s`` (KV events, load, NIXL
    notifications, lease sweeps): everything that must touch the engine but is not a request.
    ``on_step(seconds, prompt_tokens, gap)`` runs after every step with its wall time, the
    prompt tokens it computed (0: a pure decode step) and the time since the previous step
    ended if the loop stayed busy in between (None after an idle wait): what the thread spent
    between two steps (commands, outputs, housekeeping, waiting for the GIL), for the step
    metrics. (No extra ``has_unfinished_requests``: with expert parallelism it is a collective.)
    """

    def __init__(
        self,
        engine: LLMEngine,
        loop: asyncio.AbstractEventLoop,
        on_tick: Callable[[LLMEngine], None] | None = None,
        tick_s: float = 0.02,
        idle_wait_s: float = 0.01,
        on_step: Callable[[float, int, float | None], None] | None = None,
    ):
        self.engine = engine
        self._loop = loop
        self._on_tick = on_tick
        self._on_step = on_step
        self._tick_s = tick_s
        self._idle_wait_s = idle_wait_s
        self._inbox: queue.SimpleQueue[tuple[Callable[[LLMEngine], Any], asyncio.Future | None]]
        self._inbox = queue.SimpleQueue()
        self._streams: dict[str, asyncio.Queue] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)
        self.error: BaseException | None = None

    def start(self) -> None:
        # Process-wide, and only ever lowered: a process that steps an engine beside its
        # event loop wants the engine thread to get the GIL back promptly.
        sys.setswitchinterval(min(sys.getswitchinterval(), ENGINE_GIL_SWITCH_INTERVAL_S))
        self._thread.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        self._stop.set()
        self._inbox.put((lambda e: None, None))  # wake the thread
        self._thread.join(timeout_s)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and self.error is None

    # -------------------------------------------------------------- event-loop side

    def open_stream(self, request_id: str) -> asyncio.Queue:
        """Queue that will receive the request's EngineCoreOutputs (or an EngineDied).

        An id already in flight is refused here, before the caller holds anything: the
        caller's cleanup (close_stream, abort) would otherwise hit the other request."""
        if request_id in self._streams:
            raise InvalidRequestError(f"request id {request_id!r} is already in flight here",
                                      param="request_id")  # fmt: skip
        q: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = q
        return q

    def close_stream(self, request_id: str) -> None:
        self._streams.pop(request_id, None)

    async def call(self, fn: Callable[[LLMEngine], T]) -> T:
        """Run ``fn(engine)`` in the engine thread and return its result (or raise its error)."""
        if not self.alive:
            raise EngineDied(f"engine loop is not running: {self.error!r}")
        fut = self._loop.create_future()
        self._inbox.put((fn, fut))
        return await fut

    def emit(self, outputs: list[EngineCoreOutput]) -> None:
        """From the engine thread: send outputs a command produced (remote KV ready, abort) to their
        streams, ordered before any later step's outputs."""
        if outputs:
            self._loop.call_soon_threadsafe(self._deliver, list(outputs))

    def _deliver(self, outputs: list[EngineCoreOutput]) -> None:
        for out in outputs:
            q = self._streams.get(out.request_id)
            if q is not None:
                q.put_nowait(out)

    def _fail_all(self, exc: BaseException) -> None:
        for q in self._streams.values():
            q.put_nowait(EngineDied(str(exc)))

    # -------------------------------------------------------------- engine thread

    def _resolve(self, fut: asyncio.Future, result: Any, exc: BaseException | None) -> None:
        def done() -> None:
            if fut.cancelled():
                return
            if exc is not None:
                fut.set_exception(exc)
            else:
                fut.set_result(result)

        self._loop.call_soon_threadsafe(done)

    def _run_command(self, item: tuple) -> None:
        fn, fut = item
        try:
            result = fn(self.engine)
        except Exception as e:  # the caller gets it; the engine stays usable
            if fut is not None:
                self._resolve(fut, None, e)
            return
        if fut is not None:
            self._resolve(fut, result, None)

    def _run(self) -> None:
        engine = self.engine
        next_tick = 0.0
        ended: float | None = None  # when the last step ended (None: idle since)
        while not self._stop.is_set():
            try:
                busy = engine.has_unfinished_requests()
                if not busy:
                    ended = None  # what follows is idle time, not a gap between steps
                try:
                    # Idle: sleep until work arrives; busy: only take what is already queued.
                    if busy:
                        item = self._inbox.get_nowait()
                    else:
                        item = self._inbox.get(timeout=self._idle_wait_s)
                except queue.Empty:
                    item = None
                while item is not None:
                    self._run_command(item)
                    try:
                        item = self._inbox.get_nowait()
                    except queue.Empty:
                        item = None
                if engine.has_unfinished_requests():
                    prompt_before, started = engine.prompt_tokens_computed, time.perf_counter()
                    outputs = engine.step()
                    done = time.perf_counter()
                    if self._on_step is not None:
                        self._on_step(done - started, engine.prompt_tokens_computed - prompt_before,
                                      None if ended is None else started - ended)
                    ended = done
                    if outputs:
                        self._loop.call_soon_threadsafe(self._deliver, outputs)
                now = time.monotonic()
                if self._on_tick is not None and now >= next_tick:
                    next_tick = now + self._tick_s
                    self._on_tick(engine)
            except Exception as e:
                if self._loop.is_closed():
                    # The server is gone without stopping this thread (its stop() timed out
                    # on a long step) and the call into its loop raised: nobody is left to
                    # answer, and failing "every open request" through it would raise again.
                    logger.info("event loop closed; engine thread stops")
                    return
                logger.exception("engine loop failed; failing every open request")
                self.error = e
                self._loop.call_soon_threadsafe(self._fail_all, e)
                return
