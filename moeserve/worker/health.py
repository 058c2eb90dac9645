"""Whether a worker serves, decided once: the moeserve.v1.Worker Health RPC (read by routers)
and the standard ``grpc.health.v1.Health`` service (read by the kubelet's gRPC probes) both ask
:func:`serving_state`.

SERVING needs a running engine loop, no drain in progress and, with expert parallelism, a
healthy EP group: a rank whose peers stopped heartbeating cannot run a step, so the pod turns
unready (and, through the liveness probe, gets restarted) instead of taking requests it would
fail.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

__all__ = ["GrpcHealthServicer", "WORKER_SERVICE", "add_health_service", "serving_state"]

WORKER_SERVICE = "moeserve.v1.Worker"
_STATUS = health_pb2.HealthCheckResponse


def serving_state(loop: Any, gate: Any, engine: Any) -> tuple[bool, str]:
    """(serving, why not) for a worker's engine loop, admission gate and engine."""
    if loop is None or not loop.alive:
        return False, "engine loop is not running"
    if gate.draining:
        return False, "draining"
    parallel = getattr(engine, "parallel", None)
    if parallel is not None and not parallel.health.healthy:
        return False, f"EP group failed: {parallel.health.reason}"
    return True, ""


class GrpcHealthServicer(health_pb2_grpc.HealthServicer):
    """``grpc.health.v1.Health`` for the service names "" (the whole server) and
    ``moeserve.v1.Worker``; ``Watch`` streams a change within ``poll_s``."""

    def __init__(self, state: Callable[[], tuple[bool, str]], poll_s: float = 1.0):
        self._state = state
        self._poll_s = poll_s

    def _status(self, service: str) -> int | None:
        if service not in ("", WORKER_SERVICE):
            return None
        return _STATUS.SERVING if self._state()[0] else _STATUS.NOT_SERVING

    async def Check(
        self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext
    ) -> health_pb2.HealthCheckResponse:
        status = self._status(request.service)
        if status is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown service {request.service!r}")
        return _STATUS(status=status)

    async def Watch(
        self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[health_pb2.HealthCheckResponse]:
        last = None
        while True:
            status = self._status(request.service)
            if status is None:
                status = _STATUS.SERVICE_UNKNOWN  # what the protocol says Watch sends
            if status != last:
                last = status
                yield _STATUS(status=status)
            await asyncio.sleep(self._poll_s)

    async def List(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        statuses = {name: _STATUS(status=self._status(name)) for name in ("", WORKER_SERVICE)}
        return health_pb2.HealthListResponse(statuses=statuses)


def add_health_service(server: grpc.aio.Server, state: Callable[[], tuple[bool, str]]) -> None:
    health_pb2_grpc.add_HealthServicer_to_server(GrpcHealthServicer(state), server)
