"""Status of a MoEDeployment and its MoEWorkerPools, computed from the observed children.

Pure functions over plain dicts: the reconciler lists the children and calls
:func:`deployment_status`; tests call it directly. The pydantic models also generate the status
schemas of the CRDs, so the stored shape and the computed shape cannot drift apart.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

from moeserve.common.spec import (
    LABEL_DEPLOYMENT,
    LABEL_GROUP,
    LABEL_ROLE,
    ROLES,
    MoEDeployment,
    Role,
    pods_per_group,
)

__all__ = ["Day2", "Condition", "PoolStatus",
           "RouterStatus", "DeploymentStatus", "WorkerPoolStatus",
           "deployment_status", "degraded_status", "worker_pool_status", "ready_groups",
           "pool_selector_string"]

Phase = Literal["Pending", "Progressing", "Ready", "Degraded"]


class _Status(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True)


ConditionType = Literal["Ready", "Progressing", "Degraded", "GroupsScheduled", "FabricReady",
                        "MemoryFits"]


class Condition(_Status):
    type: ConditionType
    status: Literal["True", "False", "Unknown"]
    reason: str
    message: str = ""
    last_transition_time: str = Field(description="RFC 3339 time of the last status change.")
    observed_generation: int | None = None


class PoolStatus(_Status):
    desired_groups: int = 0
    ready_groups: int = 0
    revision: str = Field("", description="Pod-template hash the pool rolls to.")
    updated_groups: int = Field(0, description="Groups at `revision` (surge included).")
    updated_ready_groups: int = 0
    current_groups: int = Field(0, description="Groups still at an older revision.")
    progress_time: str = Field("", description="Last time the roll made progress.")


@dataclass(frozen=True)
class Day2:
    """What the reconciler learned beyond the StatefulSets' readiness: per-pool roll state,
    extra conditions (GroupsScheduled, FabricReady) and a Degraded reason (stalled roll)."""

    pools: Mapping[str, PoolStatus]
    conditions: tuple[tuple[str, bool, str, str], ...] = ()  # (type, ok, reason, message)
    degraded: tuple[str, str] | None = None
    rolling: bool = False


class RouterStatus(_Status):
    desired_replicas: int = 0
    ready_replicas: int = 0


class DeploymentStatus(_Status):
    """Observed state of a MoEDeployment."""

    observed_generation: int | None = None
    phase: Phase = "Pending"
    ready: str = Field("", description="Ready EP groups / desired EP groups, both pools.")
    router_endpoint: str = ""
    pools: dict[str, PoolStatus] = Field(default_factory=dict)
    router: RouterStatus = Field(default_factory=RouterStatus)
    conditions: list[Condition] = Field(default_factory=list)


class WorkerPoolStatus(_Status):
    """Observed state of a MoEWorkerPool; ``replicas`` and ``selector`` feed its scale
    subresource."""

    replicas: int = 0
    ready_replicas: int = 0
    selector: str = ""


def pool_selector_string(deployment: str, role: Role) -> str:
    return f"{LABEL_DEPLOYMENT}={deployment},{LABEL_ROLE}={role}"


def _group_ready(sts: Mapping[str, Any], pods: int) -> bool:
    status = sts.get("status") or {}
    return int(status.get("readyReplicas") or 0) >= pods


def ready_groups(dep: MoEDeployment, role: Role, statefulsets: Iterable[Mapping[str, Any]],
                 groups: int) -> int:
    """Groups of ``role`` whose every pod is ready (a partial EP group serves nothing)."""
    pods = pods_per_group(dep.spec.pool(role))
    count = 0
    for sts in statefulsets:
        labels = sts.get("metadata", {}).get("labels") or {}
        if labels.get(LABEL_ROLE) != role:
            continue
        if int(labels.get(LABEL_GROUP, groups)) < groups and _group_ready(sts, pods):
            count += 1
    return count


def _condition(kind: str, ok: bool, reason: str, message: str, generation: int | None,
               previous: Mapping[str, Mapping[str, Any]], now: str) -> Condition:
    value = "True" if ok else "False"
    before = previous.get(kind) or {}
    # Kubernetes convention: the transition time moves only when the status value flips.
    since = before.get("lastTransitionTime") if before.get("status") == value else None
    return Condition(type=kind, status=value, reason=reason, message=message,
                     last_transition_time=since or now, observed_generation=generation)


def _previous(conditions: Iterable[Mapping[str, Any]] | None) -> dict[str, Mapping[str, Any]]:
    return {c.get("type", ""): c for c in conditions or ()}


def deployment_status(dep: MoEDeployment, groups: Mapping[str, int],
                      statefulsets: Iterable[Mapping[str, Any]],
                      router: Mapping[str, Any] | None, endpoint: str,
                      previous_conditions: Iterable[Mapping[str, Any]] | None,
                      now: str, day2: Day2 | None = None) -> DeploymentStatus:
    statefulsets = list(statefulsets)
    pools = {role: PoolStatus(desired_groups=groups[role],
                              ready_groups=ready_groups(dep, role, statefulsets, groups[role]))
             for role in ROLES}
    if day2 is not None:
        pools = {role: day2.pools.get(role, pools[role]) for role in ROLES}
    router_ready = int(((router or {}).get("status") or {}).get("readyReplicas") or 0)
    router_status = RouterStatus(desired_replicas=dep.spec.router.replicas,
                                 ready_replicas=router_ready)
    all_ready = router_ready >= 1 and all(
        p.ready_groups >= p.desired_groups for p in pools.values())
    waiting = [f"{role} {p.ready_groups}/{p.desired_groups} groups"
               for role, p in pools.items() if p.ready_groups < p.desired_groups]
    if router_ready < 1:
        waiting.append("router not ready")
    message = "all groups and the router are ready" if all_ready else \
        "waiting for " + ", ".join(waiting)
    gen = dep.generation
    prev = _previous(previous_conditions)
    rolling = day2 is not None and day2.rolling
    degraded = day2.degraded if day2 is not None else None
    progressing = not all_ready or rolling
    progress_reason = ("RollingUpdate" if rolling else "Reconciling") if progressing else \
        "Complete"
    if rolling and all_ready:
        message = "rolling update: " + ", ".join(
            f"{role} {p.updated_groups - p.updated_ready_groups} new group(s) starting, "
            f"{p.current_groups} old" for role, p in pools.items() if p.current_groups or
            p.updated_groups > p.desired_groups)
    conditions = [
        _condition("Ready", all_ready, "AllReady" if all_ready else "NotReady", message, gen,
                   prev, now),
        _condition("Progressing", progressing, progress_reason, message, gen, prev, now),
        _condition("Degraded", degraded is not None, degraded[0] if degraded else "AsExpected",
                   degraded[1] if degraded else "", gen, prev, now),
    ]
    for kind, ok, reason, text in (day2.conditions if day2 is not None else ()):
        conditions.append(_condition(kind, ok, reason, text, gen, prev, now))
    ready = sum(p.ready_groups for p in pools.values())
    desired = sum(p.desired_groups for p in pools.values())
    phase: Phase = "Degraded" if degraded else "Ready" if all_ready and not rolling else \
        "Progressing"
    return DeploymentStatus(
        observed_generation=gen, phase=phase,
        ready=f"{ready}/{desired}", router_endpoint=endpoint, pools=pools,
        router=router_status, conditions=conditions,
    )


def degraded_status(previous: Mapping[str, Any] | None, generation: int | None, reason: str,
                    message: str, now: str) -> dict[str, Any]:
    """The status patch for a deployment that cannot be reconciled; other fields are kept."""
    prev = _previous((previous or {}).get("conditions"))
    conditions = [
        _condition("Ready", False, reason, message, generation, prev, now),
        _condition("Progressing", False, reason, message, generation, prev, now),
        _condition("Degraded", True, reason, message, generation, prev, now),
    ]
    return {
        "observedGeneration": generation,
        "phase": "Degraded",
        "conditions": [c.model_dump(by_alias=True, exclude_none=True) for c in conditions],
    }


def worker_pool_status(dep: MoEDeployment, role: Role, groups: int,
                       statefulsets: Iterable[Mapping[str, Any]]) -> WorkerPoolStatus:
    return WorkerPoolStatus(replicas=groups,
                            ready_replicas=ready_groups(dep, role, statefulsets, groups),
                            selector=pool_selector_string(dep.name, role))
