"""What the operator renders, judged as the cluster would enforce it.

NetworkPolicies are evaluated (the ingress semantics of networking.k8s.io/v1: a pod selected by
any policy admits only what some rule of some selecting policy admits) over a matrix of peers x
ports, and must admit exactly: the deployment's workers on every port, its router on the worker
gRPC port, the monitoring namespace on the metrics port. Every workload of the examples and of
generated specs carries the hardened security context.
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings

from moeserve.common import spec as s
from moeserve.common.spec_security import DEFAULT_MONITORING_SELECTOR, TLS_MOUNT
from tests.operator.test_operator_render import CASES, example, rendered, specs

EPHEMERAL = 41234  # an NCCL / gloo / UCX port picked at run time
# Every MoEDeployment of the examples and the spread (examples/ also holds other kinds).
DEPLOYMENTS = {k: v for k, v in CASES.items() if v.get("kind") == "MoEDeployment"}
PORTS = {"grpc": s.PORT_WORKER_GRPC, "nixl": s.PORT_WORKER_NIXL,
         "metrics": s.PORT_WORKER_METRICS, "rendezvous": s.PORT_WORKER_RENDEZVOUS,
         "ephemeral": EPHEMERAL}  # fmt: skip


def _matches(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    assert set(selector) <= {"matchLabels"}, "the evaluator knows matchLabels only"
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())


def _peer_ok(peer: dict[str, Any], pod: dict[str, str], ns: str, ns_labels: dict[str, str],
             policy_ns: str) -> bool:  # fmt: skip
    assert "ipBlock" not in peer
    if "namespaceSelector" in peer:
        if not _matches(peer["namespaceSelector"], ns_labels):
            return False
    elif ns != policy_ns:  # a bare podSelector means the policy's own namespace
        return False
    return "podSelector" not in peer or _matches(peer["podSelector"], pod)


def admitted(policies: list[dict[str, Any]], target: dict[str, str], src: dict[str, str],
             src_ns: str, src_ns_labels: dict[str, str], port: int) -> bool:  # fmt: skip
    # Workers and their policies share the deployment's namespace.
    selecting = [p for p in policies if _matches(p["spec"]["podSelector"], target)]
    if not selecting:
        return True  # not isolated
    for policy in selecting:
        assert "Ingress" in policy["spec"]["policyTypes"]
        for rule in policy["spec"].get("ingress", []):
            ports = rule.get("ports")
            if ports and not any(p["port"] <= port <= p.get("endPort", p["port"])
                                 and p.get("protocol", "TCP") == "TCP" for p in ports):  # fmt: skip
                continue
            peers = rule.get("from")
            ns = policy["metadata"]["namespace"]
            if not peers or any(_peer_ok(peer, src, src_ns, src_ns_labels, ns) for peer in peers):
                return True
    return False


def _pod_labels(objs: list[dict[str, Any]]) -> dict[str, dict[str, str]]:
    """Template labels of every workload, by object name."""
    return {o["metadata"]["name"]: o["spec"]["template"]["metadata"]["labels"]
            for o in objs if o["kind"] in ("StatefulSet", "Deployment")}  # fmt: skip


def _sources(objs: list[dict[str, Any]], dep: str) -> dict[str, tuple[dict, str, dict]]:
    NS = objs[0]["metadata"]["namespace"]  # noqa: N806
    pods = _pod_labels(objs)
    router = next(v for k, v in pods.items() if v[s.LABEL_COMPONENT] == "router")
    prefill = next(v for v in pods.values() if v.get(s.LABEL_ROLE) == "prefill")
    decode = next(v for v in pods.values() if v.get(s.LABEL_ROLE) == "decode")
    other = {k: v.replace(dep, "other") if isinstance(v, str) else v for k, v in router.items()}
    other_worker = {**decode, s.LABEL_DEPLOYMENT: "other"}
    ns_default = {"kubernetes.io/metadata.name": NS}
    monitoring = dict(DEFAULT_MONITORING_SELECTOR)
    return {
        "router": (router, NS, ns_default),
        "prefill": (prefill, NS, ns_default),
        "decode": (decode, NS, ns_default),
        "router of another deployment": (other, NS, ns_default),
        "worker of another deployment": (other_worker, NS, ns_default),
        "unlabelled pod": ({"app": "debug"}, NS, ns_default),
        # The same labels from another namespace: a bare podSelector must not match them.
        "router in another namespace": (router, "evil", {"kubernetes.io/metadata.name": "evil"}),
        "worker in another namespace": (decode, "evil", {"kubernetes.io/metadata.name": "evil"}),
        "prometheus": ({"app": "prometheus"}, "monitoring", monitoring),
    }


def _expected(source: str, port_name: str) -> bool:
    if source in ("prefill", "decode"):
        return True
    if source == "router":
        return port_name == "grpc"
    if source == "prometheus":
        return port_name == "metrics"
    return False


@pytest.mark.parametrize("name", sorted(DEPLOYMENTS))
def test_network_policies_admit_exactly_the_deployment_plane(name: str) -> None:
    objs = rendered(DEPLOYMENTS[name])
    dep = objs[0]["metadata"]["labels"][s.LABEL_DEPLOYMENT]
    policies = [o for o in objs if o["kind"] == "NetworkPolicy"]
    assert sorted(p["metadata"]["name"] for p in policies) == sorted(
        f"{dep}-{role}" for role in s.ROLES)  # one per pool
    sources = _sources(objs, dep)
    workers = {k: v for k, v in _pod_labels(objs).items() if v[s.LABEL_COMPONENT] == "worker"}
    wrong = []
    for target_name, target in workers.items():
        for src_name, (src, ns, ns_labels) in sources.items():
            for port_name, port in PORTS.items():
                got = admitted(policies, target, src, ns, ns_labels, port)
                if got != _expected(src_name, port_name):
                    wrong.append(f"{src_name} -> {target_name}:{port_name} admitted={got}")
    assert not wrong, "\n".join(wrong)


def _check_pod(pod: dict[str, Any], where: str) -> None:
    psc = pod["securityContext"]
    assert psc["runAsNonRoot"] is True and psc["runAsUser"] != 0, where
    assert psc["seccompProfile"] == {"type": "RuntimeDefault"}, where
    assert not pod.get("hostNetwork") and not pod.get("hostPID") and not pod.get("hostIPC")
    volumes = {v["name"]: v for v in pod["volumes"]}
    for c in pod["containers"] + pod.get("initContainers", []):
        sc = c["securityContext"]
        assert sc["readOnlyRootFilesystem"] is True, (where, c["name"])
        assert sc["allowPrivilegeEscalation"] is False, (where, c["name"])
        assert sc["capabilities"] == {"drop": ["ALL"]}, (where, c["name"])
        assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
        assert not sc.get("privileged") and sc.get("runAsNonRoot", True) is True
        for m in c.get("volumeMounts", []):
            vol = volumes[m["name"]]
            # Writing happens only in scratch space; model and config mounts are read-only
            # (a preset download writes the model volume from an init container, an emptyDir).
            assert m.get("readOnly") or "emptyDir" in vol, (where, c["name"], m)


def _check_all(objs: list[dict[str, Any]], where: str) -> None:
    sas = {o["metadata"]["name"]: o for o in objs if o["kind"] == "ServiceAccount"}
    workloads = [o for o in objs if o["kind"] in ("StatefulSet", "Deployment")]
    assert workloads
    for o in workloads:
        pod = o["spec"]["template"]["spec"]
        _check_pod(pod, f"{where}/{o['metadata']['name']}")
        if o["kind"] == "StatefulSet":  # workers never call the API: no token anywhere
            assert pod["automountServiceAccountToken"] is False
            assert sas[pod["serviceAccountName"]]["automountServiceAccountToken"] is False
        else:  # the router watches EndpointSlices: it keeps its (Role-bound) token
            assert pod["serviceAccountName"] in sas


@pytest.mark.parametrize("name", sorted(DEPLOYMENTS))
def test_every_rendered_workload_is_hardened(name: str) -> None:
    _check_all(rendered(DEPLOYMENTS[name]), name)


@pytest.mark.slow
@settings(max_examples=25, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow])  # fmt: skip
@given(specs())
def test_generated_specs_render_hardened_workloads(doc: dict[str, Any]) -> None:
    objs = rendered(doc)
    _check_all(objs, doc["metadata"]["name"])
    assert len([o for o in objs if o["kind"] == "NetworkPolicy"]) == len(s.ROLES)


def _with_security(security: dict[str, Any]) -> list[dict[str, Any]]:
    doc = example("tiny-cpu.yaml")
    doc["spec"]["security"] = security
    return rendered(doc)


def test_monitoring_selector_is_configurable() -> None:
    objs = _with_security({"monitoringNamespaceSelector": {"team": "obs"}})
    policies = [o for o in objs if o["kind"] == "NetworkPolicy"]
    target = next(v for v in _pod_labels(objs).values() if v.get(s.LABEL_ROLE) == "decode")
    metrics = s.PORT_WORKER_METRICS
    assert admitted(policies, target, {"app": "p"}, "o11y", {"team": "obs"}, metrics)
    assert not admitted(policies, target, {"app": "p"}, "monitoring",
                        dict(DEFAULT_MONITORING_SELECTOR), metrics)  # fmt: skip
    assert not admitted(policies, target, {"app": "p"}, "o11y", {"team": "obs"},
                        s.PORT_WORKER_GRPC)  # fmt: skip


def test_tls_secret_is_mounted_and_passed_to_router_and_workers() -> None:
    plain = rendered(example("tiny-cpu.yaml"))
    objs = _with_security({"tls": {"secretName": "plane-certs"}})
    _check_all(objs, "tls")
    flags = ["--tls-cert", f"{TLS_MOUNT}/tls.crt", "--tls-key", f"{TLS_MOUNT}/tls.key",
             "--tls-ca", f"{TLS_MOUNT}/ca.crt"]  # fmt: skip
    for o in (o for o in objs if o["kind"] in ("StatefulSet", "Deployment")):
        pod = o["spec"]["template"]["spec"]
        main = pod["containers"][0]
        cmd = main["command"]
        assert cmd[cmd.index("--tls-cert"):cmd.index("--tls-cert") + 6] == flags
        assert {"name": "tls", "mountPath": TLS_MOUNT, "readOnly": True} in main["volumeMounts"]
        vol = next(v for v in pod["volumes"] if v["name"] == "tls")
        assert vol["secret"]["secretName"] == "plane-certs"
        if o["kind"] == "StatefulSet":  # the kubelet cannot speak TLS to a gRPC probe
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                assert main[probe]["tcpSocket"] == {"port": s.PORT_WORKER_GRPC}
    for o in (o for o in plain if o["kind"] in ("StatefulSet", "Deployment")):
        assert "--tls-cert" not in o["spec"]["template"]["spec"]["containers"][0]["command"]


def test_api_key_secret_reaches_the_router_as_its_keys_env() -> None:
    from moeserve.router.auth import keys_from_sources

    doc = example("tiny-cpu.yaml")
    doc["spec"].setdefault("router", {})["apiKeySecret"] = "llm-keys"
    router = next(o for o in rendered(doc) if o["kind"] == "Deployment")
    env = {e["name"]: e for e in router["spec"]["template"]["spec"]["containers"][0]["env"]}
    ref = env[s.ENV_API_KEYS]["valueFrom"]["secretKeyRef"]
    assert ref == {"name": "llm-keys", "key": "api-keys"}
    # What the Secret holds, as the router reads it from that variable.
    assert keys_from_sources([], {s.ENV_API_KEYS: "sk-a,sk-b\n"}) == ["sk-a", "sk-b"]
