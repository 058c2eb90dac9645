"""`workload: lws`: one LeaderWorkerSet per pool instead of a StatefulSet per EP group.

Where the cluster runs the LeaderWorkerSet controller (sigs.k8s.io/lws), a pool becomes one
object whose ``replicas`` are EP groups and ``size`` the pods per group: LWS creates each group
together, restarts it whole (``RecreateGroupOnPodRestart``: a rank that died leaves the others
hung at the collective) and rolls it group by group with ``maxSurge`` / ``maxUnavailable`` in
groups. The worker contract is kept: ``MOESERVE_RANK`` and ``MOESERVE_GROUP`` come from LWS's
worker-index and group-index labels, and the rendezvous is the group leader's stable DNS name
under the headless Service LWS creates with the set's name. What LWS does not do is order a
roll across the prefill and decode pools; that needs the default StatefulSet workload.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

from moeserve.common import spec as s
from moeserve.common.spec import MoEDeployment, Role, pods_per_group
from moeserve.operator.build_gang import decorate_pod_template
from moeserve.operator.build_preflight import PREFLIGHT_CONTAINER
from moeserve.operator.meta import (
    LWS_API,
    LWS_KIND,
    REVISION_LABEL,
    child_labels,
    object_meta,
    pool_name,
)

__all__ = ["LWS_API", "LWS_KIND", "LWS_WORKER_INDEX", "LWS_GROUP_INDEX", "build_leader_worker_set"]

LWS_WORKER_INDEX = "leaderworkerset.sigs.k8s.io/worker-index"
LWS_GROUP_INDEX = "leaderworkerset.sigs.k8s.io/group-index"


def _field(label: str) -> dict[str, Any]:
    return {"fieldRef": {"fieldPath": f"metadata.labels['{label}']"}}


def _lws_env(env: list[dict[str, Any]], dep: MoEDeployment, role: Role) -> list[dict[str, Any]]:
    """The StatefulSet env with rank, group and rendezvous taken from LWS's labels. The group
    index goes first: the rendezvous refers to it as $(MOESERVE_GROUP), which Kubernetes expands
    only from variables defined earlier in the list."""
    name = pool_name(dep, role)
    leader = f"{name}-$({s.ENV_GROUP}).{name}.{dep.namespace}.svc.{dep.spec.cluster_domain}"
    replaced = {
        s.ENV_RANK: {"name": s.ENV_RANK, "valueFrom": _field(LWS_WORKER_INDEX)},
        s.ENV_RENDEZVOUS: {"name": s.ENV_RENDEZVOUS,
                           "value": f"{leader}:{s.PORT_WORKER_RENDEZVOUS}"},
    }
    group = {"name": s.ENV_GROUP, "valueFrom": _field(LWS_GROUP_INDEX)}
    out = [group]
    for var in env:
        if var["name"] == s.ENV_GROUP:
            continue
        out.append(replaced.get(var["name"], var))
    return out


def build_leader_worker_set(dep: MoEDeployment, role: Role, groups: int, revision: str,
                            group_template: Mapping[str, Any]) -> dict[str, Any]:
    """``group_template``: the pool's pod template as slot 0's StatefulSet has it (preflight
    included, whose env is the worker's); the group's labels and env become LWS's."""
    pool = dep.spec.pool(role)
    template = copy.deepcopy(dict(group_template))
    labels = child_labels(dep, "worker", **{s.LABEL_ROLE: role})
    template["metadata"]["labels"] = {**labels, REVISION_LABEL: revision}
    pod = template["spec"]
    for container in pod["containers"]:
        container["env"] = _lws_env(container["env"], dep, role)
    for init in pod.get("initContainers", ()):
        if init["name"] == PREFLIGHT_CONTAINER:
            init["env"] = list(pod["containers"][0]["env"])  # as add_preflight gives it
    decorate_pod_template(template, dep, role, 0)  # scheduler / priority (gang is none here)
    return {
        "apiVersion": LWS_API,
        "kind": LWS_KIND,
        "metadata": object_meta(dep, pool_name(dep, role), labels),
        "spec": {
            "replicas": groups,
            "startupPolicy": "LeaderCreated",
            "rolloutStrategy": {"type": "RollingUpdate", "rollingUpdateConfiguration": {
                "maxSurge": pool.rollout.max_surge,
                "maxUnavailable": pool.rollout.max_unavailable}},
            "leaderWorkerTemplate": {
                "size": pods_per_group(pool),
                "restartPolicy": "RecreateGroupOnPodRestart",
                "workerTemplate": template,
            },
        },
    }

