"""Gang scheduling of EP groups: PodGroups, pod labels and scheduler (why a group is unplaced is
read from the cluster by ``conditions.gang_problem``).

An EP group is all-or-nothing: ranks block at the rendezvous until every pod of the group runs,
so a half-placed group holds GPUs and serves nothing. Each group (one StatefulSet) gets its own
gang of ``pods_per_group`` members:

- ``coscheduling``: a scheduler-plugins ``PodGroup`` (scheduling.x-k8s.io/v1alpha1) with
  ``minMember``, pods labelled ``scheduling.x-k8s.io/pod-group`` and run by its scheduler;
- ``volcano``: a Volcano ``PodGroup`` (scheduling.volcano.sh/v1beta1), pods annotated
  ``scheduling.k8s.io/group-name`` and scheduled by ``volcano``;
- ``kueue``: Kueue's plain-pod groups, labels ``kueue.x-k8s.io/pod-group-name`` and
  ``queue-name`` plus the ``pod-group-total-count`` annotation (Kueue creates its Workload).

PodGroups carry the deployment's controller ownerReference, so they go with it.
"""

from __future__ import annotations

from typing import Any

from moeserve.common import spec as s
from moeserve.common.spec import MoEDeployment, Role, pods_per_group
from moeserve.operator.meta import POD_GROUP_API, child_labels, group_name, object_meta

__all__ = ["POD_GROUP_API", "decorate_pod_template", "build_pod_group",
           "COSCHEDULING_LABEL", "VOLCANO_ANNOTATION", "KUEUE_GROUP_LABEL", "KUEUE_QUEUE_LABEL",
           "KUEUE_TOTAL_ANNOTATION"]

COSCHEDULING_LABEL = "scheduling.x-k8s.io/pod-group"
VOLCANO_ANNOTATION = "scheduling.k8s.io/group-name"
KUEUE_GROUP_LABEL = "kueue.x-k8s.io/pod-group-name"
KUEUE_QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
KUEUE_TOTAL_ANNOTATION = "kueue.x-k8s.io/pod-group-total-count"


def decorate_pod_template(template: dict[str, Any], dep: MoEDeployment, role: Role,
                          group: int) -> None:
    """Add the gang's labels, annotations and scheduler to a group's pod template."""
    scheduling = dep.spec.pool(role).scheduling
    meta = template.setdefault("metadata", {})
    labels: dict[str, str] = meta.setdefault("labels", {})
    annotations: dict[str, str] = {}
    name = group_name(dep, role, group)
    if scheduling.gang == "coscheduling":
        labels[COSCHEDULING_LABEL] = name
    elif scheduling.gang == "volcano":
        annotations[VOLCANO_ANNOTATION] = name
    elif scheduling.gang == "kueue":
        labels[KUEUE_GROUP_LABEL] = name
        labels[KUEUE_QUEUE_LABEL] = scheduling.queue or ""
        annotations[KUEUE_TOTAL_ANNOTATION] = str(pods_per_group(dep.spec.pool(role)))
    if annotations:
        meta["annotations"] = {**meta.get("annotations", {}), **annotations}
    pod = template["spec"]
    if scheduling.scheduler():
        pod["schedulerName"] = scheduling.scheduler()
    if scheduling.priority_class_name:
        pod["priorityClassName"] = scheduling.priority_class_name


def build_pod_group(dep: MoEDeployment, role: Role, group: int) -> dict[str, Any] | None:
    pool = dep.spec.pool(role)
    scheduling = pool.scheduling
    if scheduling.gang not in POD_GROUP_API:
        return None
    api_version, kind = POD_GROUP_API[scheduling.gang]
    labels = child_labels(dep, "worker", **{s.LABEL_ROLE: role, s.LABEL_GROUP: str(group)})
    spec: dict[str, Any] = {"minMember": pods_per_group(pool)}
    if scheduling.gang == "coscheduling":
        spec["scheduleTimeoutSeconds"] = scheduling.schedule_timeout_seconds
    else:
        if scheduling.queue:
            spec["queue"] = scheduling.queue
        if scheduling.priority_class_name:
            spec["priorityClassName"] = scheduling.priority_class_name
    return {"apiVersion": api_version, "kind": kind,
            "metadata": object_meta(dep, group_name(dep, role, group), labels), "spec": spec}
