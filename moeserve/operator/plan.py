"""Day-2 state of one deployment, read from the cluster: roll plans, progress deadlines and
unplaced gangs. The decisions are the pure functions of ``rollout`` and ``build_gang``; this
module gathers their inputs (StatefulSets, the previous status, pods of late groups) and turns
their outputs into the status and conditions the reconciler reports."""

from __future__ import annotations

import calendar
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from moeserve.common import spec as s
from moeserve.common.spec import ROLES, MoEDeployment, Role
from moeserve.operator.build_gang import POD_GROUP_API, gang_problem
from moeserve.operator.build_groups import compat_key, group_states, pool_revision
from moeserve.operator.build_lws import LWS_API, LWS_KIND, lws_ready_groups
from moeserve.operator.build_preflight import fabric_condition
from moeserve.operator.build_workers import pool_name
from moeserve.operator.kube import Kube, KubeError
from moeserve.operator.rollout import (
    GroupState,
    PoolPlan,
    Progress,
    plan_rollout,
    track_progress,
)
from moeserve.operator.status import Day2, PoolStatus

__all__ = ["Observed", "observe", "parse_time", "format_time"]


def parse_time(text: str | None) -> float | None:
    if not text:
        return None
    try:
        return float(calendar.timegm(time.strptime(text, "%Y-%m-%dT%H:%M:%SZ")))
    except ValueError:
        return None


def format_time(epoch: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))


@dataclass(frozen=True)
class Observed:
    plans: dict[Role, PoolPlan]
    day2: Day2
    # (type, reason, message) when a new Degraded reason appears (posted once as an Event).
    warning: tuple[str, str, str] | None = None


def _previous_progress(previous: Mapping[str, Any], role: Role) -> Progress | None:
    pool = ((previous.get("pools") or {}).get(role)) or {}
    since = parse_time(pool.get("progressTime"))
    if since is None or not pool.get("revision"):
        return None
    marker = f"{pool.get('updatedReadyGroups', 0)}/{pool.get('currentGroups', 0)}"
    return Progress(pool["revision"], since, marker)


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


def observe(kube: Kube, dep: MoEDeployment, desired: Mapping[Role, int],
            workers: Sequence[Mapping[str, Any]], previous: Mapping[str, Any],
            now: float | None = None) -> Observed:
    now = time.time() if now is None else now
    states = {role: group_states(dep, role, workers) for role in ROLES}
    revisions = {role: pool_revision(dep, role) for role in ROLES}
    lws = [role for role in ROLES if dep.spec.pool(role).workload == "lws"]
    for role in lws:  # LWS rolls its groups itself: the planner only sees them for pairing
        ready = lws_ready_groups(kube.get(LWS_API, LWS_KIND, dep.namespace,
                                          pool_name(dep, role)))
        states[role] = [GroupState(i, revisions[role], i < ready, compat=compat_key(dep))
                        for i in range(desired[role])]
    specs = {role: dep.spec.pool(role).rollout for role in ROLES}
    plans = plan_rollout(desired, revisions, states, specs)
    progress = {role: track_progress(_previous_progress(previous, role), plans[role],
                                     states[role], now,
                                     specs[role].progress_deadline_seconds) for role in ROLES}
    stalled = [role for role in ROLES if progress[role].stalled]
    degraded = None
    if stalled:
        plans = plan_rollout(desired, revisions, states, specs, frozen=stalled)
        degraded = ("ProgressDeadlineExceeded", "; ".join(
            f"{role}: roll to revision {plans[role].revision} made no progress for "
            f"{specs[role].progress_deadline_seconds}s ({plans[role].waiting or 'stalled'})"
            for role in stalled))
    for role in lws:
        plans[role] = PoolPlan(role=role, revision=revisions[role], apply=())
    pools = {role: _pool_status(plans[role], desired[role], states[role], progress[role])
             for role in ROLES}
    conditions = [_scheduled_condition(kube, dep, workers, now)]
    if any(dep.spec.pool(role).preflight.enabled for role in ROLES):
        pods = kube.list("v1", "Pod", dep.namespace, {s.LABEL_DEPLOYMENT: dep.name})
        fabric = fabric_condition(dep, pods)
        if fabric is not None:
            conditions.append(fabric)
    prior = _degraded_reason(previous)
    warning = ("Warning", *degraded) if degraded and prior != degraded[0] else None
    return Observed(plans=plans, day2=Day2(
        pools=pools, conditions=tuple(conditions), degraded=degraded,
        rolling=any(p.rolling for p in plans.values())), warning=warning)


def _degraded_reason(previous: Mapping[str, Any]) -> str | None:
    for cond in previous.get("conditions") or ():
        if cond.get("type") == "Degraded" and cond.get("status") == "True":
            return cond.get("reason")
    return None


def _late_groups(dep: MoEDeployment, workers: Sequence[Mapping[str, Any]],
                 now: float) -> list[tuple[Role, str, float]]:
    late = []
    for sts in workers:
        meta = sts.get("metadata") or {}
        labels = meta.get("labels") or {}
        role = labels.get(s.LABEL_ROLE)
        if role not in ROLES or meta.get("deletionTimestamp"):
            continue
        pool = dep.spec.pool(role)
        ready = int((sts.get("status") or {}).get("readyReplicas") or 0)
        created = parse_time(meta.get("creationTimestamp")) or now
        age = now - created
        if ready < s.pods_per_group(pool) and age > pool.scheduling.schedule_timeout_seconds:
            late.append((role, meta.get("name", ""), age))
    return late


def _scheduled_condition(kube: Kube, dep: MoEDeployment, workers: Sequence[Mapping[str, Any]],
                         now: float) -> tuple[str, bool, str, str]:
    """GroupsScheduled: False with the scheduler's reason for every group that is still not
    ready past its pool's scheduleTimeoutSeconds and whose pods the scheduler has not placed."""
    late = _late_groups(dep, workers, now)
    if not late:
        return ("GroupsScheduled", True, "AllPlaced", "")
    pods = kube.list("v1", "Pod", dep.namespace, {s.LABEL_DEPLOYMENT: dep.name})
    problems = []
    for role, name, _age in late:
        pod_group = None
        gang = dep.spec.pool(role).scheduling.gang
        if gang in POD_GROUP_API:
            try:
                pod_group = kube.get(*POD_GROUP_API[gang], dep.namespace, name)
            except KubeError:
                pod_group = None  # the PodGroup CRD may be missing: pods still tell why
        mine = [p for p in pods if (p.get("metadata") or {}).get("name", "").rsplit("-", 1)[0]
                == name]
        reason = gang_problem(pod_group, mine)
        if reason:
            # The timeout, not the age: a message that changes every pass rewrites status.
            timeout = dep.spec.pool(role).scheduling.schedule_timeout_seconds
            problems.append(f"group {name} not placed within {timeout}s: {reason}")
    if not problems:
        return ("GroupsScheduled", True, "AllPlaced", "")
    return ("GroupsScheduled", False, "Unschedulable", "; ".join(problems))
