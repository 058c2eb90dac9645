"""What every stage of the reconcile agrees on about the objects it manages: their names, labels,
owner reference, security contexts, the kinds a render may stop producing, and timestamps.

The bottom of the operator package: it imports only ``common``, so the builders, the observer,
the applier and the status code all take these from here and never from one another.
"""

from __future__ import annotations

import calendar
import time
from collections.abc import Mapping
from typing import Any

from moeserve.common.spec import (
    API_GROUP,
    API_VERSION,
    KIND_DEPLOYMENT,
    LABEL_COMPONENT,
    LABEL_DEPLOYMENT,
    LABEL_ROLE,
    PORT_ROUTER_HTTP,
    MoEDeployment,
    Role,
)

__all__ = ["FIELD_MANAGER", "MANAGED_BY", "OWN_API", "REVISION_LABEL", "COMPAT_LABEL",
           "LWS_API", "LWS_KIND", "POD_GROUP_API", "PRUNABLE_KINDS", "OPTIONAL_KINDS",
           "pool_name", "group_name", "router_name", "router_endpoint", "pool_selector",
           "child_labels", "owner_reference", "object_meta", "pod_security_context",
           "security_context", "parse_time", "format_time"]

FIELD_MANAGER = "moeserve-operator"
MANAGED_BY = "moeserve-operator"
OWN_API = f"{API_GROUP}/{API_VERSION}"
# Stamped on each EP group: the pod-template hash it runs and its KV-compatibility key.
REVISION_LABEL = "moeserve.io/revision"
COMPAT_LABEL = "moeserve.io/compat"
LWS_API = "leaderworkerset.x-k8s.io/v1"
LWS_KIND = "LeaderWorkerSet"
# gang kind -> (apiVersion, kind) of the PodGroup it needs; kueue makes its own Workload.
POD_GROUP_API: dict[str, tuple[str, str]] = {
    "coscheduling": ("scheduling.x-k8s.io/v1alpha1", "PodGroup"),
    "volcano": ("scheduling.volcano.sh/v1beta1", "PodGroup"),
}
# Kinds whose count depends on the spec (groups, autoscaling on/off): the operator deletes the
# ones of a deployment that a new render no longer produces. (apiVersion, kind) pairs.
PRUNABLE_KINDS: tuple[tuple[str, str], ...] = (
    ("apps/v1", "StatefulSet"),
    ("v1", "Service"),
    ("autoscaling/v2", "HorizontalPodAutoscaler"),
    *POD_GROUP_API.values(),
    (LWS_API, LWS_KIND),
)
# Kinds whose CRDs a cluster may lack: listing them for pruning may answer 404.
OPTIONAL_KINDS = frozenset({"PodGroup", LWS_KIND})

_TIME_FORMAT = "%Y-%m-%dT%H:%M:%SZ"


def pool_name(dep: MoEDeployment, role: Role) -> str:
    return f"{dep.name}-{role}"


def group_name(dep: MoEDeployment, role: Role, group: int) -> str:
    """One EP group's StatefulSet, headless Service and gang (PodGroup) share this name."""
    return f"{dep.name}-{role}-{group}"


def router_name(dep: MoEDeployment) -> str:
    return f"{dep.name}-router"


def router_endpoint(dep: MoEDeployment) -> str:
    return f"http://{router_name(dep)}.{dep.namespace}.svc:{PORT_ROUTER_HTTP}"


def pool_selector(dep: MoEDeployment, role: Role) -> dict[str, str]:
    return {LABEL_DEPLOYMENT: dep.name, LABEL_ROLE: role}


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
        "apiVersion": OWN_API,
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


def place_pod(pod: dict[str, Any], dep: MoEDeployment, node_selector: Mapping[str, str],
              tolerations: list[dict[str, Any]], affinity: Mapping[str, Any] | None = None) -> None:
    """Finish a pod spec in place: drop an empty initContainers, add the placement a spec
    asks for (node selector, tolerations, affinity) and the image pull secrets."""
    if not pod["initContainers"]:
        del pod["initContainers"]
    if node_selector:
        pod["nodeSelector"] = dict(node_selector)
    if tolerations:
        pod["tolerations"] = [dict(t) for t in tolerations]
    if affinity:
        pod["affinity"] = dict(affinity)
    if dep.spec.image_pull_secrets:
        pod["imagePullSecrets"] = [{"name": n} for n in dep.spec.image_pull_secrets]


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


def parse_time(text: str | None) -> float | None:
    """Epoch seconds of a Kubernetes timestamp; None when absent or malformed."""
    if not text:
        return None
    try:
        return float(calendar.timegm(time.strptime(text, _TIME_FORMAT)))
    except ValueError:
        return None


def format_time(epoch: float) -> str:
    return time.strftime(_TIME_FORMAT, time.gmtime(epoch))
