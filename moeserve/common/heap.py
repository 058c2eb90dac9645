"""Giving freed heap memory back to the OS after a large, short-lived allocation.

glibc's malloc keeps what a thread frees in that thread's arena and returns it to the OS only
from the top of the heap; the Rust tokenizer's allocations for a multi-megabyte prompt (ids,
offsets, a string per token) leave the arenas fragmented, so the router's RSS climbed by tens of
MiB per huge prompt and never came down (issue 22's soak: 460 -> 544 MiB in 90 s of attacks).
``malloc_trim(0)`` hands the free pages back; it walks the heap, so it runs only after work
that was large (milliseconds, against the tokenizing itself).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from collections.abc import Callable

__all__ = ["TRIM_ABOVE_CHARS", "trim_heap"]

# Prompts at least this long (characters) are followed by a trim.
TRIM_ABOVE_CHARS = 1 << 20


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to trim
        return None


def trim_heap() -> bool:
    """Return free heap pages to the OS; False where the C library has no malloc_trim."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True
