"""Observe: one deployment's cluster state, read once per reconcile into a plain value.

The first stage of the reconcile (observe -> plan -> render -> apply -> status). Everything the
later stages decide from comes from here: the pools' sizes as an HPA or the SLA planner wrote
them, the worker StatefulSets, LeaderWorkerSet readiness, and, only when a condition needs them,
the pods and PodGroups of groups that are late to be placed. The readiness of an EP group is
defined here once (:func:`group_ready`): a group serves only when every one of its pods is ready.

The readers are pure functions over plain dicts; only :func:`observe` talks to the API (and
imports the client lazily, so ``render`` and ``status`` stay free of the Kubernetes client).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from moeserve.common.spec import (
    KIND_WORKER_POOL,
    LABEL_COMPONENT,
    LABEL_DEPLOYMENT,
    LABEL_GROUP,
    LABEL_ROLE,
    ROLES,
    MoEDeployment,
    Role,
    pods_per_group,
)
from moeserve.operator.meta import (
    COMPAT_LABEL,
    LWS_API,
    LWS_KIND,
    OWN_API,
    POD_GROUP_API,
    REVISION_LABEL,
    parse_time,
    pool_name,
)
from moeserve.operator.rollout import GroupState

if TYPE_CHECKING:
    from moeserve.operator.kube import Kube

__all__ = ["Observed", "LateGroup", "observe", "ready_replicas", "group_ready", "group_states",
           "late_groups", "ready_groups"]


@dataclass(frozen=True)
class LateGroup:
    """A group still not ready past its pool's scheduleTimeoutSeconds."""

    role: Role
    name: str
    age_s: float


@dataclass(frozen=True)
class Observed:
    """What one reconcile knows of the cluster. ``pods`` is empty unless a late group or a
    preflight needs them; ``pod_groups`` holds the PodGroup of each late group with one."""

    previous: Mapping[str, Any]  # the deployment's status as last written
    pool_replicas: dict[str, int]  # role -> MoEWorkerPool spec.replicas
    workers: list[dict[str, Any]]  # the worker StatefulSets
    now: float
    lws_ready: dict[str, int] = field(default_factory=dict)  # role -> ready groups (LWS pools)
    late: tuple[LateGroup, ...] = ()
    pods: list[dict[str, Any]] = field(default_factory=list)
    pod_groups: dict[str, dict[str, Any] | None] = field(default_factory=dict)


def ready_replicas(obj: Mapping[str, Any] | None) -> int:
    return int(((obj or {}).get("status") or {}).get("readyReplicas") or 0)


def group_ready(sts: Mapping[str, Any], pods: int) -> bool:
    """The one readiness rule: a group serves only when all ``pods`` of it are ready (the ranks
    of a partial EP group wait at the collective and serve nothing)."""
    return ready_replicas(sts) >= pods


def _role_groups(statefulsets: Iterable[Mapping[str, Any]], role: Role
                 ) -> Iterable[tuple[Mapping[str, Any], Mapping[str, str]]]:
    for sts in statefulsets:
        meta = sts.get("metadata") or {}
        labels = meta.get("labels") or {}
        if labels.get(LABEL_ROLE) == role:
            yield sts, labels


def group_states(dep: MoEDeployment, role: Role,
                 statefulsets: Iterable[Mapping[str, Any]]) -> list[GroupState]:
    """What the roll planner needs from the cluster's StatefulSets of one pool."""
    pods = pods_per_group(dep.spec.pool(role))
    out = []
    for sts, labels in _role_groups(statefulsets, role):
        if not str(labels.get(LABEL_GROUP, "")).isdigit():
            continue
        out.append(GroupState(index=int(labels[LABEL_GROUP]),
                              revision=labels.get(REVISION_LABEL, ""),
                              ready=group_ready(sts, pods),
                              terminating=bool(sts["metadata"].get("deletionTimestamp")),
                              compat=labels.get(COMPAT_LABEL, "")))
    return sorted(out, key=lambda g: g.index)


def ready_groups(dep: MoEDeployment, role: Role, statefulsets: Iterable[Mapping[str, Any]],
                 groups: int) -> int:
    """Ready groups of ``role`` among slots below ``groups`` (surge and pruned slots do not
    count toward the desired size)."""
    pods = pods_per_group(dep.spec.pool(role))
    return sum(int(labels.get(LABEL_GROUP, groups)) < groups and group_ready(sts, pods)
               for sts, labels in _role_groups(statefulsets, role))


def late_groups(dep: MoEDeployment, statefulsets: Iterable[Mapping[str, Any]],
                now: float) -> tuple[LateGroup, ...]:
    late = []
    for sts in statefulsets:
        meta = sts.get("metadata") or {}
        role = (meta.get("labels") or {}).get(LABEL_ROLE)
        if role not in ROLES or meta.get("deletionTimestamp"):
            continue
        pool = dep.spec.pool(role)
        age = now - (parse_time(meta.get("creationTimestamp")) or now)
        if not group_ready(sts, pods_per_group(pool)) and \
                age > pool.scheduling.schedule_timeout_seconds:
            late.append(LateGroup(role, meta.get("name", ""), age))
    return tuple(late)


def _pool_replicas(pools: Sequence[Mapping[str, Any]]) -> dict[str, int]:
    observed = {}
    for pool in pools:
        role = (pool.get("metadata", {}).get("labels") or {}).get(LABEL_ROLE)
        replicas = (pool.get("spec") or {}).get("replicas")
        if role in ROLES and isinstance(replicas, int):
            observed[role] = replicas
    return observed


def observe(kube: Kube, dep: MoEDeployment, previous: Mapping[str, Any],
            now: float | None = None) -> Observed:
    """Read the deployment's state. Pods are listed only when a condition is computed from
    them (a late group, a pool with a preflight): on a large cluster that list is the costly
    read."""
    from moeserve.operator.kube import KubeError

    now = time.time() if now is None else now
    pools = kube.list(OWN_API, KIND_WORKER_POOL, dep.namespace, {LABEL_DEPLOYMENT: dep.name})
    workers = kube.list("apps/v1", "StatefulSet", dep.namespace,
                        {LABEL_DEPLOYMENT: dep.name, LABEL_COMPONENT: "worker"})
    # LWS rolls its groups itself: the planner only sees them for pairing.
    lws_ready = {role: ready_replicas(kube.get(LWS_API, LWS_KIND, dep.namespace,
                                               pool_name(dep, role)))
                 for role in ROLES if dep.spec.pool(role).workload == "lws"}
    late = late_groups(dep, workers, now)
    preflight = any(dep.spec.pool(role).preflight.enabled for role in ROLES)
    pods = kube.list("v1", "Pod", dep.namespace, {LABEL_DEPLOYMENT: dep.name}) \
        if late or preflight else []
    pod_groups: dict[str, dict[str, Any] | None] = {}
    for group in late:
        gang = dep.spec.pool(group.role).scheduling.gang
        if gang in POD_GROUP_API:
            try:
                pod_groups[group.name] = kube.get(*POD_GROUP_API[gang], dep.namespace,
                                                  group.name)
            except KubeError:
                pod_groups[group.name] = None  # the PodGroup CRD may be missing
    return Observed(previous=previous, pool_replicas=_pool_replicas(pools), workers=workers,
                    now=now, lws_ready=lws_ready, late=late, pods=pods, pod_groups=pod_groups)

