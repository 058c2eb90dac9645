"""Running a long-lived asyncio service: on uvloop when it is installed.

The router and the workers spend most of their CPU in the event loop (gRPC and HTTP framing,
one task switch per streamed message); uvloop's loop roughly halves that per-message cost
(benchmarks/router_overhead.py). It is optional so that platforms without it still run.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

__all__ = ["loop_factory", "run"]

T = TypeVar("T")


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's loop constructor, or None for asyncio's default loop."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def run(main: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run`` on the fastest loop available."""
    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        return runner.run(main)
