"""Worker pools on Ray: one Serve replica per EP group, one Ray actor per rank.

A pool is a Serve deployment whose replicas are EP groups. Serve gives each replica its own
placement group with one bundle per rank (see ``ray_app.pool_options``); the replica (``EPGroup``)
starts one ``WorkerRank`` actor in each bundle. A rank actor runs the same ``moeserve worker``
code (``serve_worker``) in a thread of its own process, with the argv and environment of the
one launch plan (``moeserve.common.launch_plan``, placed by ``rank_launch``), so the engine joins
its EP group exactly as on Kubernetes. Rank actors are named
``<deployment>/<role>/<replica>/<rank>`` in the ``moeserve`` namespace: that name
is how the router finds them (``list_rank_actors``).

Faults: a single-rank group's actor is restarted by Ray (``max_restarts=-1``); it comes back on
a new port and the router picks up the new address. A multi-rank group cannot heal one rank (the
survivors' collectives are broken), so its actors are not restarted one by one: the replica's
health check fails and Serve replaces the whole group, placement group included.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any

import httpx

from moeserve.common import spec as s
from moeserve.common.launch_plan import (
    STARTUP_TIMEOUT_S,
    Placement,
    PoolLaunch,
    WorkerLaunch,
    worker_launch,
)

__all__ = [
    "NAMESPACE", "RankPlan", "RankInfo", "rank_launch", "WorkerRank", "EPGroup",
    "list_rank_actors", "scrape_metric",
]

logger = logging.getLogger(__name__)

NAMESPACE = "moeserve"  # Ray namespace of the rank actors (Serve's own actors live in "serve")


@dataclass(frozen=True)
class RankPlan:
    """What every rank of a pool needs: the pool's launch plan and the resources of one rank.
    The same for all groups and pool sizes, so scaling a pool leaves its Serve deployment's
    arguments unchanged (Serve then only adds or removes replicas)."""

    launch: PoolLaunch
    gpus_per_rank: int
    cpus_per_rank: float

    @property
    def deployment(self) -> str:
        return self.launch.deployment

    @property
    def role(self) -> str:
        return self.launch.role

    @property
    def ep(self) -> int:
        return self.launch.ep


@dataclass(frozen=True)
class RankInfo:
    name: str
    role: str
    group: str
    rank: int
    address: str
    metrics_url: str
    pid: int


def rank_launch(plan: RankPlan, group: int, rank: int, rendezvous: str, host: str, port: int,
                metrics_port: int) -> WorkerLaunch:  # fmt: skip
    """The launch plan placed in one rank actor. Each bundle holds one rank, so an actor is a
    "pod" of one rank: MOESERVE_RANK is the rank itself and the engine's local rank is 0."""
    from moeserve.worker.parallel.group import ENV_LOCAL_RANK

    target_env = [(ENV_LOCAL_RANK, "0")]
    if not plan.gpus_per_rank:  # ranks share the node's CPUs: no oversubscription
        target_env.append(("OMP_NUM_THREADS", "1"))
    where = Placement(
        ranks_per_process=1, group=group, rank=rank, rendezvous=rendezvous or None,
        address_args=("--host", host, "--port", str(port), "--metrics-port", str(metrics_port)),
        target_env=tuple(target_env),
    )  # fmt: skip
    return worker_launch(plan.launch, where)


def _free_port(host: str) -> int:
    # Ports are picked here and bound by the worker a moment later: a lost race fails the bind
    # with a named error and the actor retries with another port.
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def scrape_metric(url: str, name: str) -> float:
    """Sum of one Prometheus series over its labels, read from a /metrics page."""
    text = httpx.get(url, timeout=2.0).text
    pattern = rf"^{re.escape(name)}(?:\{{[^}}]*\}})? (\S+)$"
    return sum(float(m.group(1)) for m in re.finditer(pattern, text, re.M))


class WorkerRank:
    """One rank of one EP group: `moeserve worker` inside a Ray actor (see module doc)."""

    def __init__(self, plan: RankPlan, name: str, replica: str, group: int, rank: int,
                 rendezvous: str):  # fmt: skip
        import ray

        from moeserve.cli import build_parser

        self.host = ray.util.get_node_ip_address()
        self.plan, self.name, self.group, self.rank = plan, name, replica, rank
        self.error: BaseException | None = None
        for _attempt in range(3):
            port, mport = _free_port(self.host), _free_port(self.host)
            launch = rank_launch(plan, group, rank, rendezvous, self.host, port, mport)
            os.environ.update(launch.env)  # this actor's process is this rank's "pod"
            # The parser reads the environment as its flags' defaults: build it after.
            if self._start(build_parser().parse_args(launch.argv)):
                break
        else:
            raise RuntimeError(f"rank {name} did not start: {self.error}")
        self.address = f"{self.host}:{port}"
        self.metrics_url = f"http://{self.host}:{mport}/metrics"

    def _start(self, args: Any) -> bool:
        from moeserve.worker.server import serve_worker

        ready = threading.Event()
        self.error = None

        def run() -> None:
            async def main() -> None:
                started = asyncio.Event()
                task = asyncio.ensure_future(serve_worker(args, started))
                waiter = asyncio.ensure_future(started.wait())
                await asyncio.wait([task, waiter], return_when=asyncio.FIRST_COMPLETED)
                ready.set()
                await task

            try:
                asyncio.run(main())
            except BaseException as e:  # noqa: BLE001 - reported through info() / the retry
                self.error = e
                logger.exception("worker rank %s stopped", self.name)
            finally:
                ready.set()

        self.thread = threading.Thread(target=run, name=f"worker {self.name}", daemon=True)
        self.thread.start()
        ready.wait(STARTUP_TIMEOUT_S)
        return self.error is None and self.thread.is_alive()

    def info(self) -> RankInfo:
        if not self.thread.is_alive():
            # A worker that stopped must not linger as a healthy-looking actor: let Ray restart
            # the process (or Serve replace the group).
            os._exit(1)
        return RankInfo(self.name, self.plan.role, self.group, self.rank, self.address,
                        self.metrics_url, os.getpid())  # fmt: skip

    def load(self) -> dict[str, float]:
        """The signals the HPA scales on, read from this rank's own /metrics."""
        return {
            "num_requests_waiting": scrape_metric(self.metrics_url, s.METRIC_NUM_REQUESTS_WAITING),
            "kv_cache_usage_perc": scrape_metric(self.metrics_url, s.METRIC_KV_CACHE_USAGE_PERC),
        }


class EPGroup:
    """A Serve replica = one EP group: starts its rank actors in its own placement group."""

    def __init__(self, plan: RankPlan):
        import ray
        from ray import serve
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        ctx = serve.get_replica_context()
        self.plan = plan
        self.replica = ctx.replica_id.unique_id
        rank_obj = getattr(ctx, "rank", None)
        group = int(getattr(rank_obj, "rank", 0) or 0)
        pg = ray.util.get_current_placement_group()
        if pg is None:
            raise RuntimeError("EPGroup must run as a Serve replica with placement_group_bundles")
        bundle = PlacementGroupSchedulingStrategy

        rendezvous = ""
        if plan.ep > 1:  # rank 0 hosts the TCP store, in bundle 0 like pod 0 of a StatefulSet
            probe = ray.remote(num_cpus=0)(_host_and_free_port)
            rendezvous = ray.get(probe.options(
                scheduling_strategy=bundle(pg, placement_group_bundle_index=0)).remote())
        actor_cls = ray.remote(WorkerRank)
        self.ranks = []
        for rank in range(plan.ep):
            name = f"{plan.deployment}/{plan.role}/{self.replica}/{rank}"
            self.ranks.append(actor_cls.options(
                name=name, namespace=NAMESPACE, num_cpus=plan.cpus_per_rank,
                num_gpus=plan.gpus_per_rank, max_restarts=-1 if plan.ep == 1 else 0,
                max_task_retries=0,
                scheduling_strategy=bundle(pg, placement_group_bundle_index=rank),
            ).remote(plan, name, self.replica, group, rank, rendezvous))
        # Constructors run concurrently (the ranks rendezvous with each other); wait for all.
        ray.get([r.info.remote() for r in self.ranks], timeout=STARTUP_TIMEOUT_S)
        self._restarting_since: float | None = None

    async def check_health(self) -> None:
        """Serve's health check. A restarting single-rank actor is Ray's business (it comes
        back); a dead rank of a multi-rank group fails the replica so Serve rebuilds it."""
        try:
            await asyncio.gather(*(asyncio.wait_for(r.info.remote(), 5.0) for r in self.ranks))
            self._restarting_since = None
        except Exception as e:
            if self.plan.ep > 1:
                raise RuntimeError(f"EP group {self.replica} lost a rank: {e}") from e
            now = time.monotonic()
            self._restarting_since = self._restarting_since or now
            if now - self._restarting_since > STARTUP_TIMEOUT_S:
                raise RuntimeError(f"rank of {self.replica} did not come back: {e}") from e

    async def record_autoscaling_stats(self) -> dict[str, float]:
        """Per-group averages of the HPA signals, for ray_app.PoolAutoscaler."""
        loads = []
        for r in self.ranks:
            with contextlib.suppress(Exception):
                loads.append(await asyncio.wait_for(r.load.remote(), 2.0))
        if not loads:
            return {}
        return {k: sum(x[k] for x in loads) / len(loads) for k in loads[0]}

    async def ranks_info(self) -> list[RankInfo]:
        return list(await asyncio.gather(*(r.info.remote() for r in self.ranks)))

    def __del__(self) -> None:
        # The rank actors are owned by this replica and die with it anyway; killing them here
        # frees their ports and NIXL registrations before the replacement starts.
        import ray

        for r in getattr(self, "ranks", []):
            with contextlib.suppress(Exception):
                ray.kill(r, no_restart=True)


def _host_and_free_port() -> str:
    import ray

    host = ray.util.get_node_ip_address()
    return f"{host}:{_free_port(host)}"


def list_rank_actors(deployment: str) -> list[str]:
    """Names of the live rank actors of one MoEDeployment (needs a Ray connection)."""
    import ray

    prefix = f"{deployment}/"
    return sorted(
        a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
        if a.get("namespace") == NAMESPACE and a["name"].startswith(prefix)
    )
