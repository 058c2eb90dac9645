"""The chart with a real helm binary: lint, template under several value sets, and every
templated object valid for several Kubernetes versions."""

from __future__ import annotations

import copy
import os
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "moeserve"
VERSIONS = ("1.30.0", "1.32.0", "1.34.0", "1.37.0")
# Kinds from CRDs of other projects: kubernetes-validate has no schema for them.
FOREIGN = {("monitoring.coreos.com/v1", "ServiceMonitor")}
VALUE_SETS = {
    "defaults": [],
    "namespaced": ["--set", "watchNamespaces={llm,research}"],
    "monitoring": [
        "--set",
        "serviceMonitor.enabled=true",
        "--set",
        "prometheusAdapterRules.enabled=true",
        "--set",
        "image.tag=dev",
        "--set",
        "imagePullSecrets[0].name=regcred",
    ],
}
pytestmark = pytest.mark.timeout(120)


def run(helm: Path, *args: str) -> str:
    proc = subprocess.run([str(helm), *args], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, f"helm {' '.join(args)}:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def template(helm: Path, values: list[str]) -> list[dict[str, Any]]:
    out = run(
        helm,
        "template",
        "moeserve",
        str(CHART),
        "--namespace",
        "moeserve-system",
        "--include-crds",
        *values,
    )
    return [d for d in yaml.safe_load_all(out) if d]


@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_helm_lint(helm: Path, name: str) -> None:
    run(helm, "lint", "--strict", str(CHART), *VALUE_SETS[name])


@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_helm_template_validates(helm: Path, name: str) -> None:
    docs = template(helm, VALUE_SETS[name])
    kinds = {d["kind"] for d in docs}
    assert {"CustomResourceDefinition", "Deployment", "ServiceAccount"} <= kinds
    for doc in docs:
        if (doc["apiVersion"], doc["kind"]) in FOREIGN:
            continue
        for version in VERSIONS:
            kubernetes_validate.validate(doc, version, strict=True)


def test_cluster_vs_namespaced_rbac(helm: Path) -> None:
    cluster = template(helm, [])
    assert {d["kind"] for d in cluster} >= {"ClusterRole", "ClusterRoleBinding"}
    namespaced = template(helm, VALUE_SETS["namespaced"])
    kinds = [d["kind"] for d in namespaced]
    assert "ClusterRole" not in kinds and "ClusterRoleBinding" not in kinds
    roles = [d for d in namespaced if d["kind"] == "Role"]
    assert sorted(r["metadata"]["namespace"] for r in roles) == ["llm", "research"]
    deploy = next(d for d in namespaced if d["kind"] == "Deployment")
    args = deploy["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--namespace=llm" in args and "--namespace=research" in args


def test_operator_pod_hardening_and_least_privilege(helm: Path) -> None:
    docs = template(helm, [])
    deploy = next(d for d in docs if d["kind"] == "Deployment")
    pod = deploy["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["resources"]["limits"]["memory"]
    role = next(d for d in docs if d["kind"] == "ClusterRole")
    for rule in role["rules"]:
        assert "*" not in rule["verbs"] and "*" not in rule["resources"]
        if "secrets" in rule["resources"]:  # worker-plane tokens: written, never read
            assert rule["resources"] == ["secrets"] and set(rule["verbs"]) == {"create", "delete"}
        if rule["resources"] in (
            ["pods"],
            ["endpointslices"],
            ["namespaces"],
            ["customresourcedefinitions"],
        ):
            assert set(rule["verbs"]) <= {"get", "list", "watch"}


def _crds(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == "CustomResourceDefinition"}


def test_chart_crds_are_the_generated_crds_kept_on_uninstall(helm: Path) -> None:
    # Templates (not the chart's crds/ folder, which helm never upgrades), so `helm upgrade`
    # carries new spec fields to the cluster; "keep" so `helm uninstall` cannot delete every
    # MoEDeployment with its CRD.
    assert not (CHART / "crds").exists(), "helm would install crds/ once and never upgrade it"
    crds = _crds(template(helm, []))
    tops = [yaml.safe_load(p.read_text()) for p in (REPO / "crds").glob("*.yaml")]
    assert sorted(crds) == sorted(t["metadata"]["name"] for t in tops)
    for top in tops:
        rendered = copy.deepcopy(crds[top["metadata"]["name"]])
        annotations = rendered["metadata"].pop("annotations")
        assert annotations == {"helm.sh/resource-policy": "keep"}
        assert rendered == top


def test_chart_crds_can_be_left_to_another_tool(helm: Path) -> None:
    assert not _crds(template(helm, ["--set", "crds.install=false"]))
    unkept = _crds(template(helm, ["--set", "crds.keep=false"]))
    assert unkept and all("annotations" not in c["metadata"] for c in unkept.values())


def test_adapter_rules_serve_the_hpa_metric_names(helm: Path) -> None:
    from moeserve.common import spec as s

    docs = template(helm, VALUE_SETS["monitoring"])
    cm = next(
        d
        for d in docs
        if d["kind"] == "ConfigMap" and d["metadata"]["name"].endswith("adapter-rules")
    )
    rules = yaml.safe_load(cm["data"]["rules.yaml"])["rules"]
    served = {r["name"]["as"] for r in rules}
    assert served == {
        s.HPA_METRIC_NUM_REQUESTS_WAITING,
        s.HPA_METRIC_KV_CACHE_USAGE_PERC,
        s.HPA_METRIC_TIME_TO_FIRST_TOKEN_P90,
    }
    series = {r["seriesQuery"].split("{")[0] for r in rules}
    assert series == {
        s.METRIC_NUM_REQUESTS_WAITING,
        s.METRIC_KV_CACHE_USAGE_PERC,
        s.METRIC_TIME_TO_FIRST_TOKEN + "_bucket",
    }


def test_notes_render(helm: Path, tmp_path: Path) -> None:
    # A client-side dry run renders NOTES.txt without a cluster.
    proc = subprocess.run(
        [str(helm), "install", "moeserve", str(CHART), "--dry-run=client", "-n", "ops",
         "--set", "watchNamespaces={llm}", "--set", "prometheusAdapterRules.enabled=true"],
        capture_output=True, text=True, timeout=60,
        env={**os.environ, "KUBECONFIG": str(tmp_path / "none")})
    assert proc.returncode == 0, proc.stderr
    notes = proc.stdout.split("NOTES:", 1)[1]
    assert "watching: llm" in notes and "kubectl get moedeployments" in notes
    assert "moeserve-adapter-rules" in notes


def test_service_monitor_sends_a_bearer_token_only_when_given(helm: Path) -> None:
    def endpoint(extra: list[str]) -> dict[str, Any]:
        docs = template(helm, ["--set", "serviceMonitor.enabled=true", *extra])
        sm = next(d for d in docs if d["kind"] == "ServiceMonitor")
        return sm["spec"]["endpoints"][0]

    assert "bearerTokenSecret" not in endpoint([])
    got = endpoint(["--set", "serviceMonitor.bearerTokenSecret.name=metrics-key"])
    assert got["bearerTokenSecret"] == {"name": "metrics-key", "key": "api-key"}
