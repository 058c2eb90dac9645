"""How long the router keeps a client's HTTP connection: a deadline for headers, an idle limit.

uvicorn's own keep-alive timer stops at a request's first byte, so a client sending headers
slowly would hold its connection forever; and its default (5 s) equals the idle expiry of
httpx's pools (the OpenAI SDK's too). With equal limits a client reuses a connection at the
moment the server closes it: the request lands on a closing socket, the kernel answers with
a reset, and the client gets a ReadError with no response (seen as 1 in ~1000 requests at
concurrency 256 in `benchmarks/serving_sweep.py`). Proxies in front of a router keep upstream
connections idle longer still (ingress-nginx 60 s). So the router keeps an idle connection
``keep_alive_timeout_s`` (75 s by default, past those), and the bytes of a request's headers,
once they start (or once a connection opens), must all arrive within ``header_timeout_s``.
"""

from __future__ import annotations

import asyncio
import logging

__all__ = ["timed_http_protocol", "uvicorn_keep_alive"]

logger = logging.getLogger(__name__)


def uvicorn_keep_alive(keep_alive_timeout_s: float) -> int:
    """uvicorn's own idle timer, set past ours so that the router's rule decides."""
    return int(keep_alive_timeout_s) + 5


def timed_http_protocol(header_timeout_s: float, keep_alive_timeout_s: float) -> type:
    """uvicorn's HTTP protocol class closing a connection whose request headers are not
    complete ``header_timeout_s`` after it opened or after the first byte of the request, or
    that stayed idle ``keep_alive_timeout_s`` after its last response."""
    from uvicorn.protocols.http.auto import AutoHTTPProtocol

    class TimedHTTPProtocol(AutoHTTPProtocol):  # type: ignore[misc, valid-type]
        _timer: asyncio.TimerHandle | None = None
        _idle = False  # the timer armed is the idle one (no byte of a next request yet)

        def _arm(self, timeout_s: float, idle: bool) -> None:
            self._disarm()
            self._idle = idle
            waiting_after = self.cycle  # a new request replaces it once its headers are in
            self._timer = self.loop.call_later(timeout_s, self._expire, waiting_after)

        def _disarm(self) -> None:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None

        def _expire(self, waiting_after: object) -> None:
            if self.cycle is waiting_after and not self.transport.is_closing():
                logger.debug("closing a client connection: %s", "idle" if self._idle
                             else f"headers not complete within {header_timeout_s:g} s")
                self.transport.close()

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm(header_timeout_s, idle=False)

        def data_received(self, data: bytes) -> None:
            if self._idle:  # the next request's first bytes: its headers are now due
                self._arm(header_timeout_s, idle=False)
            super().data_received(data)

        def on_response_complete(self) -> None:
            super().on_response_complete()
            in_flight = self.cycle is not None and not self.cycle.response_complete
            if not self.transport.is_closing() and not in_flight:
                self._arm(keep_alive_timeout_s, idle=True)

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

    return TimedHTTPProtocol
