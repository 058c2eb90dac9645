"""The router's view of its workers: connections, health, load, and the prefix index feed.

Each worker gets one gRPC channel and one watcher task: Health, then StreamEvents until the
stream breaks; then the worker is marked down, its blocks leave the prefix index, and the
watcher retries with backoff. Everything the router knows comes from these streams, so router
replicas agree and may die freely.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import grpc

from moeserve.api import common_pb2, worker_pb2, worker_pb2_grpc
from moeserve.router.metrics import RouterMetrics
from moeserve.router.policy import Candidate, WorkerLoad
from moeserve.router.prefix_index import PrefixIndex

__all__ = ["WorkerClient", "WorkerPool"]

logger = logging.getLogger(__name__)


class WorkerClient:
    """One worker address, usable for the roles it was listed under."""

    def __init__(self, address: str, roles: set[str]):
        self.address = address
        self.roles = roles
        self.channel = grpc.aio.insecure_channel(
            address, options=[("grpc.max_receive_message_length", 64 << 20)]
        )
        self.stub = worker_pb2_grpc.WorkerStub(self.channel)
        self.healthy = False
        self.info: common_pb2.HealthResponse | None = None
        self.load = worker_pb2.LoadReport()
        self.inflight = 0
        self.task: asyncio.Task | None = None

    @property
    def role_label(self) -> str:
        return "both" if len(self.roles) > 1 else next(iter(self.roles))

    def worker_load(self) -> WorkerLoad:
        return WorkerLoad(
            num_running=self.load.num_running,
            num_waiting=self.load.num_waiting,
            kv_usage=self.load.kv_usage,
            inflight=self.inflight,
        )


class WorkerPool:
    def __init__(
        self,
        prefill: list[str],
        decode: list[str],
        index: PrefixIndex,
        metrics: RouterMetrics,
        health_timeout_s: float = 2.0,
    ):
        self.index = index
        self.metrics = metrics
        self.health_timeout_s = health_timeout_s
        self.clients: dict[str, WorkerClient] = {}
        for role, addresses in (("prefill", prefill), ("decode", decode)):
            for address in addresses:
                client = self.clients.setdefault(address, WorkerClient(address, set()))
                client.roles.add(role)
        self._changed = asyncio.Event()

    def start(self) -> None:
        for client in self.clients.values():
            client.task = asyncio.create_task(self._watch(client), name=f"watch {client.address}")

    async def close(self) -> None:
        for client in self.clients.values():
            if client.task is not None:
                client.task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await client.task
            await client.channel.close()

    def healthy(self, role: str) -> list[WorkerClient]:
        return [c for c in self.clients.values() if c.healthy and role in c.roles]

    def candidates(self, clients: list[WorkerClient], hashes: list[int]) -> list[Candidate]:
        return [
            Candidate(
                c.address,
                self.index.overlap(c.address, hashes),
                c.worker_load(),
                self.index.num_blocks(c.address),
            )
            for c in clients
        ]

    def mark_down(self, client: WorkerClient, reason: str) -> None:
        """A call to the worker failed: stop routing to it until its watcher reconnects."""
        if client.healthy:
            logger.warning("worker %s is down: %s", client.address, reason)
        client.healthy = False
        self.index.remove_worker(client.address)
        self.metrics.forget_worker(client.address, client.role_label)

    async def wait_ready(self, timeout_s: float) -> bool:
        """True once every worker answered Health and streams events."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while not all(c.healthy for c in self.clients.values()):
            remaining = deadline - loop.time()
            if remaining <= 0:
                return False
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), min(remaining, 0.5))
        return True

    def model_info(self) -> common_pb2.HealthResponse | None:
        for c in self.clients.values():
            if c.info is not None:
                return c.info
        return None

    async def _watch(self, client: WorkerClient) -> None:
        backoff = 0.1
        while True:
            try:
                client.info = await client.stub.Health(
                    common_pb2.HealthRequest(), timeout=self.health_timeout_s
                )
                if client.info.status != common_pb2.HealthResponse.SERVING:
                    raise RuntimeError("worker reports NOT_SERVING")
                stream = client.stub.StreamEvents(worker_pb2.StreamEventsRequest())
                expected = 0
                async for event in stream:
                    if event.sequence != expected:
                        raise RuntimeError(f"event gap: got {event.sequence}, want {expected}")
                    expected += 1
                    self._apply(client, event)
                    if not client.healthy:
                        client.healthy = True
                        backoff = 0.1
                        logger.info("worker %s (%s) is up", client.address, client.role_label)
                        self._changed.set()
                raise RuntimeError("event stream ended")
            except asyncio.CancelledError:
                raise
            except (grpc.RpcError, RuntimeError) as e:
                reason = e.code().name if isinstance(e, grpc.RpcError) else str(e)
                self.mark_down(client, reason)
                self._changed.set()
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 2.0)

    def _apply(self, client: WorkerClient, event: worker_pb2.WorkerEvent) -> None:
        name = client.address
        for kv in event.kv_events:
            kind = kv.WhichOneof("event")
            if kind == "stored":
                self.index.stored(name, kv.stored.block_hashes)
            elif kind == "removed":
                self.index.removed(name, kv.removed.block_hashes)
            elif kind == "cleared":
                self.index.cleared(name)
        client.load = event.load
        self.metrics.worker_load(
            name, client.role_label, event.load.num_running, event.load.num_waiting,
            event.load.kv_usage,
        )  # fmt: skip
