"""Pure rendering: a parsed MoEDeployment in, every child manifest out (plain dicts).

Nothing here talks to a cluster. The operator applies what :func:`render` returns, and
`moeserve operator render -f` prints it. The only cluster state render takes is ``groups``: the
current EP-group count of autoscaled pools (the HPA owns it, through the MoEWorkerPool scale
subresource), so the StatefulSets follow the HPA instead of the spec.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from moeserve.common.spec import (
    API_GROUP,
    API_VERSION,
    KIND_DEPLOYMENT,
    LABEL_COMPONENT,
    LABEL_DEPLOYMENT,
    ROLES,
    MoEDeployment,
    Role,
)

__all__ = ["FIELD_MANAGER", "MANAGED_BY", "render", "desired_groups", "owner_reference",
           "child_labels", "security_context", "pod_security_context", "object_meta",
           "PRUNABLE_KINDS", "OPTIONAL_KINDS"]

FIELD_MANAGER = "moeserve-operator"
MANAGED_BY = "moeserve-operator"
# Kinds whose count depends on the spec (groups, autoscaling on/off): the operator deletes the
# ones of a deployment that a new render no longer produces. (apiVersion, kind) pairs.
PRUNABLE_KINDS: tuple[tuple[str, str], ...] = (
    ("apps/v1", "StatefulSet"),
    ("v1", "Service"),
    ("autoscaling/v2", "HorizontalPodAutoscaler"),
    ("scheduling.x-k8s.io/v1alpha1", "PodGroup"),
    ("scheduling.volcano.sh/v1beta1", "PodGroup"),
    ("leaderworkerset.x-k8s.io/v1", "LeaderWorkerSet"),
)
# Kinds whose CRDs a cluster may lack: listing them for pruning may answer 404.
OPTIONAL_KINDS = frozenset({"PodGroup", "LeaderWorkerSet"})


def child_labels(dep: MoEDeployment, component: str, **extra: str) -> dict[str, str]:
    labels = {
        "app.kubernetes.io/name": "moeserve",
        "app.kubernetes.io/instance": dep.name,
        "app.kubernetes.io/component": component,
        "app.kubernetes.io/managed-by": MANAGED_BY,
        LABEL_DEPLOYMENT: dep.name,
        LABEL_COMPONENT: component,
    }
    labels.update(extra)
    return labels


def owner_reference(dep: MoEDeployment) -> dict[str, Any]:
    assert dep.uid, "owner references need the MoEDeployment's uid"
    return {
        "apiVersion": f"{API_GROUP}/{API_VERSION}",
        "kind": KIND_DEPLOYMENT,
        "name": dep.name,
        "uid": dep.uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def object_meta(dep: MoEDeployment, name: str, labels: Mapping[str, str]) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "namespace": dep.namespace, "labels": dict(labels)}
    if dep.uid:  # unknown when rendering a file without a cluster
        meta["ownerReferences"] = [owner_reference(dep)]
    return meta


def pod_security_context() -> dict[str, Any]:
    return {
        "runAsNonRoot": True,
        "runAsUser": 1000,
        "runAsGroup": 1000,
        "fsGroup": 1000,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def security_context() -> dict[str, Any]:
    return {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }


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


def render(dep: MoEDeployment, groups: Mapping[str, int] | None = None,
           plans: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
    """Every child object of ``dep``, in apply order (RBAC and config before workloads).

    ``plans`` (role -> :class:`~moeserve.operator.rollout.PoolPlan`) restricts each pool to
    the slots a rolling update applies now; without it every slot is rendered."""
    # Imported here so each builder module can import the shared helpers above.
    from moeserve.operator import build_groups, build_router, build_workers

    children = build_router.build_router(dep)
    children.append(build_workers.build_worker_service_account(dep))
    for role in ROLES:
        children.extend(build_groups.build_pool_objects(
            dep, role, desired_groups(dep, role, groups), (plans or {}).get(role)))
    return children
