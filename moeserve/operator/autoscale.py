"""The SLA autoscaler's loop: read load, ask the planner, write both pools' sizes.

Runs on a kopf timer per MoEDeployment whose ``spec.autoscaling.mode`` is ``sla``. The sizes go
where an HPA would put them, the MoEWorkerPools' ``spec.replicas`` (scale subresource), so the
reconciler follows them the same way; the planner's memory (last change, idle since) rides on
the decode pool as an annotation, so an operator restart does not reset the hysteresis.

Load comes from a :class:`MetricsSource`: Prometheus in a cluster (the router's series), a fake
in tests. Wake-up: while the deployment is at zero the router holds requests and
exports ``moeserve:router_requests_held``; a non-zero value wakes the pools.
"""

from __future__ import annotations

import json
import logging
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from moeserve.common.spec import (
    KIND_WORKER_POOL,
    METRIC_REQUESTS_HELD,
    MoEDeployment,
)
from moeserve.operator.kube import Kube
from moeserve.operator.meta import OWN_API, pool_name
from moeserve.operator.planner import (
    GroupCapacity,
    LoadSample,
    PlannerConfig,
    PlannerState,
    SlaTargets,
    plan_groups,
)

__all__ = ["MetricsSource", "PrometheusSource", "Autoscaler", "STATE_ANNOTATION",
           "METRIC_REQUESTS_HELD", "PROM_LABEL_DEPLOYMENT", "PROM_LABEL_POOL", "POOL_ROUTER"]

logger = logging.getLogger(__name__)
STATE_ANNOTATION = "moeserve.io/planner-state"
# The target labels the chart's ServiceMonitor relabels every scraped series with
# (charts/moeserve/templates/servicemonitor.yaml); the planner, the prometheus-adapter rules and
# the Grafana dashboard select on exactly these, and tests/test_dashboard.py holds the chart to
# them. The pool is the worker's role (prefill, decode) or "router".
PROM_LABEL_DEPLOYMENT = "moeserve_deployment"
PROM_LABEL_POOL = "moeserve_pool"
POOL_ROUTER = "router"


class MetricsSource(Protocol):
    def sample(self, dep: MoEDeployment) -> LoadSample: ...


class PrometheusSource:
    """Reads the deployment's load from Prometheus' HTTP API (``spec.autoscaling.metricsUrl``).

    Every query reads the router's series only (``moeserve_pool="router"``): prompt and
    generated tokens are counted by the router and again by the prefill and decode workers, and
    the SLA is the latency the client sees, which only the router measures.
    """

    QUERIES = {
        "prefill_tokens_per_s": 'sum(rate(moeserve:prompt_tokens_total{{{sel}}}[2m]))',
        "decode_tokens_per_s": 'sum(rate(moeserve:generation_tokens_total{{{sel}}}[2m]))',
        "held_requests": 'sum(moeserve:router_requests_held{{{sel}}})',
        "ttft_p90_s": 'histogram_quantile(0.9, sum by (le) '
                      '(rate(moeserve:time_to_first_token_seconds_bucket{{{sel}}}[2m])))',
        "itl_p90_s": 'histogram_quantile(0.9, sum by (le) '
                     '(rate(moeserve:inter_token_latency_seconds_bucket{{{sel}}}[2m])))',
    }

    @staticmethod
    def selector(dep: MoEDeployment) -> str:
        """Label matchers of the deployment's router series."""
        return (f'namespace="{dep.namespace}",{PROM_LABEL_DEPLOYMENT}="{dep.name}",'
                f'{PROM_LABEL_POOL}="{POOL_ROUTER}"')

    def queries(self, dep: MoEDeployment) -> dict[str, str]:
        """The PromQL of each load figure, for ``dep``."""
        sel = self.selector(dep)
        return {k: q.format(sel=sel) for k, q in self.QUERIES.items()}

    def __init__(self, timeout_s: float = 5.0):
        self.timeout_s = timeout_s

    def _query(self, base: str, promql: str) -> float | None:
        url = f"{base.rstrip('/')}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
        with urllib.request.urlopen(url, timeout=self.timeout_s) as resp:  # noqa: S310
            result = json.load(resp).get("data", {}).get("result") or []
        if not result:
            return None
        value = float(result[0]["value"][1])
        return None if value != value else value  # NaN: no samples in the window

    def sample(self, dep: MoEDeployment) -> LoadSample:
        base = dep.spec.autoscaling.metrics_url
        if not base:
            raise ValueError("spec.autoscaling.metricsUrl is not set")
        got = {k: self._query(base, q) for k, q in self.queries(dep).items()}
        return LoadSample(
            prefill_tokens_per_s=got["prefill_tokens_per_s"] or 0.0,
            decode_tokens_per_s=got["decode_tokens_per_s"] or 0.0,
            held_requests=int(got["held_requests"] or 0),
            ttft_p90_s=got["ttft_p90_s"], itl_p90_s=got["itl_p90_s"])


def planner_inputs(dep: MoEDeployment) -> tuple[GroupCapacity, SlaTargets, PlannerConfig]:
    sla = dep.spec.autoscaling
    cap = GroupCapacity(prefill_tokens_per_s=sla.prefill_tokens_per_second_per_group,
                        decode_tokens_per_s=sla.decode_tokens_per_second_per_group)
    cfg = PlannerConfig(
        min_prefill=sla.min_prefill, max_prefill=sla.max_prefill, min_decode=sla.min_decode,
        max_decode=sla.max_decode, down_delay_s=sla.scale_down_delay_seconds,
        scale_to_zero=sla.scale_to_zero.enabled, idle_s=sla.scale_to_zero.idle_seconds,
        wake_prefill=sla.scale_to_zero.wake_prefill)
    return cap, SlaTargets(ttft_s=sla.ttft_seconds, itl_s=sla.itl_seconds), cfg


def _state(pools: Mapping[str, Mapping[str, Any]]) -> PlannerState:
    decode = pools.get("decode") or {}
    replicas = {r: int(((p or {}).get("spec") or {}).get("replicas", 1)) for r, p in pools.items()}
    saved = ((decode.get("metadata") or {}).get("annotations") or {}).get(STATE_ANNOTATION)
    last_change, idle_since = 0.0, None
    if saved:
        try:
            data = json.loads(saved)
            last_change, idle_since = float(data["lastChange"]), data.get("idleSince")
        except (ValueError, KeyError, TypeError):
            pass  # a hand-edited annotation: start the hysteresis afresh
    return PlannerState(prefill=replicas.get("prefill", 1), decode=replicas.get("decode", 1),
                        last_change=last_change, idle_since=idle_since)


class Autoscaler:
    def __init__(self, kube: Kube, source: MetricsSource,
                 clock: Callable[[], float] = time.time):
        self.kube, self.source, self.clock = kube, source, clock

    def tick(self, dep: MoEDeployment) -> str | None:
        """One planning step; returns the decision's reason when the sizes changed."""
        if dep.spec.autoscaling.mode != "sla":
            return None
        pools = {role: self.kube.get(OWN_API, KIND_WORKER_POOL, dep.namespace,
                                     pool_name(dep, role)) for role in ("prefill", "decode")}
        if any(p is None for p in pools.values()):
            return None  # the reconciler has not created them yet
        state = _state(pools)  # type: ignore[arg-type]
        cap, sla, cfg = planner_inputs(dep)
        decision = plan_groups(self.source.sample(dep), cap, sla, cfg, state, self.clock())
        new = decision.state
        memo = json.dumps({"lastChange": new.last_change, "idleSince": new.idle_since})
        changed = (new.prefill, new.decode) != (state.prefill, state.decode)
        # Decode first on the way up, prefill first on the way down: never prefill-only.
        order = ("decode", "prefill") if new.decode >= state.decode else ("prefill", "decode")
        for role in order:
            replicas = new.prefill if role == "prefill" else new.decode
            if replicas != (state.prefill if role == "prefill" else state.decode):
                self.kube.patch(OWN_API, KIND_WORKER_POOL, dep.namespace, pool_name(dep, role),
                                {"spec": {"replicas": replicas}}, subresource="scale")
        saved = ((pools["decode"] or {}).get("metadata", {}).get("annotations") or {}).get(
            STATE_ANNOTATION)
        if saved != memo:
            self.kube.patch(OWN_API, KIND_WORKER_POOL, dep.namespace, pool_name(dep, "decode"),
                            {"metadata": {"annotations": {STATE_ANNOTATION: memo}}})
        if changed:
            logger.info("%s/%s: prefill %d -> %d, decode %d -> %d (%s)", dep.namespace,
                        dep.name, state.prefill, new.prefill, state.decode, new.decode,
                        decision.reason)
            return decision.reason
        return None
