"""Process groups of one EP group: who this rank is, the collectives it joins, and its health.

Everything rank-specific travels in a `ParallelContext` handed to the engine; nothing here is a
module-level global. One group = `world_size` ranks that are at the same time the attention
data-parallel ranks (own requests, own KV cache) and the expert-parallel ranks of the MoE layers.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist

from moeserve.common import spec
from moeserve.common.errors import UnavailableError

__all__ = [
    "ENV_LOCAL_RANK", "GroupFailure", "RankInfo", "ParallelContext", "HealthMonitor",
    "init_parallel",
]

logger = logging.getLogger(__name__)

# Set by the local launcher on each child: its index among the ranks of this pod / machine.
ENV_LOCAL_RANK = "MOESERVE_LOCAL_RANK"


class GroupFailure(UnavailableError):
    """A peer rank died or stopped answering: the whole EP group must be restarted."""


@dataclass(frozen=True)
class RankInfo:
    """Where one process sits in its EP group. rank = node_rank * ranks_per_node + local_rank."""

    rank: int
    world_size: int
    local_rank: int
    ranks_per_node: int
    rendezvous: str  # host:port of the TCP store on rank 0

    @property
    def num_nodes(self) -> int:
        return -(-self.world_size // self.ranks_per_node)

    @classmethod
    def from_env(cls, world_size: int, env: Mapping[str, str] | None = None) -> RankInfo:
        """Read the names the operator renders (moeserve.common.spec) plus ENV_LOCAL_RANK.

        Without the operator's variables (a laptop, CI) the group is one node of
        `world_size` local ranks.
        """
        env = os.environ if env is None else env
        local = int(env.get(ENV_LOCAL_RANK, "0"))
        per_node = int(env.get(spec.ENV_RANKS_PER_POD, str(world_size)))
        node = int(env.get(spec.ENV_RANK, "0"))
        size = int(env.get(spec.ENV_WORLD_SIZE, str(world_size)))
        if size != world_size:
            raise GroupFailure(
                f"{spec.ENV_WORLD_SIZE}={size} disagrees with --ep {world_size}"
            )
        rendezvous = env.get(spec.ENV_RENDEZVOUS)
        if not rendezvous:
            raise GroupFailure(f"{spec.ENV_RENDEZVOUS} (host:port of rank 0) is not set")
        rank = node * per_node + local
        if not 0 <= rank < world_size:
            raise GroupFailure(f"rank {rank} outside the group of {world_size}")
        return cls(rank, world_size, local, per_node, rendezvous)


class HealthMonitor:
    """Heartbeats through the rendezvous store; a peer silent for `timeout_s` is reported.

    Counters, not timestamps, go into the store, so clocks of different nodes never meet: a
    peer is stale when its counter has not moved for `timeout_s` of this rank's own clock.
    """

    def __init__(self, store: dist.Store, info: RankInfo, interval_s: float, timeout_s: float):
        self._store = store
        self._info = info
        self._interval_s = interval_s
        self._timeout_s = timeout_s
        self._seen: dict[int, tuple[int, float]] = {}
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._reason: str | None = None
        self._thread = threading.Thread(target=self._run, name="ep-health", daemon=True)

    @property
    def healthy(self) -> bool:
        with self._lock:
            return self._reason is None

    @property
    def reason(self) -> str | None:
        with self._lock:
            return self._reason

    def mark_failed(self, reason: str) -> None:
        with self._lock:
            if self._reason is None:
                self._reason = reason
                logger.error("EP group unhealthy: %s", reason)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(self._interval_s * 2 + 1)

    def _run(self) -> None:
        beat = 0
        key = f"moeserve/hb/{self._info.rank}"
        while not self._stop.wait(self._interval_s):
            beat += 1
            try:
                self._store.set(key, str(beat))
                self._check_peers()
            except Exception as e:  # store on rank 0 gone: rank 0 (or the network) died
                self.mark_failed(f"rendezvous store unreachable: {e}")
                return

    def _check_peers(self) -> None:
        now = time.monotonic()
        for peer in range(self._info.world_size):
            if peer == self._info.rank:
                continue
            key = f"moeserve/hb/{peer}"
            value = int(self._store.get(key)) if self._store.check([key]) else 0
            last_value, since = self._seen.get(peer, (-1, now))
            if value != last_value:
                self._seen[peer] = (value, now)
            elif now - since > self._timeout_s:
                self.mark_failed(f"rank {peer} sent no heartbeat for {now - since:.1f}s")


@dataclass
class ParallelContext:
    """This rank's view of its EP group; passed explicitly to the engine and model."""

    info: RankInfo
    group: dist.ProcessGroup
    store: dist.Store
    timeout_s: float
    health: HealthMonitor
    # Set on every rank at the same step boundary once any rank asked to stop (request_stop).
    stopped: threading.Event = field(default_factory=threading.Event, repr=False)
    _stop_vote: int = field(default=0, repr=False)
    _closed: bool = field(default=False, repr=False)

    @property
    def rank(self) -> int:
        return self.info.rank

    @property
    def world_size(self) -> int:
        return self.info.world_size

    def all_reduce_max(self, values: list[int]) -> list[int]:
        """Element-wise max over ranks (lockstep decisions: any work? how many tokens?)."""
        t = torch.tensor(values, dtype=torch.int64)
        self.wait(dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group, async_op=True))
        return t.tolist()

    def any_rank_busy(self, local: bool) -> bool:
        """The group's decision at each step boundary: does any rank have work?

        It also carries stop votes (``request_stop``). From the boundary where one is seen,
        every rank answers False without another collective, so the engine loops go idle
        together and no rank is left waiting in a collective its peers never enter (a process
        that exits with a thread blocked inside one aborts: "terminate called ...").
        """
        if self.stopped.is_set():
            return False
        busy, stop = self.all_reduce_max([int(local), self._stop_vote])
        if stop:
            self.stopped.set()
            return False
        return bool(busy)

    def request_stop(self) -> None:
        """Ask every rank to stop stepping; ``stopped`` is set once the group agreed."""
        self._stop_vote = 1

    def all_reduce_sum_(self, t: torch.Tensor) -> torch.Tensor:
        self.wait(dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self.group, async_op=True))
        return t

    def all_gather_object(self, obj: object) -> list[object]:
        out: list[object] = [None] * self.world_size
        try:
            dist.all_gather_object(out, obj, group=self.group)
        except RuntimeError as e:
            raise self.failed(e) from e
        return out

    def wait(self, work: dist.Work) -> None:
        """Wait for an async collective; a dead or stuck peer becomes a GroupFailure."""
        try:
            work.wait(timedelta(seconds=self.timeout_s))
        except RuntimeError as e:
            raise self.failed(e) from e

    def failed(self, exc: BaseException) -> GroupFailure:
        reason = f"collective failed on rank {self.rank}: {str(exc).splitlines()[0][:300]}"
        self.health.mark_failed(reason)
        return GroupFailure(f"EP group of {self.world_size} ranks failed ({reason})")

    def close(self, timeout_s: float = 10.0) -> None:
        """Leave the group: every rank calls it once its engine no longer steps."""
        if self._closed:
            return
        self._closed = True
        self.health.stop()
        try:
            # Rank 0 hosts the store: nobody leaves before every rank stopped using it.
            dist.barrier(group=self.group, async_op=True).wait(
                timedelta(seconds=min(timeout_s, self.timeout_s)))
            dist.destroy_process_group(self.group)
        except Exception:  # a failed group may refuse a clean shutdown; the process exits anyway
            logger.debug("destroy_process_group failed", exc_info=True)


def init_parallel(
    info: RankInfo,
    *,
    backend: str = "gloo",
    timeout_s: float = 60.0,
    heartbeat_s: float = 1.0,
) -> ParallelContext:
    """Join the group at `info.rendezvous` (rank 0 hosts the store) and start heartbeats.

    The same timeout bounds the rendezvous, every collective, and heartbeat staleness, so a
    dead or frozen peer surfaces as a GroupFailure instead of a hang.
    """
    host, port = info.rendezvous.rsplit(":", 1)
    timeout = timedelta(seconds=timeout_s)
    store = dist.TCPStore(host, int(port), info.world_size, is_master=info.rank == 0,
                          timeout=timeout, wait_for_workers=False)
    # torch keeps one default group per process; a process belongs to exactly one EP group.
    dist.init_process_group(backend, store=store, rank=info.rank,
                            world_size=info.world_size, timeout=timeout)
    group = dist.group.WORLD
    monitor = HealthMonitor(store, info, heartbeat_s, max(3 * heartbeat_s, min(timeout_s, 10.0)))
    monitor.start()
    # A heartbeat caught inside the store client at interpreter exit aborts the process.
    atexit.register(monitor.stop)
    logger.info("rank %d/%d joined EP group at %s (%s)", info.rank, info.world_size,
                info.rendezvous, backend)
    return ParallelContext(info, group, store, timeout_s, monitor)
