"""The engine thread outliving its event loop (a server whose stop() gave up waiting on a long
step) ends quietly: no "engine loop failed" error, no exception escaping the thread."""

from __future__ import annotations

import asyncio
import logging
import threading

from moeserve.worker.engine_loop import EngineLoop


class _IdleEngine:
    def has_unfinished_requests(self) -> bool:
        return False


def test_engine_thread_stops_quietly_once_its_event_loop_is_closed(caplog, monkeypatch) -> None:
    escaped: list[BaseException] = []
    monkeypatch.setattr(threading, "excepthook", lambda args: escaped.append(args.exc_value))
    loop = asyncio.new_event_loop()
    ticks = threading.Event()

    def tick(engine) -> None:  # noqa: ANN001 - the server's tick: posts to the event loop
        ticks.set()
        loop.call_soon_threadsafe(lambda: None)

    engine_loop = EngineLoop(_IdleEngine(), loop, on_tick=tick, tick_s=0.001,
                             idle_wait_s=0.001)  # fmt: skip
    with caplog.at_level(logging.INFO, logger="moeserve.worker.engine_loop"):
        engine_loop.start()
        assert ticks.wait(5)
        loop.close()
        engine_loop._thread.join(5)
    assert not engine_loop._thread.is_alive()
    assert engine_loop.error is None and not escaped
    assert "engine loop failed" not in caplog.text
    assert "event loop closed" in caplog.text
