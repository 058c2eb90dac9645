"""Worker-plane authentication: per-deployment tokens, the workers' interceptor, handle MACs.

Whoever reaches a worker's gRPC port could otherwise Generate without a key or limits, Abort
other requests, read prompts' token ids from StreamEvents, or point a decode worker at any
address through a forged KV handle. So every worker RPC carries a token in the metadata
``x-moeserve-worker-token`` (repeated during a rotation: current and previous), checked in
constant time by :class:`WorkerAuthInterceptor` before the handler runs. Two roles:

- **router**: the deployment's routers. Every RPC; StreamEvents with token ids. Workers hold
  only the SHA-256 of the router token, so a worker cannot act as a router.
- **peer**: the deployment's workers (a decode worker calling its prefill peer). ClaimKV,
  ReleaseKV, GetNixlMetadata, Health, StreamEvents (block hashes only, no token ids).

Open without a token: ``grpc.health.v1.Health`` only (the kubelet's probes cannot send one).

The worker token also keys an HMAC over each KV handle: the prefill worker signs the fields
that direct the decode worker's connections, and the decode worker contacts no address whose
handle does not verify, so a kv_handle can only name a worker of the deployment.

Tokens reach processes through the environment, never argv (``ps`` shows argv): ``moeserve up``
and Ray generate one :class:`PlaneSecret` per start, the operator keeps it in a Secret.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import hmac
import logging
import os
import secrets
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import grpc

from moeserve.common.errors import ConfigError

__all__ = ["HEADER", "ROLE_ROUTER", "ROLE_PEER", "ENV_WORKER_TOKEN", "ENV_ROUTER_TOKEN",
           "ENV_ROUTER_TOKEN_SHA256", "ENV_INSECURE", "PREVIOUS", "SECRET_KEYS",
           "WORKER_SECRET_ENV", "ROUTER_SECRET_ENV", "PlaneSecret", "WorkerAuth",
           "WorkerAuthInterceptor", "add_worker_auth_arguments", "worker_auth_from_env",
           "client_interceptors", "new_token"]

logger = logging.getLogger(__name__)

HEADER = "x-moeserve-worker-token"
ROLE_ROUTER, ROLE_PEER = "router", "peer"
ENV_WORKER_TOKEN = "MOESERVE_WORKER_TOKEN"
ENV_ROUTER_TOKEN = "MOESERVE_ROUTER_TOKEN"
ENV_ROUTER_TOKEN_SHA256 = "MOESERVE_ROUTER_TOKEN_SHA256"
ENV_INSECURE = "MOESERVE_INSECURE_WORKER_PLANE"
# <ENV>_PREVIOUS holds the previous generation's value during a rotation: accepted, and sent
# beside the current one, so old and new pods talk to each other while they roll.
PREVIOUS = "_PREVIOUS"
# Environment variable -> key in the Kubernetes Secret.
SECRET_KEYS = {ENV_WORKER_TOKEN: "worker-token", ENV_ROUTER_TOKEN: "router-token",
               ENV_ROUTER_TOKEN_SHA256: "router-token-sha256"}  # fmt: skip
WORKER_SECRET_ENV = (ENV_WORKER_TOKEN, ENV_ROUTER_TOKEN_SHA256)
ROUTER_SECRET_ENV = (ENV_ROUTER_TOKEN,)

_OPEN_PREFIX = "/grpc.health.v1.Health/"
_PEER_METHODS = frozenset(f"/moeserve.v1.Worker/{m}" for m in
                          ("ClaimKV", "ReleaseKV", "GetNixlMetadata", "Health", "StreamEvents"))


def new_token() -> str:
    """32 random bytes, base64 (URL-safe, unpadded: a valid metadata value and env value)."""
    return base64.urlsafe_b64encode(secrets.token_bytes(32)).decode().rstrip("=")


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True)
class PlaneSecret:
    """One generation of a deployment's worker-plane secret."""

    worker_token: str
    router_token: str

    @classmethod
    def generate(cls) -> PlaneSecret:
        return cls(new_token(), new_token())

    def data(self) -> dict[str, str]:
        """Secret key -> value (the Kubernetes Secret's stringData)."""
        values = {ENV_WORKER_TOKEN: self.worker_token, ENV_ROUTER_TOKEN: self.router_token,
                  ENV_ROUTER_TOKEN_SHA256: _digest(self.router_token)}  # fmt: skip
        return {SECRET_KEYS[k]: v for k, v in values.items()}

    def env(self, names: Iterable[str]) -> dict[str, str]:
        data = self.data()
        return {name: data[SECRET_KEYS[name]] for name in names}

    def worker_env(self) -> dict[str, str]:
        return self.env(WORKER_SECRET_ENV)

    def router_env(self) -> dict[str, str]:
        return self.env(ROUTER_SECRET_ENV)


def _values(env: Mapping[str, str], name: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in (env.get(name, ""), env.get(name + PREVIOUS, "")) if v.strip())


@dataclass(frozen=True)
class WorkerAuth:
    """What one process holds: the tokens it presents, and (workers) what it accepts."""

    present: tuple[str, ...]  # sent on every call, current first
    peer_tokens: tuple[str, ...] = ()  # accepted as a peer; the first also signs handles
    router_digests: tuple[str, ...] = ()  # SHA-256 hex of the router tokens accepted

    def metadata(self) -> tuple[tuple[str, str], ...]:
        return tuple((HEADER, t) for t in self.present)

    def role_of(self, metadata: Iterable[tuple[str, Any]] | None) -> str | None:
        """ROLE_ROUTER, ROLE_PEER, or None for no valid token. Every comparison runs."""
        presented = [v for k, v in metadata or () if k == HEADER and isinstance(v, str)]
        router = peer = False
        for value in presented:
            d = _digest(value)
            for want in self.router_digests:
                router |= hmac.compare_digest(d, want)
            for want in self.peer_tokens:
                peer |= hmac.compare_digest(value.encode(), want.encode())
        return ROLE_ROUTER if router else ROLE_PEER if peer else None

    def sign(self, fields: Iterable[str]) -> bytes:
        if not self.peer_tokens:
            return b""
        return _mac(self.peer_tokens[0], fields)

    def verify(self, fields: Iterable[str], signature: bytes) -> bool:
        fields = list(fields)
        ok = False
        for key in self.peer_tokens:
            ok |= hmac.compare_digest(_mac(key, fields), signature)
        return ok


def _mac(key: str, fields: Iterable[str]) -> bytes:
    # Length-prefixed, so no two field lists encode alike.
    msg = b"".join(len(f.encode()).to_bytes(4, "big") + f.encode() for f in fields)
    return hmac.new(key.encode(), b"moeserve kv handle v1\0" + msg, hashlib.sha256).digest()


def add_worker_auth_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--insecure-worker-plane", action="store_true",
        default=os.environ.get(ENV_INSECURE, "") not in ("", "0", "false"),
        help="development only: no worker-plane authentication (anyone reaching a worker can "
             "generate, abort and read prompts). Default: tokens from the environment "
             f"({ENV_WORKER_TOKEN}, {ENV_ROUTER_TOKEN_SHA256} on workers; {ENV_ROUTER_TOKEN} on "
             "the router), which `moeserve up`, Ray and the operator set",
    )  # fmt: skip


def worker_auth_from_env(side: str, insecure: bool,
                         env: Mapping[str, str] | None = None) -> WorkerAuth | None:  # fmt: skip
    """This process's auth (``side``: "worker" or "router"); None only when ``insecure``.
    A missing token is a ConfigError naming the variables, never a silently open worker."""
    env = os.environ if env is None else env
    if insecure:
        logger.warning("WORKER PLANE AUTHENTICATION IS OFF (--insecure-worker-plane): anyone "
                       "who reaches this %s's gRPC port can use it. Development only.", side)
        return None
    if side == "router":
        tokens = _values(env, ENV_ROUTER_TOKEN)
        if tokens:
            return WorkerAuth(present=tokens)
        missing = ENV_ROUTER_TOKEN
    else:
        peers, routers = _values(env, ENV_WORKER_TOKEN), _values(env, ENV_ROUTER_TOKEN_SHA256)
        if peers and routers:
            return WorkerAuth(present=peers, peer_tokens=peers, router_digests=routers)
        missing = f"{ENV_WORKER_TOKEN} and {ENV_ROUTER_TOKEN_SHA256}"
    raise ConfigError(f"worker-plane authentication is on by default, but {missing} is not set "
                      "(`moeserve up`, `moeserve up --ray` and the operator set it); "
                      "--insecure-worker-plane turns it off, for development only")


class WorkerAuthInterceptor(grpc.aio.ServerInterceptor):
    """UNAUTHENTICATED without a valid token, PERMISSION_DENIED for a peer on a router-only
    RPC; the handler never runs then. grpc.health.v1 stays open."""

    def __init__(self, auth: WorkerAuth):
        self.auth = auth

    async def intercept_service(self, continuation: Callable, details: grpc.HandlerCallDetails
                                ) -> Any:  # fmt: skip
        method = details.method
        if method.startswith(_OPEN_PREFIX):
            return await continuation(details)
        role = self.auth.role_of(details.invocation_metadata)
        if role == ROLE_ROUTER or (role == ROLE_PEER and method in _PEER_METHODS):
            return await continuation(details)
        handler = await continuation(details)
        if handler is None:  # unknown method: gRPC answers UNIMPLEMENTED
            return None
        if role is None:
            code, why = grpc.StatusCode.UNAUTHENTICATED, f"missing or invalid {HEADER}"
        else:
            code, why = grpc.StatusCode.PERMISSION_DENIED, f"{method} is for the router only"
        return _deny(handler, code, why)


def _deny(handler: grpc.RpcMethodHandler, code: grpc.StatusCode, why: str) -> Any:
    async def unary(request: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(code, why)

    async def stream(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(code, why)
        yield  # pragma: no cover - abort raised; this only makes it a generator

    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(stream)
    return grpc.unary_unary_rpc_method_handler(unary)


class _Token:
    def __init__(self, metadata: tuple[tuple[str, str], ...]):
        self._metadata = metadata

    def _details(self, d: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        meta = grpc.aio.Metadata(*(d.metadata or ()), *self._metadata)
        return grpc.aio.ClientCallDetails(d.method, d.timeout, meta, d.credentials,
                                          d.wait_for_ready)  # fmt: skip


# Two classes: grpc.aio files an interceptor under the first call type it implements only.
class _UnaryToken(_Token, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation, details, request):  # noqa: ANN001
        return await continuation(self._details(details), request)


class _StreamToken(_Token, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation, details, request):  # noqa: ANN001
        return await continuation(self._details(details), request)


def client_interceptors(auth: WorkerAuth | None) -> list[grpc.aio.ClientInterceptor]:
    """For a channel to workers: the token on every call."""
    if auth is None:
        return []
    return [_UnaryToken(auth.metadata()), _StreamToken(auth.metadata())]
