"""The chart's monitoring pieces ask only for what the code exports: every query of the Grafana
dashboard, of the prometheus-adapter rules and of the SLA planner names exported series and the
ServiceMonitor's labels, under the one set of label names the planner uses."""

from __future__ import annotations

import json

import pytest
import yaml

from moeserve.common import spec as s
from moeserve.common.spec import parse_manifest
from moeserve.operator.autoscale import (
    POOL_ROUTER,
    PROM_LABEL_DEPLOYMENT,
    PROM_LABEL_POOL,
    PrometheusSource,
)
from tests.promql_helpers import (
    DASHBOARD,
    MONITORING,
    REPO,
    adapter_rules,
    dashboard_configmap,
    exported_series,
    grafana_exprs,
    grouping_labels,
    helm_template,
    load_dashboard,
    selectors,
    service_monitor,
)

pytestmark = pytest.mark.timeout(180)

POOLS = {"prefill", "decode", POOL_ROUTER}
# Labels every scraped series carries (Prometheus and the Prometheus Operator add them).
SCRAPE_LABELS = {"namespace", "pod", "service", "endpoint", "job", "instance", "container"}
# Metric families a per-pool dashboard must show: TTFT, TPOT, ITL, throughput, queue, KV usage,
# KV transfer, migrations, ejections.
REQUIRED = {
    "moeserve:time_to_first_token_seconds_bucket",
    "moeserve:request_time_per_output_token_seconds_bucket",
    "moeserve:inter_token_latency_seconds_bucket",
    "moeserve:prompt_tokens_total", "moeserve:generation_tokens_total",
    "moeserve:num_requests_waiting", "moeserve:kv_cache_usage_perc",
    "moeserve:kv_transfer_bytes_total", "moeserve:kv_transfer_seconds_bucket",
    "moeserve:router_migrations_total", "moeserve:router_worker_ejections_total",
}  # fmt: skip


@pytest.fixture(scope="module")
def chart() -> list[dict]:
    return helm_template(*MONITORING)


@pytest.fixture(scope="module")
def exported() -> set[str]:
    return set().union(*exported_series().values())


def _check_query(expr: str, exported: set[str]) -> None:
    """Names exported series, and selects on the planner's label names only."""
    sels = selectors(expr)
    assert sels, f"no series in {expr!r}"
    for sel in sels:
        assert sel.name in exported, f"{sel.name} is not exported by the code ({expr!r})"
        for label, (_op, value) in sel.matchers.items():
            assert not label.startswith("moeserve") or label in (
                PROM_LABEL_DEPLOYMENT, PROM_LABEL_POOL), f"label {label} in {expr!r}"
            if label == PROM_LABEL_POOL:
                assert set(value.split("|")) <= POOLS, f"pool {value!r} in {expr!r}"
    for label in grouping_labels(expr):
        assert not label.startswith("moeserve") or label in (
            PROM_LABEL_DEPLOYMENT, PROM_LABEL_POOL), f"grouping label {label} in {expr!r}"


def test_exported_series_collected_from_registries(exported: set[str]) -> None:
    # The check below is only as good as this set: both components, every kind of series.
    assert {"moeserve:router_requests_held", "moeserve:router_migrations_total",
            "moeserve:kv_pinned_leases", "moeserve:time_to_first_token_seconds_bucket"} <= exported
    assert "moeserve:prompt_tokens" not in exported  # a counter is exported as ..._total


def test_dashboard_queries_name_exported_series(exported: set[str]) -> None:
    values = {"namespace": "ns", "deployment": "dep"}
    exprs = grafana_exprs(load_dashboard(), values)
    assert len(exprs) > 20
    for expr in exprs:
        _check_query(expr, exported)
    named = set()
    for expr in grafana_exprs(load_dashboard(), values, variables=False):
        for sel in selectors(expr):
            named.add(sel.name)
            # One deployment at a time: never mixes deployments or namespaces.
            assert sel.matchers.get("namespace") == ("Equal", "ns"), expr
            assert sel.matchers.get(PROM_LABEL_DEPLOYMENT) == ("Equal", "dep"), expr
    assert REQUIRED <= named, REQUIRED - named


def test_dashboard_splits_by_pool_and_never_sums_pools() -> None:
    # A series both the router and the workers export, summed over pools, counts twice.
    both = exported_series()["router"] & exported_series()["worker"]
    values = {"namespace": "ns", "deployment": "dep"}
    for expr in grafana_exprs(load_dashboard(), values, variables=False):
        for sel in selectors(expr):
            if sel.name in both:
                assert PROM_LABEL_POOL in sel.matchers or PROM_LABEL_POOL in grouping_labels(
                    expr), f"{sel.name} summed over pools in {expr!r}"


def test_dashboard_configmap_for_the_grafana_sidecar(chart: list[dict]) -> None:
    cm = dashboard_configmap(chart)
    assert cm is not None and cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(cm["data"]["moeserve.json"]) == json.loads(DASHBOARD.read_text())
    assert dashboard_configmap(helm_template("--set", "grafanaDashboard.enabled=false")) is None
    moved = helm_template("--set", "grafanaDashboard.namespace=grafana")
    assert dashboard_configmap(moved)["metadata"]["namespace"] == "grafana"


def test_adapter_rules_name_exported_series_and_serve_the_hpa_metrics(
    chart: list[dict], exported: set[str]
) -> None:
    rules = adapter_rules(chart)
    assert {r.served_as for r in rules} == {
        s.HPA_METRIC_NUM_REQUESTS_WAITING, s.HPA_METRIC_KV_CACHE_USAGE_PERC,
        s.HPA_METRIC_TIME_TO_FIRST_TOKEN_P90}  # fmt: skip
    for rule in rules:
        _check_query(rule.series_query, exported)
        query = rule.query("ns", ["dep-prefill-0-0", "dep-prefill-1-0"])
        assert "<<" not in query, query
        _check_query(query, exported)
        # Worker series only: the router exports per-worker copies under the same names.
        for sel in selectors(query):
            assert sel.matchers[PROM_LABEL_POOL] == ("NotEqual", POOL_ROUTER), query


def test_planner_queries_name_exported_router_series(exported: set[str]) -> None:
    doc = yaml.safe_load((REPO / "examples" / "tiny-cpu.yaml").read_text())
    dep = parse_manifest({**doc, "metadata": {"name": "tiny", "namespace": "llm"}})
    router = exported_series()["router"]
    for key, query in PrometheusSource().queries(dep).items():
        _check_query(query, exported)
        for sel in selectors(query):
            assert sel.name in router, f"{key}: {sel.name} is not a router series"
            assert sel.matchers[PROM_LABEL_POOL] == ("Equal", POOL_ROUTER), query
            assert sel.matchers[PROM_LABEL_DEPLOYMENT] == ("Equal", "tiny"), query
            assert sel.matchers["namespace"] == ("Equal", "llm"), query


def test_service_monitor_sets_the_planners_labels(chart: list[dict]) -> None:
    endpoint = service_monitor(chart)["spec"]["endpoints"][0]
    targets = {r["targetLabel"] for r in endpoint["relabelings"]}
    assert targets == {PROM_LABEL_DEPLOYMENT, PROM_LABEL_POOL}
    # targetLabels would add moeserve_io_* copies that no query reads.
    assert "targetLabels" not in service_monitor(chart)["spec"]
    assert SCRAPE_LABELS.isdisjoint(targets)
