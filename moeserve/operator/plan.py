"""Plan: what to run now, decided from the observed state and the spec. Pure functions.

The second stage of the reconcile (observe -> plan -> render -> apply -> status). Two decisions:
each pool's size in EP groups (:func:`desired_groups`: the spec's, or what an HPA or the SLA
planner wrote, within bounds; the SLA planner itself is ``planner``/``autoscale``), and the roll
plan (``rollout.plan_rollout``, group by group, decode first) with its progress deadline: a roll
that made no progress for ``progressDeadlineSeconds`` is frozen and reported as Degraded.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from moeserve.common.spec import ROLES, MoEDeployment, Role
from moeserve.operator.meta import parse_time
from moeserve.operator.observe import group_states
from moeserve.operator.rollout import (
    GroupState,
    PoolPlan,
    Progress,
    plan_rollout,
    track_progress,
)

if TYPE_CHECKING:
    from moeserve.operator.build_groups import PoolTemplate
    from moeserve.operator.observe import Observed

__all__ = ["Plan", "desired_groups", "make_plan"]


def desired_groups(dep: MoEDeployment, role: Role, observed: Mapping[str, int] | None) -> int:
    """EP groups to run: the spec's, or the HPA's or SLA planner's (clamped to its bounds)."""
    pool = dep.spec.pool(role)
    scaling = pool.autoscaling
    sla = dep.spec.autoscaling
    if sla.mode == "sla":
        # The SLA planner owns the size through the MoEWorkerPool (0 when scaled to zero).
        low, high = (sla.min_prefill, sla.max_prefill) if role == "prefill" else \
            (sla.min_decode, sla.max_decode)
        low = 0 if sla.scale_to_zero.enabled else low
        current = (observed or {}).get(role, pool.replicas)
        return min(max(current, low), high)
    if not scaling.enabled:
        return pool.replicas
    current = (observed or {}).get(role, pool.replicas)
    return min(max(current, scaling.min_replicas), scaling.max_replicas)


@dataclass(frozen=True)
class Plan:
    """The decisions of one reconcile, per role: groups to run, the roll plan, the groups as
    the planner saw them and the roll's progress; ``degraded`` is (reason, message) when a
    roll is past its progress deadline."""

    groups: dict[str, int]
    pools: dict[str, PoolPlan]
    states: dict[str, list[GroupState]]
    progress: dict[str, Progress]
    degraded: tuple[str, str] | None = None

    @property
    def rolling(self) -> bool:
        return any(p.rolling for p in self.pools.values())


def _previous_progress(previous: Mapping[str, Any], role: Role) -> Progress | None:
    pool = ((previous.get("pools") or {}).get(role)) or {}
    since = parse_time(pool.get("progressTime"))
    if since is None or not pool.get("revision"):
        return None
    marker = f"{pool.get('updatedReadyGroups', 0)}/{pool.get('currentGroups', 0)}"
    return Progress(pool["revision"], since, marker)


def make_plan(dep: MoEDeployment, observed: Observed,
              templates: Mapping[str, PoolTemplate]) -> Plan:
    """``templates`` (``build_groups.pool_templates``) give each pool's target revision and
    the compatibility key."""
    revisions = {role: templates[role].revision for role in ROLES}
    groups = {role: desired_groups(dep, role, observed.pool_replicas) for role in ROLES}
    states = {role: group_states(dep, role, observed.workers) for role in ROLES}
    lws = [role for role in ROLES if dep.spec.pool(role).workload == "lws"]
    for role in lws:  # LWS rolls its groups itself: the planner only sees them for pairing
        ready = observed.lws_ready.get(role, 0)
        states[role] = [GroupState(i, revisions[role], i < ready,
                                   compat=templates[role].compat)
                        for i in range(groups[role])]
    specs = {role: dep.spec.pool(role).rollout for role in ROLES}
    plans = plan_rollout(groups, revisions, states, specs)
    progress = {role: track_progress(_previous_progress(observed.previous, role), plans[role],
                                     states[role], observed.now,
                                     specs[role].progress_deadline_seconds) for role in ROLES}
    stalled = [role for role in ROLES if progress[role].stalled]
    degraded = None
    if stalled:
        plans = plan_rollout(groups, revisions, states, specs, frozen=stalled)
        degraded = ("ProgressDeadlineExceeded", "; ".join(
            f"{role}: roll to revision {plans[role].revision} made no progress for "
            f"{specs[role].progress_deadline_seconds}s ({plans[role].waiting or 'stalled'})"
            for role in stalled))
    for role in lws:
        plans[role] = PoolPlan(role=role, revision=revisions[role], apply=())
    return Plan(groups=groups, pools=plans, states=states, progress=progress, degraded=degraded)
