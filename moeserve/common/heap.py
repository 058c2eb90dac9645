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
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from collections.abc import Callable

__all__ = ["TRIM_ABOVE_CHARS", "pin_mmap_threshold", "trim_heap"]

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
