"""A pool's objects group by group, as a roll plan says: revision labels, gangs, slots.

:func:`build_workers.build_group_statefulset` renders one group from the spec; here that group
is decorated with its gang and labelled with the revision (a hash of the pod template), and only
the slots the :class:`~moeserve.operator.rollout.PoolPlan` applies are rendered: groups still at
an old revision are left as the cluster has them until the plan replaces them.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from typing import Any

from moeserve.common import spec as s
from moeserve.common.spec import MoEDeployment, Role, pods_per_group
from moeserve.operator import build_workers as bw
from moeserve.operator.build_gang import build_pod_group, decorate_pod_template
from moeserve.operator.build_lws import build_leader_worker_set
from moeserve.operator.build_preflight import add_preflight
from moeserve.operator.rollout import GroupState, PoolPlan

__all__ = ["REVISION_LABEL", "COMPAT_LABEL", "compat_key", "pool_revision", "build_group",
           "build_pool_objects",
           "group_states"]

REVISION_LABEL = "moeserve.io/revision"
COMPAT_LABEL = "moeserve.io/compat"


def _decorated(dep: MoEDeployment, role: Role, group: int) -> dict[str, Any]:
    sts = bw.build_group_statefulset(dep, role, group)
    decorate_pod_template(sts["spec"]["template"], dep, role, group)
    add_preflight(sts["spec"]["template"]["spec"], dep, role)
    return sts


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:10]


def compat_key(dep: MoEDeployment) -> str:
    """Hash of what feeds the workers' compatibility fingerprint (model and checkpoint, block
    size, moeserve/NIXL versions through the images, KV dtype / MLA choice through the engine
    flags, parallel layouts), over both pools: prefill and decode groups pair only when theirs
    are equal, so a change here rolls both pools."""
    spec = dep.spec
    return _digest({
        # the memory plan's inputs do not reach the workers
        "model": spec.model.model_dump(mode="json", exclude={"shape", "config"}),
        **{role: {"image": spec.pool(role).image or spec.image,
                  "args": list(spec.pool(role).extra_args),
                  "parallelism": spec.pool(role).parallelism.model_dump(mode="json")}
           for role in s.ROLES},
    })


def pool_revision(dep: MoEDeployment, role: Role) -> str:
    """Hash of the pool's pod template (rendered for slot 0, so the group index and the
    rendezvous address, which differ per slot, do not make every slot its own revision) and
    of the compatibility key. Replicas are not in it: scaling is not a roll."""
    template = _decorated(dep, role, 0)["spec"]["template"]
    return _digest({"template": template, "compat": compat_key(dep)})


def build_group(dep: MoEDeployment, role: Role, group: int, revision: str) -> dict[str, Any]:
    sts = _decorated(dep, role, group)
    stamp = {REVISION_LABEL: revision, COMPAT_LABEL: compat_key(dep)}
    sts["metadata"]["labels"].update(stamp)
    sts["spec"]["template"]["metadata"]["labels"].update(stamp)
    return sts


def build_pool_objects(dep: MoEDeployment, role: Role, groups: int,
                       plan: PoolPlan | None = None) -> list[dict[str, Any]]:
    """MoEWorkerPool, NetworkPolicy, per live slot a Service (+ PodGroup), per applied slot
    the StatefulSet, and the HPA. Without a plan every slot 0..groups-1 is applied."""
    pool = dep.spec.pool(role)
    revision = plan.revision if plan else pool_revision(dep, role)
    applied = plan.apply if plan else tuple(range(groups))
    live = sorted(set(applied) | set(plan.keep if plan else ()))
    out = [bw.build_worker_pool(dep, role, groups), bw.build_network_policy(dep, role)]
    if pool.workload == "lws":
        out += [build_leader_worker_set(dep, role, groups, revision), _lws_service(dep, role)]
        live = []  # LWS owns the groups and their roll
    for group in live:
        out.append(bw.build_group_service(dep, role, group))
        pod_group = build_pod_group(dep, role, group)
        if pod_group is not None:
            out.append(pod_group)
        if group in applied:
            out.append(build_group(dep, role, group, revision))
    if pool.autoscaling.enabled:
        out.append(bw.build_hpa(dep, role))
    return out


def _lws_service(dep: MoEDeployment, role: Role) -> dict[str, Any]:
    """The pool's discovery Service: its EndpointSlices carry the worker labels the router
    watches (LWS's own headless Service, named like the set, does not)."""
    svc = bw.build_group_service(dep, role, 0)
    svc["metadata"]["name"] = f"{bw.pool_name(dep, role)}-workers"
    del svc["metadata"]["labels"][s.LABEL_GROUP]
    del svc["spec"]["selector"][s.LABEL_GROUP]
    return svc


def group_states(dep: MoEDeployment, role: Role,
                 statefulsets: Iterable[Mapping[str, Any]]) -> list[GroupState]:
    """What the planner needs from the cluster's StatefulSets of one pool."""
    pods = pods_per_group(dep.spec.pool(role))
    out = []
    for sts in statefulsets:
        meta = sts.get("metadata") or {}
        labels = meta.get("labels") or {}
        if labels.get(s.LABEL_ROLE) != role or not str(labels.get(s.LABEL_GROUP, "")).isdigit():
            continue
        ready = int((sts.get("status") or {}).get("readyReplicas") or 0) >= pods
        out.append(GroupState(index=int(labels[s.LABEL_GROUP]),
                              revision=labels.get(REVISION_LABEL, ""), ready=ready,
                              terminating=bool(meta.get("deletionTimestamp")),
                              compat=labels.get(COMPAT_LABEL, "")))
    return sorted(out, key=lambda g: g.index)
