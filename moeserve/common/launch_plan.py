"""The one launch plan of a worker: a pool of a MoEDeployment -> `moeserve worker` argv + env.

Every target runs workers from this plan: the operator (a pod's command and env), `moeserve up`
(child processes) and `moeserve up --ray` (rank actors). The spec types are the only source of
the values (``moeserve.common.spec``); a target decides only where a group's ranks run and
which addresses they get (:class:`Placement`). Engine settings travel as the pod's environment
contract (``ENV_*``), which `moeserve worker` reads back as its flags' defaults through its one
parser (``moeserve.worker.env_defaults``), so a flag in ``extraArgs`` still wins.

Pure and torch-free: the operator imports it.
"""

from __future__ import annotations

from dataclasses import dataclass

from moeserve.common import spec as s
from moeserve.common.served_name import served_model_name
from moeserve.common.spec import MoEDeployment, Role
from moeserve.common.worker_auth import WORKER_SECRET_ENV

__all__ = ["PoolLaunch", "Placement", "WorkerLaunch", "pool_launch", "worker_launch",
           "WORKER_DRAIN_GRACE_S", "ROUTER_DRAIN_GRACE_S", "STARTUP_TIMEOUT_S"]

# On SIGTERM a worker (router) finishes what it holds within this grace, then exits. The worker's
# and the router's --drain-grace-s defaults and the operator's terminationGracePeriodSeconds are
# all derived from these, so they cannot drift apart.
WORKER_DRAIN_GRACE_S = 25
ROUTER_DRAIN_GRACE_S = 25
# How long a target waits for its workers to load and answer before it gives up starting: the
# local cluster, the Ray rank actors and the router's wait for a decode worker on Ray.
STARTUP_TIMEOUT_S = 300.0


@dataclass(frozen=True)
class PoolLaunch:
    """What every worker of one pool shares, from the spec alone. Independent of the group and
    of the pool's size, so a target may keep it across scaling (Ray's deployment version)."""

    deployment: str
    role: Role
    model_dir: str  # the checkpoint directory as the worker sees it
    served_name: str  # the workers' --model-id (spec.model.name, served_name's rule)
    block_size: int
    dp: int
    ep: int
    tp: int
    cpu_only: bool  # gpusPerPod 0
    eplb_enabled: bool
    eplb_redundant_experts: int
    dbo_enabled: bool
    log_level: str
    extra_args: tuple[str, ...]
    env: tuple[tuple[str, str], ...]  # the pool's own env, applied last (it wins)
    num_kv_blocks: int = 0  # 0: the engine sizes the cache; set by `up --num-kv-blocks`


@dataclass(frozen=True)
class Placement:
    """What a target decides for one worker process: how its group's ranks map to processes,
    and the addresses it gets. Everything else comes from :class:`PoolLaunch`."""

    ranks_per_process: int  # ranks this process starts: a pod's GPUs, 1 per Ray actor, ep locally
    group: int = 0
    rank: int | None = None  # the process's index in its group; None: the target sets it
    rendezvous: str | None = None  # None: the process picks a local port (a one-process group)
    address_args: tuple[str, ...] = ()  # --host / --port / --metrics-port as the target binds
    address_env: tuple[tuple[str, str], ...] = ()  # ports a pod learns from its environment
    target_args: tuple[str, ...] = ()  # flags only this target has (TLS files mounted in pods)
    target_env: tuple[tuple[str, str], ...] = ()  # env only this target needs (cache dirs)


@dataclass(frozen=True)
class WorkerLaunch:
    argv: list[str]  # after the program name: ["worker", "--role", ...]
    env: dict[str, str]
    # Variables the worker takes from the deployment's worker-plane secret (its tokens:
    # moeserve.common.worker_auth). Each target supplies them its own way, never in argv:
    # values it generated (`moeserve up`, Ray) or a secretKeyRef (the operator).
    secret_env: tuple[str, ...] = WORKER_SECRET_ENV


def pool_launch(dep: MoEDeployment, role: Role, model_dir: str,
                num_kv_blocks: int = 0) -> PoolLaunch:  # fmt: skip
    """The spec's part of every launch of ``role``'s workers."""
    pool = dep.spec.pool(role)
    par = pool.parallelism
    return PoolLaunch(
        deployment=dep.name, role=role, model_dir=model_dir,
        served_name=served_model_name(manifest=dep), block_size=dep.spec.model.block_size,
        dp=par.dp, ep=par.ep, tp=par.tp, cpu_only=not pool.gpus_per_pod,
        eplb_enabled=pool.eplb.enabled, eplb_redundant_experts=pool.eplb.redundant_experts,
        dbo_enabled=pool.dbo.enabled, log_level=dep.spec.log_level,
        extra_args=tuple(pool.extra_args), env=tuple((e.name, e.value) for e in pool.env),
        num_kv_blocks=num_kv_blocks,
    )  # fmt: skip


def worker_launch(plan: PoolLaunch, where: Placement) -> WorkerLaunch:
    """`moeserve worker` argv and environment of one worker process (one pod, one actor, one
    child). The pool's ``extraArgs`` come last and its ``env`` last, so the user's values win."""
    argv = ["worker", "--role", plan.role, "--model", plan.model_dir, *where.address_args,
            "--dp", str(plan.dp), "--ep", str(plan.ep), *where.target_args]
    if plan.cpu_only:  # gpusPerPod 0 means the CPU even where a GPU is visible
        argv += ["--device", "cpu"]
    if plan.num_kv_blocks:
        argv += ["--num-kv-blocks", str(plan.num_kv_blocks)]
    argv += plan.extra_args
    return WorkerLaunch(argv, _env(plan, where))


def _env(plan: PoolLaunch, where: Placement) -> dict[str, str]:
    env: dict[str, str] = {}
    if where.rank is not None:
        env[s.ENV_RANK] = str(where.rank)
    env.update({
        s.ENV_WORLD_SIZE: str(plan.ep),
        s.ENV_RANKS_PER_POD: str(where.ranks_per_process),
        s.ENV_NUM_PODS: str(plan.ep // where.ranks_per_process),
        s.ENV_GROUP: str(where.group),
    })
    if where.rendezvous is not None:
        env[s.ENV_RENDEZVOUS] = where.rendezvous
    env.update({
        s.ENV_ROLE: plan.role,
        s.ENV_MODEL: plan.served_name,
        s.ENV_DEPLOYMENT: plan.deployment,
        s.ENV_TP: str(plan.tp),
        s.ENV_BLOCK_SIZE: str(plan.block_size),
        **dict(where.address_env),
        s.ENV_EPLB_ENABLED: str(int(plan.eplb_enabled)),
        s.ENV_EPLB_REDUNDANT_EXPERTS: str(plan.eplb_redundant_experts),
        s.ENV_DBO_ENABLED: str(int(plan.dbo_enabled)),
        s.ENV_LOG_LEVEL: plan.log_level,
        **dict(where.target_env),
    })
    env.update(plan.env)
    return env
