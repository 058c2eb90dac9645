"""A WorkerServicer over an in-process engine, on a gRPC server of its own: the real worker's
RPC and streaming path without a worker process, for benchmarks whose engine is a stand-in
(stream_overhead, scheduling_sim) and the tests that drive them."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import grpc

from moeserve.api import worker_pb2_grpc
from moeserve.worker.engine import LLMEngine
from moeserve.worker.metrics import WorkerMetrics
from moeserve.worker.server import WorkerServicer

__all__ = ["served_engine"]


@contextlib.asynccontextmanager
async def served_engine(engine: LLMEngine, role: str = "both",
                        metrics: WorkerMetrics | None = None
                        ) -> AsyncIterator[tuple[str, WorkerServicer]]:  # fmt: skip
    """``(address, servicer)`` while ``engine`` serves on 127.0.0.1; its engine thread and
    server are stopped on exit."""
    server = grpc.aio.server()
    port = server.add_insecure_port("127.0.0.1:0")
    address = f"127.0.0.1:{port}"
    servicer = WorkerServicer(engine, role, address, None, metrics or WorkerMetrics())
    servicer.start()  # also sets the worker's GIL switch interval (engine_loop)
    worker_pb2_grpc.add_WorkerServicer_to_server(servicer, server)
    await server.start()
    try:
        yield address, servicer
    finally:
        await server.stop(grace=1)
        await asyncio.to_thread(servicer.stop)
