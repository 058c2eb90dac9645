"""Apply: the rendered children and the computed status written to the cluster.

The fourth stage of the reconcile (observe -> plan -> render -> apply -> status). Children go
by server-side apply with the one field manager (``kube.Kube.apply``); groups a roll replaces
are deleted in the foreground; owned objects of the prunable kinds that the render no longer
produces are deleted. Status is patched only where it changed, so a resync of a steady
deployment writes nothing.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from moeserve.common.spec import KIND_DEPLOYMENT, KIND_WORKER_POOL, LABEL_DEPLOYMENT, MoEDeployment
from moeserve.common.worker_auth import PlaneSecret
from moeserve.operator.build_security import (
    build_plane_secret,
    plane_generation,
    plane_secret_name,
)
from moeserve.operator.kube import Kube, KubeError
from moeserve.operator.meta import (
    MANAGED_BY,
    OPTIONAL_KINDS,
    OWN_API,
    PRUNABLE_KINDS,
    group_name,
    pool_name,
)
from moeserve.operator.rollout import PoolPlan
from moeserve.operator.status import WorkerPoolStatus

__all__ = ["apply_children", "ensure_plane_secret", "write_status", "write_pool_status",
           "status_changed"]

# Generations older than the previous one are deleted; looking this far back covers an
# annotation bumped by more than one between two reconciles.
_OLD_GENERATIONS = 4


def ensure_plane_secret(kube: Kube, dep: MoEDeployment) -> None:
    """This generation's worker-plane Secret exists (created with fresh tokens if not: a
    create that finds it leaves it alone, so no read permission is needed); generations
    before the previous one are gone."""
    kube.create("v1", "Secret", dep.namespace, build_plane_secret(dep, PlaneSecret.generate()))
    gen = plane_generation(dep)
    for old in range(max(gen - 1 - _OLD_GENERATIONS, 0), gen - 1):
        kube.delete("v1", "Secret", dep.namespace, plane_secret_name(dep, old))


def apply_children(kube: Kube, dep: MoEDeployment, children: list[dict[str, Any]],
                   plans: Mapping[str, PoolPlan]) -> None:
    ensure_plane_secret(kube, dep)  # before the pods that read it
    for child in children:
        kube.apply(child)
    _replace_groups(kube, dep, plans)
    kept = {("StatefulSet", group_name(dep, role, i))
            for role, plan in plans.items() for i in plan.keep}
    _prune(kube, dep, children, kept)


def _replace_groups(kube: Kube, dep: MoEDeployment, plans: Mapping[str, PoolPlan]) -> None:
    """Groups a roll removes go in the foreground: the StatefulSet stays (terminating,
    holding its slot) until its pods are gone, so a new group of that name never meets
    the old one's pods, and those pods drain on SIGTERM."""
    for role, plan in plans.items():
        for index in plan.delete:
            kube.delete("apps/v1", "StatefulSet", dep.namespace,
                        group_name(dep, role, index), propagation="Foreground")


def _prune(kube: Kube, dep: MoEDeployment, children: list[dict[str, Any]],
           kept: set[tuple[str, str]]) -> None:
    keep = {(c["kind"], c["metadata"]["name"]) for c in children} | kept
    labels = {LABEL_DEPLOYMENT: dep.name, "app.kubernetes.io/managed-by": MANAGED_BY}
    for api_version, kind in PRUNABLE_KINDS:
        try:
            found = kube.list(api_version, kind, dep.namespace, labels)
        except KubeError as exc:
            if exc.status == 404 and kind in OPTIONAL_KINDS:
                continue  # that CRD is not installed: nothing to prune
            raise
        for obj in found:
            name = obj["metadata"]["name"]
            if (kind, name) not in keep:
                kube.delete(api_version, kind, dep.namespace, name)


def status_changed(previous: Mapping[str, Any], status: Mapping[str, Any]) -> bool:
    return any(previous.get(k) != v for k, v in status.items())


def write_pool_status(kube: Kube, dep: MoEDeployment, role: str,
                      status: WorkerPoolStatus) -> None:
    """The MoEWorkerPool's status (its scale subresource reads it), once the pool exists."""
    current = kube.get(OWN_API, KIND_WORKER_POOL, dep.namespace, pool_name(dep, role))
    wanted = status.model_dump(by_alias=True)
    if current is not None and (current.get("status") or {}) != wanted:
        kube.patch_status(OWN_API, KIND_WORKER_POOL, dep.namespace, pool_name(dep, role),
                          wanted)


def write_status(kube: Kube, namespace: str, name: str, previous: Mapping[str, Any],
                 status: Mapping[str, Any]) -> None:
    if status_changed(previous, status):
        kube.patch_status(OWN_API, KIND_DEPLOYMENT, namespace, name, status)
