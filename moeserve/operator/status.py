"""Status of a MoEDeployment and its MoEWorkerPools, computed from what was observed and planned.

The last stage of the reconcile (observe -> plan -> render -> apply -> status). Pure functions
over plain values: :func:`day2_status` sums up the plan and the observed conditions,
:func:`deployment_status` adds the groups' and the router's readiness; the reconciler writes the
result, tests call them directly. The pydantic models also generate the status schemas of the
CRDs, so the stored shape and the computed shape cannot drift apart.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

from moeserve.common.spec import (
    LABEL_DEPLOYMENT,
    LABEL_ROLE,
    ROLES,
    MoEDeployment,
    Role,
)
from moeserve.operator.meta import format_time
from moeserve.operator.observe import ready_groups, ready_replicas
from moeserve.operator.rollout import GroupState, PoolPlan, Progress

if TYPE_CHECKING:
    from moeserve.operator.conditions import ConditionTuple
    from moeserve.operator.plan import Plan

__all__ = ["Day2", "Condition", "PoolStatus",
           "RouterStatus", "DeploymentStatus", "WorkerPoolStatus", "day2_status",
           "deployment_status", "degraded_status", "worker_pool_status", "degraded_condition",
           "reconcile_event", "pool_selector_string"]

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


def _pool_status(plan: PoolPlan, desired: int, states: Sequence[GroupState],
                 progress: Progress) -> PoolStatus:
    live = [g for g in states if not g.terminating]
    updated = [g for g in live if g.revision == plan.revision]
    return PoolStatus(
        desired_groups=desired, ready_groups=sum(g.ready for g in live),
        revision=plan.revision, updated_groups=len(updated),
        updated_ready_groups=sum(g.ready for g in updated),
        current_groups=sum(g.revision != plan.revision for g in states),
        progress_time=format_time(progress.progress_time))


def day2_status(plan: Plan, conditions: Iterable[ConditionTuple | None]) -> Day2:
    """The roll state of each pool, the stalled roll's Degraded reason, and the conditions
    computed from the cluster (``conditions``: None entries are left out)."""
    pools = {role: _pool_status(plan.pools[role], plan.groups[role], plan.states[role],
                                plan.progress[role]) for role in ROLES}
    return Day2(pools=pools, conditions=tuple(c for c in conditions if c is not None),
                degraded=plan.degraded, rolling=plan.rolling)


def degraded_condition(status: Mapping[str, Any]) -> tuple[str, str] | None:
    """(reason, message) of a status whose Degraded condition is True."""
    for cond in status.get("conditions") or ():
        if cond.get("type") == "Degraded" and cond.get("status") == "True":
            return cond.get("reason", ""), cond.get("message", "")
    return None


def reconcile_event(previous: Mapping[str, Any],
                    degraded: tuple[str, str] | None) -> tuple[str, str, str] | None:
    """The Event a reconcile posts: a Warning when a new Degraded reason appears, a Normal one
    when a deployment that was Degraded no longer is; None otherwise, so resyncs do not spam."""
    prior = degraded_condition(previous)
    if degraded is not None:
        return None if prior is not None and prior[0] == degraded[0] else ("Warning", *degraded)
    if prior is not None:
        return ("Normal", "Reconciled", "the spec is valid again and was applied")
    return None


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
    router_ready = ready_replicas(router)
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
