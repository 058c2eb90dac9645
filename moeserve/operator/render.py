"""Render: a parsed MoEDeployment in, every child manifest out (plain dicts).

The third stage of the reconcile (observe -> plan -> render -> apply -> status), and the whole of
`moeserve operator render -f`. Nothing here talks to a cluster. This module only orders the pure
builders (``build_*``); they share their metadata helpers through ``meta`` and never import
this module. The cluster state render takes: ``groups``, the EP-group count of each pool
(autoscaled pools follow their MoEWorkerPool, which the HPA or the SLA planner resizes),
``plans``, the roll plan restricting each pool to the slots applied now, and ``templates``,
the pools' templates the roll plan was computed from (rendered here when not given).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from moeserve.common.spec import ROLES, MoEDeployment
from moeserve.operator.build_groups import PoolTemplate, build_pool_objects, pool_templates
from moeserve.operator.build_router import build_router
from moeserve.operator.build_workers import build_worker_service_account
from moeserve.operator.plan import desired_groups
from moeserve.operator.rollout import PoolPlan

__all__ = ["render"]


def render(dep: MoEDeployment, groups: Mapping[str, int] | None = None,
           plans: Mapping[str, PoolPlan] | None = None,
           templates: Mapping[str, PoolTemplate] | None = None) -> list[dict[str, Any]]:
    """Every child object of ``dep``, in apply order (RBAC and config before workloads).

    ``plans`` (role -> :class:`~moeserve.operator.rollout.PoolPlan`) restricts each pool to
    the slots a rolling update applies now; without it every slot is rendered."""
    templates = pool_templates(dep) if templates is None else templates
    children = build_router(dep)
    children.append(build_worker_service_account(dep))
    for role in ROLES:
        children.extend(build_pool_objects(
            dep, role, desired_groups(dep, role, groups), templates[role],
            (plans or {}).get(role)))
    return children
