"""Everything render() produces validates against the Kubernetes schemas (several minor
versions), for the examples, a spread of hand-picked specs and hypothesis-generated ones."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from third_party_schemas import pod_templates, validate_third_party

from moeserve.common import spec as s
from moeserve.common.spec import parse_manifest
from moeserve.operator.render import render

REPO = Path(__file__).resolve().parents[2]
VERSIONS = ("1.30.0", "1.32.0", "1.34.0", "1.37.0")
# Only MoEDeployment manifests: examples/ also holds other files (a Ray Serve config).
EXAMPLES = sorted(p for p in (REPO / "examples").glob("*.yaml")
                  if "kind: MoEDeployment" in p.read_text())
OWN_API = f"{s.API_GROUP}/{s.API_VERSION}"
pytestmark = pytest.mark.timeout(120)


def example(name: str) -> dict[str, Any]:
    return yaml.safe_load((REPO / "examples" / name).read_text())


def variant(base: str, **spec_patch: Any) -> dict[str, Any]:
    doc = copy.deepcopy(example(base))
    _merge(doc["spec"], spec_patch)
    return doc


def _merge(into: dict[str, Any], patch: dict[str, Any]) -> None:
    for key, value in patch.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = value


SPREAD = {
    "host-path-tp2": variant("deepseek-v3-wide-ep.yaml", model={"source": {
        "hostPath": {"path": "/mnt/models"}, "pvc": None}}, prefill={
        "parallelism": {"dp": 8, "ep": 16, "tp": 2}}),
    "many-groups-all-targets": variant("deepseek-v3-wide-ep.yaml", decode={
        "replicas": 5, "autoscaling": {"maxReplicas": 8, "targetTimeToFirstTokenSeconds": 0.5}}),
    "cpu-multi-pod": variant("tiny-cpu.yaml", decode={
        "replicas": 3, "parallelism": {"dp": 4, "ep": 4}, "env": [{"name": "X", "value": "1"}],
        "extraArgs": ["--max-num-seqs", "8"], "affinity": {"podAntiAffinity": {
            "preferredDuringSchedulingIgnoredDuringExecution": [{"weight": 1, "podAffinityTerm": {
                "topologyKey": "kubernetes.io/hostname"}}]}}}),
    "router-lb-keys-pull-secrets": variant("tiny-cpu.yaml", imagePullSecrets=["regcred"],
                                           router={"serviceType": "LoadBalancer",
                                                   "apiKeySecret": "keys", "replicas": 3}),
    "gang-coscheduling-volcano": variant("tiny-cpu.yaml", decode={"replicas": 2, "scheduling": {
        "gang": "coscheduling", "priorityClassName": "llm"}}, prefill={"scheduling": {
            "gang": "volcano", "queue": "inference", "priorityClassName": "llm"}}),
    "gang-kueue-wide": variant("deepseek-v3-wide-ep.yaml", decode={"scheduling": {
        "gang": "kueue", "queue": "gpu"}}, prefill={"rollout": {"maxSurge": 0,
                                                                 "maxUnavailable": 1}}),
    "pvc-autoscaled-cpu": variant("tiny-cpu.yaml", model={"source": {
        "pvc": {"claimName": "tiny"}, "preset": None}, "path": "tiny"},
        prefill={"autoscaling": {"enabled": True, "maxReplicas": 4,
                                 "targetKvCacheUsagePerc": 0.8}}),
}
CASES = {p.name: yaml.safe_load(p.read_text()) for p in EXAMPLES} | SPREAD


def _clean_nones(doc: Any) -> Any:
    if isinstance(doc, dict):
        return {k: _clean_nones(v) for k, v in doc.items() if v is not None}
    return doc


def rendered(doc: dict[str, Any], uid: str | None = "0b7b8f4e-1f7a-4c39-9f0e-3c1d2f8a9e10"):
    dep = parse_manifest(_clean_nones(doc))
    return render(dep.model_copy(update={"uid": uid}))


def validate_all(objs: list[dict[str, Any]], versions: tuple[str, ...] = VERSIONS) -> int:
    checked = 0
    for obj in objs:
        if obj["apiVersion"] == OWN_API:
            continue  # validated against our CRDs in test_operator_crds.py
        if validate_third_party(obj):
            checked += len(versions)  # embedded schemas, no Kubernetes version
            for template in pod_templates(obj):
                for version in versions:
                    kubernetes_validate.validate(template, version, strict=True)
            continue
        for version in versions:
            kubernetes_validate.validate(obj, version, strict=True)
            checked += 1
    return checked


def test_lws_preflight_manifests_validate() -> None:
    # Not in CASES: other suites read pods from the StatefulSets of every case.
    doc = variant("deepseek-v3-wide-ep.yaml", decode={
        "workload": "lws", "preflight": {"enabled": True, "minAllToAllGbps": 20}})
    objs = rendered(doc)
    assert {o["kind"] for o in objs} >= {"LeaderWorkerSet", "StatefulSet"}
    assert validate_all(objs) >= len(VERSIONS) * 8


@pytest.mark.parametrize("name", sorted(CASES))
def test_rendered_manifests_validate(name: str) -> None:
    objs = rendered(CASES[name])
    assert validate_all(objs) >= len(VERSIONS) * 8


def test_examples_cover_both_topologies() -> None:
    names = {p.name for p in EXAMPLES}
    assert {"tiny-cpu.yaml", "deepseek-v3-wide-ep.yaml"} <= names
    dsv3 = parse_manifest(example("deepseek-v3-wide-ep.yaml")).spec
    assert (dsv3.prefill.parallelism.ep, dsv3.decode.parallelism.ep) == (16, 32)
    assert dsv3.prefill.gpus_per_pod == dsv3.decode.gpus_per_pod == 8


def _by(objs: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {o["metadata"]["name"]: o for o in objs if o["kind"] == kind}


def test_wide_ep_topology_and_worker_contract() -> None:
    objs = rendered(example("deepseek-v3-wide-ep.yaml"))
    sts = _by(objs, "StatefulSet")
    assert set(sts) == {"deepseek-v3-prefill-0", "deepseek-v3-decode-0"}
    assert sts["deepseek-v3-prefill-0"]["spec"]["replicas"] == 2  # EP16 / 8 GPUs
    assert sts["deepseek-v3-decode-0"]["spec"]["replicas"] == 4  # EP32 / 8 GPUs
    pod = sts["deepseek-v3-decode-0"]["spec"]["template"]["spec"]
    worker = pod["containers"][0]
    assert worker["command"] == [
        "moeserve", "worker", "--role", "decode", "--model", "/models/DeepSeek-V3",
        "--port", "8100", "--dp", "32", "--ep", "32"]
    env = {e["name"]: e.get("value", e.get("valueFrom")) for e in worker["env"]}
    assert env[s.ENV_RANK] == {"fieldRef": {
        "fieldPath": "metadata.labels['apps.kubernetes.io/pod-index']"}}
    assert env[s.ENV_WORLD_SIZE] == "32" and env[s.ENV_RANKS_PER_POD] == "8"
    assert env[s.ENV_GROUP] == "0" and env[s.ENV_ROLE] == "decode"
    assert env[s.ENV_MODEL] == "deepseek-ai/DeepSeek-V3"
    assert env[s.ENV_RENDEZVOUS] == \
        "deepseek-v3-decode-0-0.deepseek-v3-decode-0.llm.svc.cluster.local:8400"
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == 8
    ports = {p["name"]: p["containerPort"] for p in worker["ports"]}
    assert ports == {"grpc": 8100, "metrics": 8200, "nixl": 8300, "rendezvous": 8400}
    svc = _by(objs, "Service")["deepseek-v3-decode-0"]["spec"]
    assert svc["clusterIP"] == "None" and svc["publishNotReadyAddresses"] is True
    labels = sts["deepseek-v3-decode-0"]["spec"]["template"]["metadata"]["labels"]
    assert labels[s.LABEL_DEPLOYMENT] == "deepseek-v3" and labels[s.LABEL_ROLE] == "decode"
    assert labels[s.LABEL_GROUP] == "0"


def test_pods_are_locked_down() -> None:
    for name in CASES:
        for obj in rendered(CASES[name]):
            if obj["kind"] not in ("StatefulSet", "Deployment"):
                continue
            pod = obj["spec"]["template"]["spec"]
            assert pod["securityContext"]["runAsNonRoot"] is True
            assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
            for c in pod["containers"] + pod.get("initContainers", []):
                sc = c["securityContext"]
                assert sc["readOnlyRootFilesystem"] is True, (name, c["name"])
                assert sc["allowPrivilegeEscalation"] is False
                assert sc["capabilities"] == {"drop": ["ALL"]}
                mounts = {m["mountPath"] for m in c["volumeMounts"]}
                assert "/tmp" in mounts  # the one writable scratch place


@pytest.mark.parametrize("cache,volume", [
    ({"hostPath": "/var/cache/moeserve"},
     {"hostPath": {"path": "/var/cache/moeserve", "type": "DirectoryOrCreate"}}),
    ({"pvc": "kernel-cache"}, {"persistentVolumeClaim": {"claimName": "kernel-cache"}}),
])
def test_compile_cache_outlives_the_pod(cache: dict[str, Any], volume: dict[str, Any]) -> None:
    """spec.compileCache mounts where TRITON_CACHE_DIR points, in every worker pod: a new pod
    then finds the kernels the last one compiled instead of compiling them before ready."""
    objs = rendered(variant("tiny-cpu.yaml", compileCache=cache))
    validate_all(objs)
    pods = [o["spec"]["template"]["spec"] for o in _by(objs, "StatefulSet").values()]
    assert pods
    for pod in pods:
        worker = pod["containers"][0]
        env = {e["name"]: e.get("value") for e in worker["env"]}
        mounts = {m["mountPath"]: m["name"] for m in worker["volumeMounts"]}
        assert mounts[env["TRITON_CACHE_DIR"]] == "compile-cache"
        assert {"name": "compile-cache", **volume} in pod["volumes"]
    # without it the cache is the pod's own emptyDir, nothing extra mounted
    plain = _by(rendered(example("tiny-cpu.yaml")), "StatefulSet")
    for sts in plain.values():
        assert all(v["name"] != "compile-cache" for v in sts["spec"]["template"]["spec"]["volumes"])


def test_router_rbac_is_discovery_only_and_hpa_targets_pool() -> None:
    objs = rendered(example("deepseek-v3-wide-ep.yaml"))
    role = _by(objs, "Role")["deepseek-v3-router"]
    verbs = {v for rule in role["rules"] for v in rule["verbs"]}
    resources = {r for rule in role["rules"] for r in rule["resources"]}
    # Exactly what the router's discovery calls (moeserve/router/discovery_k8s.py).
    assert verbs == {"list", "watch"} and resources == {"endpointslices"}
    hpa = _by(objs, "HorizontalPodAutoscaler")["deepseek-v3-decode"]["spec"]
    assert hpa["scaleTargetRef"] == {"apiVersion": OWN_API, "kind": "MoEWorkerPool",
                                     "name": "deepseek-v3-decode"}
    metrics = {m["pods"]["metric"]["name"]: m["pods"]["target"]["averageValue"]
               for m in hpa["metrics"]}
    assert metrics == {s.HPA_METRIC_NUM_REQUESTS_WAITING: "32",
                       s.HPA_METRIC_KV_CACHE_USAGE_PERC: "850m"}
    cfg = yaml.safe_load(_by(objs, "ConfigMap")["deepseek-v3-router"]["data"]["router.yaml"])
    assert cfg["discovery"]["selector"] == {s.LABEL_DEPLOYMENT: "deepseek-v3",
                                            s.LABEL_COMPONENT: "worker"}


def test_render_without_uid_has_no_owner_references() -> None:
    for obj in rendered(example("tiny-cpu.yaml"), uid=None):
        assert "ownerReferences" not in obj["metadata"]
    for obj in rendered(example("tiny-cpu.yaml")):
        assert obj["metadata"]["ownerReferences"][0]["kind"] == "MoEDeployment"


@st.composite
def specs(draw: st.DrawFn) -> dict[str, Any]:
    def pool() -> dict[str, Any]:
        gpus = draw(st.sampled_from([0, 1, 2, 4, 8]))
        tp = draw(st.sampled_from([t for t in (1, 2, 4, 8) if gpus == 0 or gpus % t == 0]))
        pods = draw(st.integers(1, 4))
        ep = (gpus or 1) * pods
        if ep % tp:
            tp = 1
        scaling = draw(st.booleans())
        return {
            "replicas": draw(st.integers(1, 4)), "gpusPerPod": gpus,
            "parallelism": {"dp": ep // tp, "ep": ep, "tp": tp},
            "autoscaling": {"enabled": scaling, "minReplicas": 1, "maxReplicas": 6,
                            "targetNumRequestsWaiting": draw(st.sampled_from([1, 2.5, 64]))},
            "eplb": {"enabled": draw(st.booleans())}, "dbo": {"enabled": draw(st.booleans())},
        }

    name = draw(st.from_regex(r"[a-z][a-z0-9]{0,20}", fullmatch=True))
    source = draw(st.sampled_from([{"preset": "tiny"}, {"pvc": {"claimName": "m"}},
                                   {"hostPath": {"path": "/data"}}]))
    return {"apiVersion": OWN_API, "kind": "MoEDeployment",
            "metadata": {"name": name, "namespace": draw(st.sampled_from(["default", "a-b"]))},
            "spec": {"model": {"name": "m", "source": source}, "prefill": pool(),
                     "decode": pool()}}


@pytest.mark.slow
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(specs())
def test_generated_specs_render_valid_manifests(doc: dict[str, Any]) -> None:
    objs = rendered(doc)
    validate_all(objs, versions=("1.30.0", "1.37.0"))
    dep = parse_manifest(doc)
    for role in s.ROLES:
        pool = dep.spec.pool(role)
        groups = [o for o in objs if o["kind"] == "StatefulSet"
                  and o["metadata"]["labels"][s.LABEL_ROLE] == role]
        assert all(g["spec"]["replicas"] == s.pods_per_group(pool) for g in groups)
        if not pool.autoscaling.enabled:
            assert len(groups) == pool.replicas
