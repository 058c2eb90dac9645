"""Router API keys, as vLLM users know them: ``Authorization: Bearer <key>``.

Keys come from ``--api-key`` (repeatable) and the environment: ``MOESERVE_API_KEY`` (one key, the
vLLM spelling) and ``MOESERVE_API_KEYS`` (comma- or newline-separated; the operator mounts the
MoEDeployment's Secret key ``api-keys`` there). No key configured means no authentication.

HTTP: an ASGI middleware answers an OpenAI-style 401 before the body is read, so an
unauthenticated client cannot make the router buffer a large body. ``/health`` stays open for
probes, ``/metrics`` too unless ``protect_metrics``. gRPC: a server interceptor ends calls without
a valid ``authorization`` metadata entry with UNAUTHENTICATED (Health stays open, like /health).
Keys are compared in constant time (``hmac.compare_digest``) over every configured key, so the
answer time does not tell how much of a guess was right.
"""

from __future__ import annotations

import hmac
import json
import os
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any

import grpc

from moeserve.common.spec import ENV_API_KEYS

__all__ = ["ENV_API_KEY", "ApiKeys", "ApiKeyMiddleware", "GrpcApiKeyInterceptor",
           "keys_from_sources"]

ENV_API_KEY = "MOESERVE_API_KEY"
# The schema is static and public (it names no key), so clients can discover the contract.
OPEN_PATHS = frozenset({"/health", "/openapi.json"})
METRICS_PATH = "/metrics"
# gRPC methods a probe calls without credentials.
OPEN_METHODS = frozenset({"/moeserve.v1.Router/Health", "/grpc.health.v1.Health/Check",
                          "/grpc.health.v1.Health/Watch"})


def _split(text: str) -> list[str]:
    return [k.strip() for k in text.replace("\n", ",").split(",") if k.strip()]


def keys_from_sources(flags: Iterable[str] | None, env: Mapping[str, str] | None = None
                      ) -> list[str]:  # fmt: skip
    """Every key of the flags and the environment, de-duplicated, order kept."""
    env = os.environ if env is None else env
    keys = [k.strip() for k in flags or () if k.strip()]
    keys += _split(env.get(ENV_API_KEY, ""))
    keys += _split(env.get(ENV_API_KEYS, ""))
    return list(dict.fromkeys(keys))


class ApiKeys:
    def __init__(self, keys: Iterable[str]):
        self._keys = [k.encode() for k in keys]

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    def check(self, presented: str | bytes | None) -> bool:
        """True when ``presented`` equals a configured key; looks at every key either way."""
        if not self._keys:
            return True
        if presented is None:
            return False
        raw = presented.encode() if isinstance(presented, str) else presented
        ok = False
        for key in self._keys:
            ok |= hmac.compare_digest(raw, key)
        return ok

    def check_header(self, value: str | bytes | None) -> bool:
        """``Authorization`` header value (``Bearer <key>``, scheme case-insensitive)."""
        if value is None:
            return self.check(None)
        text = value.decode("latin-1") if isinstance(value, bytes) else value
        scheme, _, token = text.strip().partition(" ")
        return self.check(token.strip() if scheme.lower() == "bearer" else None)


_UNAUTHORIZED = json.dumps({"error": {
    "message": "Invalid or missing API key: send 'Authorization: Bearer <key>'.",
    "type": "invalid_request_error", "param": None, "code": "invalid_api_key"}}).encode()

ASGIApp = Callable[[dict[str, Any], Callable[[], Awaitable[Any]], Callable[[Any], Awaitable[None]]],
                   Awaitable[None]]


class ApiKeyMiddleware:
    """Pure ASGI (no BaseHTTPMiddleware) so streaming responses pass through untouched."""

    def __init__(self, app: ASGIApp, keys: ApiKeys, protect_metrics: bool = False):
        self.app = app
        self.keys = keys
        self.open_paths = OPEN_PATHS if protect_metrics else OPEN_PATHS | {METRICS_PATH}

    async def __call__(self, scope: dict[str, Any], receive: Callable, send: Callable) -> None:
        if scope["type"] != "http" or not self.keys.enabled or scope["path"] in self.open_paths:
            await self.app(scope, receive, send)
            return
        header = next((v for k, v in scope.get("headers", ()) if k == b"authorization"), None)
        if self.keys.check_header(header):
            await self.app(scope, receive, send)
            return
        await send({"type": "http.response.start", "status": 401, "headers": [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(_UNAUTHORIZED)).encode()),
            (b"www-authenticate", b'Bearer realm="moeserve"')]})
        await send({"type": "http.response.body", "body": _UNAUTHORIZED})


class GrpcApiKeyInterceptor(grpc.aio.ServerInterceptor):
    """UNAUTHENTICATED unless the call's ``authorization`` metadata holds ``Bearer <key>``."""

    def __init__(self, keys: ApiKeys):
        self.keys = keys

        async def deny_unary(request: Any, context: grpc.aio.ServicerContext) -> None:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED,
                                "invalid or missing API key (metadata 'authorization: Bearer')")

        async def deny_stream(request: Any, context: grpc.aio.ServicerContext) -> Any:
            await deny_unary(request, context)
            yield  # pragma: no cover - abort raised above; this only makes it a generator

        self._deny = {
            (False, False): grpc.unary_unary_rpc_method_handler(deny_unary),
            (False, True): grpc.unary_stream_rpc_method_handler(deny_stream),
            (True, False): grpc.stream_unary_rpc_method_handler(deny_unary),
            (True, True): grpc.stream_stream_rpc_method_handler(deny_stream),
        }

    async def intercept_service(self, continuation: Callable, details: grpc.HandlerCallDetails
                                ) -> Any:  # fmt: skip
        if not self.keys.enabled or details.method in OPEN_METHODS:
            return await continuation(details)
        meta = dict(details.invocation_metadata or ())
        if self.keys.check_header(meta.get("authorization")):
            return await continuation(details)
        handler = await continuation(details)
        if handler is None:  # unknown method: let gRPC answer UNIMPLEMENTED
            return None
        return self._deny[(handler.request_streaming, handler.response_streaming)]
