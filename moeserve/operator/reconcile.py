"""One level-based reconcile for a MoEDeployment: the stages, in order, and their triggers.

observe (``observe``: the cluster's state, read once) -> plan (``plan``: sizes and the roll) ->
render (``render``: pure builders) -> apply (``apply``: server-side apply, replace, prune) ->
status (``status``: computed, then written by ``apply``).

Every trigger (create, update, resume, the resync timer, a child deleted or changed) ends here
and recomputes the desired state from the whole object, never from the edge that fired. Nothing
is applied until the whole spec parsed and rendered, so an invalid spec leaves no partial
children: it only sets the Degraded condition (and an Event, posted by the caller). The same
holds for a spec whose pools' GPUs cannot hold the model (the memory plan, reason
InsufficientGPUMemory); a spec that fits reports its plan in the MemoryFits condition.
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from moeserve.common.spec import (
    LABEL_DEPLOYMENT,
    ROLES,
    MoEDeployment,
    SpecError,
    parse_manifest,
)
from moeserve.operator.apply import apply_children, write_pool_status, write_status
from moeserve.operator.build_groups import pool_templates
from moeserve.operator.build_security import plane_generation
from moeserve.operator.conditions import (
    fabric_condition,
    memory_condition,
    scheduled_condition,
)
from moeserve.operator.kube import Kube, KubeError
from moeserve.operator.memory_check import MemoryPlanError, PoolMemory, check_memory
from moeserve.operator.meta import format_time, router_endpoint, router_name
from moeserve.operator.observe import Observed, observe
from moeserve.operator.plan import Plan, make_plan
from moeserve.operator.render import render
from moeserve.operator.status import (
    day2_status,
    degraded_condition,
    degraded_status,
    deployment_status,
    reconcile_event,
    worker_pool_status,
)

__all__ = ["Outcome", "Reconciler", "utc_now"]


def utc_now() -> str:
    return format_time(time.time())


@dataclass(frozen=True)
class Outcome:
    """What a reconcile did. ``event`` is (type, reason, message) when the caller should post
    one (only on a change of the Degraded condition, so resyncs do not spam); ``retry`` says
    the failure is transient."""

    body: Mapping[str, Any]
    status: Mapping[str, Any]
    event: tuple[str, str, str] | None = None
    retry: bool = False
    error: str | None = None


class Reconciler:
    def __init__(self, kube: Kube):
        self.kube = kube
        self._guard = threading.Lock()
        # Timer, change handlers and child watches may fire together for one deployment.
        self._locks: dict[tuple[str, str], threading.Lock] = defaultdict(threading.Lock)
        self._queued: dict[tuple[str, str], set[str]] = defaultdict(set)
        # Last status seen per child, so that events which change nothing cost nothing.
        self._seen: dict[tuple[str, str, str], tuple[Any, Any]] = {}

    def _lock(self, namespace: str, name: str) -> threading.Lock:
        with self._guard:
            return self._locks[(namespace, name)]

    def reconcile(self, body: Mapping[str, Any]) -> Outcome | None:
        """Reconcile the object ``body`` names. It is read again first: a timer's or a queued
        handler's body may be older than a change already applied, and applying it would undo
        that change for a moment."""
        meta = body.get("metadata") or {}
        return self.reconcile_by_name(meta.get("namespace", ""), meta.get("name", ""))

    def child_changed(self, kind: str, body: Mapping[str, Any], deleted: bool) -> Outcome | None:
        """React to a watch event of a child: re-create it if deleted, else refresh the owner's
        status, but only when the child's status (what status is computed from) moved."""
        meta = body.get("metadata") or {}
        owner = (meta.get("labels") or {}).get(LABEL_DEPLOYMENT)
        namespace = meta.get("namespace")
        if not owner or not namespace:
            return None
        key = (kind, namespace, meta.get("name", ""))
        seen = (body.get("status"), (body.get("spec") or {}).get("replicas"))
        with self._guard:
            unchanged = not deleted and self._seen.get(key) == seen
            if deleted:
                self._seen.pop(key, None)
            else:
                self._seen[key] = seen
        if unchanged:
            return None
        return self.reconcile_by_name(namespace, owner, apply=deleted)

    def reconcile_by_name(self, namespace: str, name: str, apply: bool = True) -> Outcome | None:
        """Re-fetch and reconcile; None when the deployment is gone or being deleted, or when
        an equal or fuller run is already queued (it will read the newest state anyway, so a
        burst of child events costs one run, not one per event)."""
        mode = "apply" if apply else "status"
        with self._guard:
            queued = self._queued[(namespace, name)]
            if mode in queued or "apply" in queued:
                return None
            queued.add(mode)
        with self._lock(namespace, name):
            with self._guard:
                queued.discard(mode)
            body = self.kube.get_deployment(namespace, name)
            if body is None or body.get("metadata", {}).get("deletionTimestamp"):
                return None
            return self._reconcile(body, apply=apply)

    def _reconcile(self, body: Mapping[str, Any], apply: bool) -> Outcome:
        try:
            dep = parse_manifest(body)
            memory = check_memory(dep)
            plane_generation(dep)  # a bad rotation annotation: InvalidSpec, naming it
        except MemoryPlanError as exc:
            return self._degrade(body, "InsufficientGPUMemory", str(exc), retry=False)
        except SpecError as exc:
            return self._degrade(body, "InvalidSpec", str(exc), retry=False)
        try:
            seen = observe(self.kube, dep, body.get("status") or {})
            # The pod templates are rendered once: the plan takes their revisions, the
            # render the groups themselves.
            templates = pool_templates(dep)
            plan = make_plan(dep, seen, templates)
            if apply:
                children = render(dep, plan.groups, plan.pools, templates)
                apply_children(self.kube, dep, children, plan.pools)
            return self._report(dep, body, seen, plan, memory)
        except KubeError as exc:
            return self._degrade(body, "ApplyFailed", str(exc), retry=True)

    def _report(self, dep: MoEDeployment, body: Mapping[str, Any], seen: Observed, plan: Plan,
                memory: Mapping[str, PoolMemory]) -> Outcome:
        previous = body.get("status") or {}
        preflight = any(dep.spec.pool(role).preflight.enabled for role in ROLES)
        day2 = day2_status(plan, (scheduled_condition(dep, seen),
                                  fabric_condition(dep, seen.pods) if preflight else None,
                                  memory_condition(memory)))
        # Read after apply: on the first pass the router Deployment and the pools exist only now.
        router = self.kube.get("apps/v1", "Deployment", dep.namespace, router_name(dep))
        status = deployment_status(
            dep, plan.groups, seen.workers, router, router_endpoint(dep),
            previous.get("conditions"), utc_now(), day2,
        ).model_dump(by_alias=True, exclude_none=True)
        for role in ROLES:
            write_pool_status(self.kube, dep, role,
                              worker_pool_status(dep, role, plan.groups[role], seen.workers))
        write_status(self.kube, dep.namespace, dep.name, previous, status)
        return Outcome(body=body, status=status, event=reconcile_event(previous, day2.degraded))

    def _degrade(self, body: Mapping[str, Any], reason: str, message: str,
                 retry: bool) -> Outcome:
        meta = body.get("metadata") or {}
        previous = body.get("status") or {}
        status = {**previous, **degraded_status(previous, meta.get("generation"), reason,
                                                message, utc_now())}
        try:
            write_status(self.kube, meta.get("namespace", ""), meta.get("name", ""), previous,
                         status)
        except KubeError:
            retry = True  # the status itself could not be written; try again later
        event = None if degraded_condition(previous) == (reason, message) else \
            ("Warning", reason, message)
        return Outcome(body=body, status=status, event=event, retry=retry, error=message)
