"""Conditions read from the cluster beyond the groups' readiness, as pure functions of what
``observe`` read: GroupsScheduled (why a gang is not placed, from its PodGroup and pods),
FabricReady (the preflight's results in the pods' termination messages) and MemoryFits (the
memory plan of the pools). Each is (type, ok, reason, message); ``status`` turns them into
conditions.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any

from moeserve.common import spec as s
from moeserve.common.spec import MoEDeployment
from moeserve.operator.build_preflight import PREFLIGHT_CONTAINER
from moeserve.operator.memory_check import PoolMemory
from moeserve.operator.observe import Observed

__all__ = ["ConditionTuple", "gang_problem", "scheduled_condition", "fabric_condition",
           "memory_condition"]

ConditionTuple = tuple[str, bool, str, str]


def _pod_group_problem(pod_group: Mapping[str, Any] | None) -> str | None:
    status = (pod_group or {}).get("status") or {}
    for cond in status.get("conditions") or ():
        # Volcano: type Unschedulable with the scheduler's reason and message.
        if cond.get("type") == "Unschedulable" and cond.get("status") == "True":
            return f"{cond.get('reason', 'Unschedulable')}: {cond.get('message', '')}".strip()
    phase = status.get("phase")
    if phase in ("Pending", "PreScheduling", "Scheduling", "Inqueue"):
        placed = status.get("scheduled", status.get("running", 0))
        want = ((pod_group or {}).get("spec") or {}).get("minMember", "?")
        return f"PodGroup {phase}: {placed}/{want} members scheduled"
    return None


def _pod_problem(pod: Mapping[str, Any]) -> str | None:
    spec, status = pod.get("spec") or {}, pod.get("status") or {}
    name = (pod.get("metadata") or {}).get("name", "?")
    if spec.get("schedulingGates"):
        gates = ", ".join(g.get("name", "?") for g in spec["schedulingGates"])
        return f"pod {name} gated ({gates})"
    for cond in status.get("conditions") or ():
        if cond.get("type") == "PodScheduled" and cond.get("status") == "False":
            return f"pod {name}: {cond.get('reason', 'Unschedulable')}: " \
                   f"{cond.get('message', '')}".strip()
    return None


def gang_problem(pod_group: Mapping[str, Any] | None,
                 pods: Iterable[Mapping[str, Any]]) -> str | None:
    """The scheduler's reason a group is not placed: its PodGroup's status first (it speaks
    for the whole gang), else the first pod that says PodScheduled=False or is gated."""
    found = _pod_group_problem(pod_group)
    if found:
        return found
    for pod in sorted(pods, key=lambda p: (p.get("metadata") or {}).get("name", "")):
        found = _pod_problem(pod)
        if found:
            return found
    return None


def scheduled_condition(dep: MoEDeployment, observed: Observed) -> ConditionTuple:
    """GroupsScheduled: False with the scheduler's reason for every group that is still not
    ready past its pool's scheduleTimeoutSeconds and whose pods the scheduler has not placed."""
    problems = []
    for late in observed.late:
        mine = [p for p in observed.pods
                if (p.get("metadata") or {}).get("name", "").rsplit("-", 1)[0] == late.name]
        reason = gang_problem(observed.pod_groups.get(late.name), mine)
        if reason:
            # The timeout, not the age: a message that changes every pass rewrites status.
            timeout = dep.spec.pool(late.role).scheduling.schedule_timeout_seconds
            problems.append(f"group {late.name} not placed within {timeout}s: {reason}")
    if not problems:
        return ("GroupsScheduled", True, "AllPlaced", "")
    return ("GroupsScheduled", False, "Unschedulable", "; ".join(problems))


def _result(terminated: Mapping[str, Any] | None) -> tuple[int, dict[str, Any] | None] | None:
    if not terminated:
        return None
    data = None
    try:
        data = json.loads(terminated.get("message") or "").get(s.PREFLIGHT_RESULT_KEY)
    except (ValueError, AttributeError):
        pass
    return int(terminated.get("exitCode", 1)), data


def _describe(pod: str, data: Mapping[str, Any] | None, code: int) -> str:
    if data is None:
        return f"{pod}: preflight exited {code} without a result"
    nums = f"all-to-all {data.get('all_to_all_gbps')} GB/s, NIXL {data.get('nixl_gbps')} GB/s"
    problems = "; ".join(data.get("problems") or ()) or "ok"
    return f"{pod}: {nums} ({problems})"


def fabric_condition(dep: MoEDeployment, pods: Iterable[Mapping[str, Any]]
                     ) -> ConditionTuple | None:
    """FabricReady over the pods of pools with a preflight; None when no pool has one."""
    roles = {r for r in s.ROLES if dep.spec.pool(r).preflight.enabled}
    if not roles:
        return None
    failed, passed, pending = [], [], []
    for pod in sorted(pods, key=lambda p: (p.get("metadata") or {}).get("name", "")):
        meta = pod.get("metadata") or {}
        if (meta.get("labels") or {}).get(s.LABEL_ROLE) not in roles:
            continue
        name = meta.get("name", "?")
        status = next((c for c in (pod.get("status") or {}).get("initContainerStatuses") or ()
                       if c.get("name") == PREFLIGHT_CONTAINER), {})
        now = _result((status.get("state") or {}).get("terminated"))
        last = _result((status.get("lastState") or {}).get("terminated"))
        if now is not None and now[0] == 0:
            passed.append(_describe(name, now[1], 0))
        elif now is not None or last is not None:
            code, data = now if now is not None else last  # type: ignore[misc]
            failed.append(_describe(name, data, code))
        else:
            pending.append(name)
    if failed:
        return ("FabricReady", False, "PreflightFailed", "; ".join(failed))
    if pending or not passed:
        return ("FabricReady", False, "Pending",
                "preflight running on " + (", ".join(pending) or "no pod yet"))
    return ("FabricReady", True, "Passed", "; ".join(passed))


def memory_condition(plans: Mapping[str, PoolMemory]) -> ConditionTuple | None:
    """MemoryFits: each planned pool's numbers (None when no pool could be planned)."""
    if all(p.plan is None for p in plans.values()):
        return None
    text = "; ".join(f"{role}: {p.plan.summary()}" if p.plan else f"{role}: {p.unknown}"
                     for role, p in plans.items())
    return ("MemoryFits", True, "Fits", text)
