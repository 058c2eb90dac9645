"""One level-based reconcile for a MoEDeployment: parse, render, apply, prune, report status.

Every trigger (create, update, resume, the resync timer, a child deleted or changed) ends here
and recomputes the desired state from the whole object, never from the edge that fired. Nothing
is applied until the whole spec parsed and rendered, so an invalid spec leaves no partial
children: it only sets the Degraded condition (and an Event, posted by the caller). The same
holds for a spec whose pools' GPUs cannot hold the model (the memory plan, reason
InsufficientGPUMemory); a spec that fits reports its plan in the MemoryFits condition.
"""

from __future__ import annotations

import datetime
import threading
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from moeserve.common.spec import (
    API_GROUP,
    API_VERSION,
    KIND_DEPLOYMENT,
    KIND_WORKER_POOL,
    LABEL_COMPONENT,
    LABEL_DEPLOYMENT,
    LABEL_ROLE,
    ROLES,
    MoEDeployment,
    SpecError,
    parse_manifest,
)
from moeserve.operator.build_router import router_endpoint, router_name
from moeserve.operator.build_workers import group_name, pool_name
from moeserve.operator.day2 import Observed, observe
from moeserve.operator.kube import Kube, KubeError
from moeserve.operator.memory_check import MemoryPlanError, PoolMemory, check_memory
from moeserve.operator.render import (
    MANAGED_BY,
    OPTIONAL_KINDS,
    PRUNABLE_KINDS,
    desired_groups,
    render,
)
from moeserve.operator.status import degraded_status, deployment_status, worker_pool_status

__all__ = ["Outcome", "Reconciler", "utc_now"]

OWN_API = f"{API_GROUP}/{API_VERSION}"


def utc_now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


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


def _degraded(status: Mapping[str, Any]) -> tuple[str, str] | None:
    for cond in status.get("conditions") or ():
        if cond.get("type") == "Degraded" and cond.get("status") == "True":
            return cond.get("reason", ""), cond.get("message", "")
    return None


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
            plans = check_memory(dep)
        except MemoryPlanError as exc:
            return self._degrade(body, "InsufficientGPUMemory", str(exc), retry=False)
        except SpecError as exc:
            return self._degrade(body, "InvalidSpec", str(exc), retry=False)
        try:
            groups = self._groups(dep)
            workers = self.kube.list("apps/v1", "StatefulSet", dep.namespace,
                                     {LABEL_DEPLOYMENT: dep.name, LABEL_COMPONENT: "worker"})
            seen = observe(self.kube, dep, groups, workers, body.get("status") or {})
            seen = _with_memory_condition(seen, plans)
            if apply:
                children = render(dep, groups, seen.plans)
                for child in children:
                    self.kube.apply(child)
                self._replace_groups(dep, seen)
                kept = {("StatefulSet", group_name(dep, role, i))
                        for role, plan in seen.plans.items() for i in plan.keep}
                self._prune(dep, children, kept)
            return self._report(dep, body, groups, workers, seen)
        except KubeError as exc:
            return self._degrade(body, "ApplyFailed", str(exc), retry=True)

    def _groups(self, dep: MoEDeployment) -> dict[str, int]:
        """Desired groups per role; autoscaled pools follow their MoEWorkerPool's replicas."""
        pools = self.kube.list(OWN_API, KIND_WORKER_POOL, dep.namespace,
                               {LABEL_DEPLOYMENT: dep.name})
        observed = {}
        for pool in pools:
            role = (pool.get("metadata", {}).get("labels") or {}).get(LABEL_ROLE)
            replicas = (pool.get("spec") or {}).get("replicas")
            if role in ROLES and isinstance(replicas, int):
                observed[role] = replicas
        return {role: desired_groups(dep, role, observed) for role in ROLES}

    def _replace_groups(self, dep: MoEDeployment, seen: Observed) -> None:
        """Groups a roll removes go in the foreground: the StatefulSet stays (terminating,
        holding its slot) until its pods are gone, so a new group of that name never meets
        the old one's pods, and those pods drain on SIGTERM."""
        for role, plan in seen.plans.items():
            for index in plan.delete:
                self.kube.delete("apps/v1", "StatefulSet", dep.namespace,
                                 group_name(dep, role, index), propagation="Foreground")

    def _prune(self, dep: MoEDeployment, children: list[dict[str, Any]],
               kept: set[tuple[str, str]]) -> None:
        keep = {(c["kind"], c["metadata"]["name"]) for c in children} | kept
        labels = {LABEL_DEPLOYMENT: dep.name, "app.kubernetes.io/managed-by": MANAGED_BY}
        for api_version, kind in PRUNABLE_KINDS:
            try:
                found = self.kube.list(api_version, kind, dep.namespace, labels)
            except KubeError as exc:
                if exc.status == 404 and kind in OPTIONAL_KINDS:
                    continue  # that CRD is not installed: nothing to prune
                raise
            for obj in found:
                name = obj["metadata"]["name"]
                if (kind, name) not in keep:
                    self.kube.delete(api_version, kind, dep.namespace, name)

    def _report(self, dep: MoEDeployment, body: Mapping[str, Any], groups: Mapping[str, int],
                workers: list[dict[str, Any]], seen: Observed) -> Outcome:
        previous = body.get("status") or {}
        router = self.kube.get("apps/v1", "Deployment", dep.namespace, router_name(dep))
        status = deployment_status(
            dep, groups, workers, router, router_endpoint(dep),
            previous.get("conditions"), utc_now(), seen.day2,
        ).model_dump(by_alias=True, exclude_none=True)
        for role in ROLES:
            pool_status = worker_pool_status(dep, role, groups[role], workers)
            current = self.kube.get(OWN_API, KIND_WORKER_POOL, dep.namespace,
                                    pool_name(dep, role))
            wanted = pool_status.model_dump(by_alias=True)
            if current is not None and (current.get("status") or {}) != wanted:
                self.kube.patch_status(OWN_API, KIND_WORKER_POOL, dep.namespace,
                                       pool_name(dep, role), wanted)
        if _changed(previous, status):
            self.kube.patch_status(OWN_API, KIND_DEPLOYMENT, dep.namespace, dep.name, status)
        event = seen.warning
        if event is None and _degraded(previous) and seen.day2.degraded is None:
            event = ("Normal", "Reconciled", "the spec is valid again and was applied")
        return Outcome(body=body, status=status, event=event)

    def _degrade(self, body: Mapping[str, Any], reason: str, message: str,
                 retry: bool) -> Outcome:
        meta = body.get("metadata") or {}
        previous = body.get("status") or {}
        status = {**previous, **degraded_status(previous, meta.get("generation"), reason,
                                                message, utc_now())}
        if _changed(previous, status):
            try:
                self.kube.patch_status(OWN_API, KIND_DEPLOYMENT, meta.get("namespace", ""),
                                       meta.get("name", ""), status)
            except KubeError:
                retry = True  # the status itself could not be written; try again later
        event = None if _degraded(previous) == (reason, message) else \
            ("Warning", reason, message)
        return Outcome(body=body, status=status, event=event, retry=retry, error=message)


def _with_memory_condition(seen: Observed, plans: Mapping[str, PoolMemory]) -> Observed:
    """MemoryFits: each planned pool's numbers (none when no pool could be planned)."""
    if all(p.plan is None for p in plans.values()):
        return seen
    text = "; ".join(f"{role}: {p.plan.summary()}" if p.plan else f"{role}: {p.unknown}"
                     for role, p in plans.items())
    day2 = replace(seen.day2, conditions=(*seen.day2.conditions,
                                          ("MemoryFits", True, "Fits", text)))
    return replace(seen, day2=day2)


def _changed(previous: Mapping[str, Any], status: Mapping[str, Any]) -> bool:
    return any(previous.get(k) != v for k, v in status.items())
