"""The router's view of its workers: connections, health, load, and the prefix index feed.

Each worker gets one gRPC channel and two tasks. The watcher: Health, then StreamEvents until
the stream breaks; then the worker is marked down, its blocks leave the prefix index, and the
watcher retries with backoff. The prober (active health): Health every ``probe_interval_s``, so
a worker that hangs without closing its stream is noticed too, and its streams in flight are told
at once (``WorkerClient.watching_lost``: they migrate without waiting for the stall timeout).
Passive health: a failed or timed out call ejects the worker for a backoff that doubles per
fault, not per failed call (``moeserve.router.ejection``); it is re-admitted once the backoff is
over and it answers Health. A draining worker (SIGTERM) is dropped at once.
Everything the router knows comes from the workers, so router replicas agree and may die freely.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterator

import grpc

from moeserve.api import common_pb2, worker_pb2, worker_pb2_grpc
from moeserve.common.kv_compat import fingerprint_mismatch
from moeserve.common.tls import TlsConfig, open_channel
from moeserve.common.worker_auth import WorkerAuth, client_interceptors
from moeserve.router.ejection import Ejection
from moeserve.router.metrics import RouterMetrics
from moeserve.router.policy import Candidate, WorkerLoad
from moeserve.router.prefix_index import PrefixIndex

__all__ = ["WorkerClient", "WorkerPool"]

logger = logging.getLogger(__name__)


class WorkerClient:
    """One worker address, usable for the roles it was listed under."""

    def __init__(self, address: str, roles: set[str], tls: TlsConfig | None = None,
                 auth: WorkerAuth | None = None):  # fmt: skip
        self.address = address
        self.roles = roles
        # The router's worker-plane token rides on every call (common.worker_auth).
        self.channel = open_channel(
            address, tls, options=[("grpc.max_receive_message_length", 64 << 20)],
            interceptors=client_interceptors(auth),
        )
        self.stub = worker_pb2_grpc.WorkerStub(self.channel)
        self.healthy = False
        self.info: common_pb2.HealthResponse | None = None
        self.load = worker_pb2.LoadReport()
        self.inflight = 0
        self.task: asyncio.Task | None = None
        self.probe_task: asyncio.Task | None = None
        self.epoch = 0
        self.draining = False
        self.ejection = Ejection()
        self.last_error = ""
        self._lost: set[Callable[[str], None]] = set()

    @property
    def ejected_until(self) -> float:
        return self.ejection.until

    @property
    def ejections(self) -> int:
        return self.ejection.count

    def available(self, now: float | None = None) -> bool:
        """Routable: connected and serving, not draining, not ejected."""
        now = time.monotonic() if now is None else now
        return self.healthy and not self.draining and not self.ejection.ejected(now)

    @contextlib.contextmanager
    def watching_lost(self, callback: Callable[[str], None]) -> Iterator[None]:
        """Within the block ``callback(reason)`` is called if the health probe finds the worker
        gone (a stream in flight then migrates instead of waiting out its stall timeout)."""
        self._lost.add(callback)
        try:
            yield
        finally:
            self._lost.discard(callback)

    def lost(self, reason: str) -> None:
        for callback in list(self._lost):
            callback(reason)

    @property
    def fingerprint(self) -> str:
        return self.info.compat_fingerprint if self.info is not None else ""

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
        probe_interval_s: float = 1.0,
        eject_base_s: float = 1.0,
        eject_max_s: float = 30.0,
        tls: TlsConfig | None = None,
        auth: WorkerAuth | None = None,
    ):
        self.tls = tls
        self.auth = auth
        self.index = index
        self.metrics = metrics
        self.health_timeout_s = health_timeout_s
        self.probe_interval_s = probe_interval_s
        self.eject_base_s = eject_base_s
        self.eject_max_s = eject_max_s
        # (prefill address, decode address) -> the fields that differ
        self.incompatible: dict[tuple[str, str], str] = {}
        self.clients: dict[str, WorkerClient] = {}
        for role, addresses in (("prefill", prefill), ("decode", decode)):
            for address in addresses:
                client = self.clients.setdefault(address, WorkerClient(address, set(), self.tls,
                                                                       self.auth))
                client.roles.add(role)
        self._changed = asyncio.Event()
        self.stopping = False  # the router itself drains: workers leaving are the stop, not faults

    def start(self) -> None:
        for client in self.clients.values():
            client.task = asyncio.create_task(self._watch(client), name=f"watch {client.address}")
            client.probe_task = asyncio.create_task(
                self._probe(client), name=f"probe {client.address}"
            )

    async def close(self) -> None:
        for client in self.clients.values():
            for task in (client.task, client.probe_task):
                if task is not None:
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await task
            await client.channel.close()

    def healthy(self, role: str) -> list[WorkerClient]:
        """Workers of ``role`` the router may send new work to."""
        now = time.monotonic()
        return [c for c in self.clients.values() if role in c.roles and c.available(now)]

    def compatible(self, p: WorkerClient, d: WorkerClient) -> bool:
        """May ``d`` take KV from ``p``? A mismatch is recorded (status, metrics, log) once."""
        if (p.address, d.address) in self.incompatible:
            return False
        if not p.fingerprint or not d.fingerprint:
            return True  # not known yet: the decode worker checks and refuses by name
        diff = fingerprint_mismatch(d.fingerprint, p.fingerprint)
        if diff is not None:
            self.mark_incompatible(p, d, diff)
            return False
        return True

    def mark_incompatible(self, p: WorkerClient, d: WorkerClient, reason: str) -> None:
        key = (p.address, d.address)
        if key not in self.incompatible:
            logger.error("not pairing prefill %s with decode %s: incompatible KV (%s)",
                         p.address, d.address, reason)  # fmt: skip
        self.incompatible[key] = reason
        self.metrics.incompatible_pairs.set(len(self.incompatible))

    def report_failure(self, client: WorkerClient, reason: str) -> None:
        """Passive health: a call failed or timed out; eject for a backoff that doubles per
        fault (failures while already ejected are the same fault: see ejection.py)."""
        client.last_error = reason
        backoff = client.ejection.fail(time.monotonic(), self.eject_base_s, self.eject_max_s)
        if backoff is None:
            logger.info("worker %s (ejected already): %s", client.address, reason)
            return
        self.metrics.worker_ejections.labels(client.address, client.role_label).inc()
        self.metrics.worker_available.labels(client.address, client.role_label).set(0)
        logger.warning("ejecting worker %s for %.1f s: %s", client.address, backoff, reason)

    def report_success(self, client: WorkerClient) -> None:
        client.ejection.succeed()

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
            level = logging.INFO if self.stopping else logging.WARNING
            logger.log(level, "worker %s is down: %s", client.address, reason)
        client.healthy = False
        client.epoch += 1  # the watcher resubscribes: the index needs a fresh snapshot
        client.last_error = reason
        client.load = worker_pb2.LoadReport()  # a dead worker's last report means nothing now
        self.index.remove_worker(client.address)
        self.metrics.forget_worker(client.address, client.role_label)
        self.metrics.worker_available.labels(client.address, client.role_label).set(0)

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

    def set_workers(self, wanted: dict[str, str], retire_grace_s: float = 60.0) -> None:
        """Discovery's seam (Kubernetes, Ray): make the pool exactly ``wanted`` (address ->
        role). A worker that left gets no new work at once; its channel stays open until its
        requests in flight end (a draining pod finishes its streams) or the grace is over."""
        for address, client in list(self.clients.items()):
            if wanted.get(address) is None or client.roles != {wanted[address]}:
                del self.clients[address]
                self.mark_down(client, "left discovery")
                for task in (client.task, client.probe_task):
                    if task is not None:
                        task.cancel()
                asyncio.get_running_loop().create_task(self._retire(client, retire_grace_s))
                logger.info("worker %s left the pool", address)
        for address, role in wanted.items():
            if address not in self.clients:
                client = WorkerClient(address, {role}, self.tls, self.auth)
                self.clients[address] = client
                client.task = asyncio.create_task(self._watch(client), name=f"watch {address}")
                client.probe_task = asyncio.create_task(self._probe(client),
                                                        name=f"probe {address}")  # fmt: skip
                logger.info("worker %s (%s) joined the pool", address, role)
        self._changed.set()

    async def _retire(self, client: WorkerClient, grace_s: float) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace_s
        while client.inflight > 0 and loop.time() < deadline:
            await asyncio.sleep(0.2)
        await client.channel.close()

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
                # A restarted worker (same address) starts fresh: no drain, no stale pairing.
                client.draining = False
                self.incompatible = {
                    k: v for k, v in self.incompatible.items() if client.address not in k
                }
                self.metrics.incompatible_pairs.set(len(self.incompatible))
                stream = client.stub.StreamEvents(worker_pb2.StreamEventsRequest())
                expected = 0
                epoch = client.epoch
                async for event in stream:
                    if client.epoch != epoch:
                        stream.cancel()
                        raise RuntimeError("marked down while subscribed; resubscribing")
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

    async def _probe(self, client: WorkerClient) -> None:
        """Active health: a worker that stops answering is marked down within two intervals.

        One missed probe is tolerated: on a saturated host a Health call may just be slow.
        """
        missed = 0
        while True:
            await asyncio.sleep(self.probe_interval_s)
            if not client.healthy:
                missed = 0
                continue  # the watcher is reconnecting
            try:
                info = await client.stub.Health(
                    common_pb2.HealthRequest(), timeout=self.health_timeout_s
                )
                missed = 0
            except grpc.RpcError as e:
                missed += 1
                if missed >= 2:
                    reason = f"health probe: {e.code().name}"
                    self.mark_down(client, reason)
                    client.lost(reason)  # its streams migrate now, not after the stall timeout
                    self._changed.set()
                continue
            if info.draining:
                self._set_draining(client)
            elif info.status != common_pb2.HealthResponse.SERVING:
                self.mark_down(client, "health probe: NOT_SERVING")
            self.metrics.worker_available.labels(client.address, client.role_label).set(
                int(client.available())
            )

    def _set_draining(self, client: WorkerClient) -> None:
        if not client.draining:
            logger.warning("worker %s is draining; no new requests go to it", client.address)
        client.draining = True
        self.metrics.worker_available.labels(client.address, client.role_label).set(0)

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
        if event.load.draining:
            self._set_draining(client)
        self.metrics.worker_load(
            name, client.role_label, event.load.num_running, event.load.num_waiting,
            event.load.kv_usage,
        )  # fmt: skip
