"""A pool's objects group by group, as a roll plan says: revision labels, gangs, slots.

:func:`build_workers.build_group_statefulset` renders one group from the spec; here that group
is decorated with its gang and preflight and labelled with the revision (a hash of the pod
template, :class:`PoolTemplate`, rendered once per reconcile), and only the slots the
:class:`~moeserve.operator.rollout.PoolPlan` applies are rendered: groups still at an old
revision are left as the cluster has them until the plan replaces them.
"""

from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import dataclass
from typing import Any

from moeserve.common import spec as s
from moeserve.common.spec import MoEDeployment, Role
from moeserve.operator import build_workers as bw
from moeserve.operator.build_gang import build_pod_group, decorate_pod_template
from moeserve.operator.build_lws import build_leader_worker_set
from moeserve.operator.build_preflight import add_preflight
from moeserve.operator.meta import COMPAT_LABEL, REVISION_LABEL, pool_name
from moeserve.operator.rollout import PoolPlan

__all__ = ["REVISION_LABEL", "COMPAT_LABEL", "PoolTemplate", "pool_template", "pool_templates",
           "compat_key", "pool_revision", "build_group", "build_pool_objects"]


@dataclass(frozen=True)
class PoolTemplate:
    """A pool's group as rendered once per reconcile: slot 0's StatefulSet (gang and preflight
    added), the compatibility key, and the revision (a hash of both). The roll planner takes
    the revision from it and the builders the rendered group, so the pod template that decides
    the revision is the one applied."""

    role: Role
    slot0: dict[str, Any]
    compat: str
    revision: str


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


def pool_template(dep: MoEDeployment, role: Role, compat: str | None = None) -> PoolTemplate:
    """The revision hashes the pod template rendered for slot 0 (so the group index and the
    rendezvous address, which differ per slot, do not make every slot its own revision) and
    the compatibility key. Replicas are not in it: scaling is not a roll."""
    compat = compat_key(dep) if compat is None else compat
    slot0 = _decorated(dep, role, 0)
    revision = _digest({"template": slot0["spec"]["template"], "compat": compat})
    return PoolTemplate(role=role, slot0=slot0, compat=compat, revision=revision)


def pool_templates(dep: MoEDeployment) -> dict[Role, PoolTemplate]:
    compat = compat_key(dep)
    return {role: pool_template(dep, role, compat) for role in s.ROLES}


def pool_revision(dep: MoEDeployment, role: Role) -> str:
    return pool_template(dep, role).revision


def build_group(dep: MoEDeployment, pool: PoolTemplate, group: int,
                revision: str) -> dict[str, Any]:
    """One EP group's StatefulSet, stamped with its revision and compatibility key. Slot 0 is
    the template itself; other slots differ in group index and rendezvous, so they are
    rendered for their slot."""
    sts = copy.deepcopy(pool.slot0) if group == 0 else _decorated(dep, pool.role, group)
    stamp = {REVISION_LABEL: revision, COMPAT_LABEL: pool.compat}
    sts["metadata"]["labels"].update(stamp)
    sts["spec"]["template"]["metadata"]["labels"].update(stamp)
    return sts


def build_pool_objects(dep: MoEDeployment, role: Role, groups: int, pool: PoolTemplate,
                       plan: PoolPlan | None = None) -> list[dict[str, Any]]:
    """MoEWorkerPool, NetworkPolicy, per live slot a Service (+ PodGroup), per applied slot
    the StatefulSet, and the HPA. Without a plan every slot 0..groups-1 is applied."""
    spec = dep.spec.pool(role)
    revision = plan.revision if plan else pool.revision
    applied = plan.apply if plan else tuple(range(groups))
    live = sorted(set(applied) | set(plan.keep if plan else ()))
    out = [bw.build_worker_pool(dep, role, groups), bw.build_network_policy(dep, role)]
    if spec.workload == "lws":
        out += [build_leader_worker_set(dep, role, groups, revision,
                                        pool.slot0["spec"]["template"]),
                _lws_service(dep, role)]
        live = []  # LWS owns the groups and their roll
    for group in live:
        out.append(bw.build_group_service(dep, role, group))
        pod_group = build_pod_group(dep, role, group)
        if pod_group is not None:
            out.append(pod_group)
        if group in applied:
            out.append(build_group(dep, pool, group, revision))
    if spec.autoscaling.enabled:
        out.append(bw.build_hpa(dep, role))
    return out


def _lws_service(dep: MoEDeployment, role: Role) -> dict[str, Any]:
    """The pool's discovery Service: its EndpointSlices carry the worker labels the router
    watches (LWS's own headless Service, named like the set, does not)."""
    svc = bw.build_group_service(dep, role, 0)
    svc["metadata"]["name"] = f"{pool_name(dep, role)}-workers"
    del svc["metadata"]["labels"][s.LABEL_GROUP]
    del svc["spec"]["selector"][s.LABEL_GROUP]
    return svc
