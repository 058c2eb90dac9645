"""What one client can make the router hold: buffered body bytes, slow connections, stop strings.

The connections' timers, with these limits' values, are in connection_timeouts.py.

- ``BodyBudget``: one budget of request-body bytes buffered across every request in flight.
  ``--max-body-bytes`` bounds one body; this bounds them all, so many partial bodies held open
  cannot grow the router's memory without limit. Past it a body gets 503 (retryable). When
  many bytes were buffered at once and half of them have drained, the heap is trimmed.
- ``read_json_body``: reads a body within that budget, its own size limit and a deadline (408),
  and parses it; JSON nested too deep for the parser is a 400, not a RecursionError.
- ``check_stop``: the count and length of stop strings (each is matched on every token).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from starlette.requests import Request

from moeserve.common.errors import (
    InvalidRequestError,
    MoeServeError,
    PayloadTooLargeError,
    UnavailableError,
)
from moeserve.common.heap import DeferredTrim

__all__ = ["BodyBudget", "BodyTimeoutError", "HttpLimits", "check_stop", "read_json_body"]


class BodyTimeoutError(MoeServeError):
    http_status = 408
    grpc_code = "DEADLINE_EXCEEDED"
    error_type = "request_timeout"


@dataclass(frozen=True)
class HttpLimits:
    max_buffered_bytes: int = 256 << 20  # all bodies being read at once
    header_timeout_s: float = 10.0  # from connect (or a request's first byte) to its headers
    keep_alive_timeout_s: float = 75.0  # idle after a response (router/connection_timeouts.py)
    body_timeout_s: float = 30.0  # from the headers to the body's last byte
    max_stop_strings: int = 64
    max_stop_length: int = 1024  # characters


# Bodies buffered at once past this many bytes are followed by a heap trim once half of it has
# drained: their chunks (tens of KiB each) come from the C heap, scattered under whatever was
# allocated meanwhile, and stay resident otherwise (common/heap.py). Ordinary traffic buffers
# far less at a time and never trims.
TRIM_AFTER_BODY_BYTES = 4 << 20


class BodyBudget:
    """Bytes buffered by bodies being read; the event loop is the only writer."""

    def __init__(self, limit: int, trim_after: int = TRIM_AFTER_BODY_BYTES):
        self.limit = limit
        self.used = 0
        self.trim_after = trim_after
        self.peak = 0  # the most buffered at once since the last trim was scheduled
        self.trim = DeferredTrim(what="request bodies")

    def take(self, n: int) -> None:
        if self.used + n > self.limit:
            raise UnavailableError(
                f"the router is reading {self.used} bytes of request bodies, its limit "
                f"(--max-buffered-bytes {self.limit}); retry shortly")
        self.used += n
        self.peak = max(self.peak, self.used)

    def give(self, n: int) -> None:
        self.used -= n
        if self.peak >= self.trim_after and self.used <= self.peak // 2:
            self.trim.soon(self.peak - self.used)
            self.peak = self.used


async def _read(request: Request, limit: int, budget: BodyBudget, held: list[int]) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLargeError(f"request body of {declared} bytes is over {limit} bytes")
    parts: list[bytes] = []
    async for part in request.stream():  # chunked bodies carry no length: count as they come
        if held[0] + len(part) > limit:
            raise PayloadTooLargeError(f"request body is over {limit} bytes")
        budget.take(len(part))
        held[0] += len(part)
        parts.append(part)
    return b"".join(parts)


async def read_json_body(request: Request, limit: int, budget: BodyBudget,
                         timeout_s: float) -> Any:
    """The parsed body; what it buffered is given back to ``budget`` however reading ends
    (a disconnect included)."""
    held = [0]
    try:
        async with asyncio.timeout(timeout_s):
            raw = await _read(request, limit, budget, held)
    except TimeoutError:
        raise BodyTimeoutError(f"request body not received within {timeout_s:g} s") from None
    finally:
        budget.give(held[0])
    try:
        return json.loads(raw)
    except RecursionError:
        raise InvalidRequestError("request body nests JSON arrays or objects too deeply") from None
    except ValueError as e:
        raise InvalidRequestError(f"request body is not valid JSON: {e}") from None


def check_stop(stop: Sequence[str], limits: HttpLimits) -> None:
    """400 naming ``stop`` past the count or length limit."""
    if len(stop) > limits.max_stop_strings:
        raise InvalidRequestError(
            f"stop has {len(stop)} strings; at most {limits.max_stop_strings} are accepted",
            param="stop")
    longest = max(map(len, stop), default=0)
    if longest > limits.max_stop_length:
        raise InvalidRequestError(
            f"a stop string has {longest} characters; at most {limits.max_stop_length} are "
            "accepted", param="stop")
