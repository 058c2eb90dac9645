"""Giving freed heap memory back to the OS after a large, short-lived allocation.

glibc's malloc keeps what a thread frees in that thread's arena and returns it to the OS only
from the top of the heap; the Rust tokenizer's allocations for a multi-megabyte prompt (ids,
offsets, a string per token) leave the arenas fragmented, so the router's RSS climbed by tens of
MiB per huge prompt and never came down (issue 22's soak: 460 -> 544 MiB in 90 s of attacks).
``malloc_trim(0)`` hands the free pages back; it walks the heap, so it runs only after work
that was large (milliseconds, against the tokenizing itself).

glibc also raises its mmap threshold (up to 32 MiB, and the trim threshold to twice that) each
time it frees a large mmapped block: after one huge prompt, the next multi-MiB buffers (request
bodies, id lists) come from the heap and up to 64 MiB per arena stay resident after they are
freed. ``pin_mmap_threshold`` fixes the threshold, which turns that adjustment off: blocks from
1 MiB up are mapped and unmapped on their own.

Blocks below the threshold still come from the heap: a request body arrives in chunks of tens of
KiB, so 20 partial 1 MiB bodies held open until their timeout are 20 MiB of heap chunks, and
whatever the router allocated meanwhile sits above them; freed, they stayed resident until
that later allocation happened to go (issue 22's soak: the router's quiet RSS moved 105-136 MiB
between windows; in isolation four such rounds kept +79 MiB). ``DeferredTrim`` runs a trim
shortly after such a burst of buffering has drained.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import functools
import logging
import time
from collections.abc import Callable

__all__ = ["TRIM_ABOVE_CHARS", "DeferredTrim", "pin_mmap_threshold", "trim_heap"]

log = logging.getLogger(__name__)

# Prompts at least this long (characters) are followed by a trim.
TRIM_ABOVE_CHARS = 1 << 20
_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number


@functools.cache
def _libc_function(fn: str) -> Callable[..., int] | None:
    name = ctypes.util.find_library("c")
    try:
        return getattr(ctypes.CDLL(name), fn) if name else None
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to tune
        return None


def pin_mmap_threshold(nbytes: int = 1 << 20) -> bool:
    """Serve allocations of ``nbytes`` and more with their own mappings, for the whole process
    (one call at start); False where the C library has no mallopt."""
    mallopt = _libc_function("mallopt")
    return mallopt is not None and mallopt(_M_MMAP_THRESHOLD, nbytes) == 1


def trim_heap() -> bool:
    """Return free heap pages to the OS; False where the C library has no malloc_trim."""
    trim = _libc_function("malloc_trim")
    if trim is None:
        return False
    trim(0)
    return True


class DeferredTrim:
    """A heap trim ``delay_s`` after ``soon`` is called, one at a time.

    The delay gathers a burst (bodies opened together time out together) into one trim, lets
    the exceptions and frames still holding the buffers go first, and bounds the cost to one
    trim per ``delay_s``. Called on an event loop, the trim runs on its default executor (24 ms
    for 78 MiB of freed bodies in the router: too long to stall the loop); without a loop it
    runs at once."""

    def __init__(self, delay_s: float = 1.0, what: str = "buffers"):
        self.delay_s, self.what = delay_s, what
        self.trims = 0
        self._freed = 0  # bytes of ``what`` freed since the last trim, for the log line
        self._pending: asyncio.TimerHandle | asyncio.Future[None] | None = None

    def soon(self, freed_bytes: int) -> None:
        self._freed += freed_bytes
        if self._pending is not None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self.trim()
            return
        self._pending = loop.call_later(self.delay_s, self._on_executor, loop)

    def _on_executor(self, loop: asyncio.AbstractEventLoop) -> None:
        freed, self._freed = self._freed, 0  # read here: ``soon`` runs on the loop's thread
        self._pending = loop.run_in_executor(None, self.trim, freed)
        self._pending.add_done_callback(self._done)

    def _done(self, _: asyncio.Future[None]) -> None:
        self._pending = None

    def trim(self, freed: int | None = None) -> None:
        """Trim now; ``freed`` (default: what ``soon`` counted) only goes into the log line."""
        if freed is None:
            freed, self._freed = self._freed, 0
        start = time.perf_counter()
        if not trim_heap():
            return
        self.trims += 1
        if self.trims == 1:  # once: the operator learns it happens and what it costs
            log.info("returned freed memory to the OS after %.1f MiB of %s were freed "
                     "(malloc_trim, %.1f ms; logged once)", freed / (1 << 20), self.what,
                     (time.perf_counter() - start) * 1e3)  # fmt: skip
