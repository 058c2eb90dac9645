"""The operator scenarios of tests/operator, against a real cluster (kind in a user's CI).

Run with KUBECONFIG pointing at a disposable cluster:

    KUBECONFIG=~/.kube/kind python -m pytest e2e/test_operator_e2e.py

The CRDs are applied, the operator runs in this process (no image needed), each test works in a
fresh namespace that is deleted afterwards. Readiness needs real worker pods: set
MOESERVE_E2E_IMAGE (an image with moeserve, loaded into the cluster) to run it.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
API = "moeserve.io/v1alpha1"

pytestmark = [
    pytest.mark.skipif(not os.environ.get("KUBECONFIG"),
                       reason="e2e needs a real cluster: set KUBECONFIG (e.g. a kind cluster)"),
    pytest.mark.timeout(600),
]


def kubectl(*args: str, stdin: str | None = None, check: bool = True) -> str:
    proc = subprocess.run(["kubectl", *args], input=stdin, capture_output=True, text=True,
                          timeout=120)
    if check and proc.returncode:
        raise AssertionError(f"kubectl {' '.join(args)}: {proc.stderr}")
    return proc.stdout + proc.stderr


def get(kind: str, namespace: str, name: str | None = None) -> Any:
    args = ["get", kind, "-n", namespace, "-o", "json"] + ([name] if name else [])
    out = kubectl(*args, check=False)
    try:
        return json.loads(out)
    except json.JSONDecodeError:
        return None


def wait_for(what: str, check: Callable[[], Any], timeout: float = 120) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(1)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture(scope="module")
def operator() -> Iterator[None]:
    """CRDs applied and the real operator running in a background thread."""
    import kopf

    from moeserve.operator.handlers import OperatorConfig, build_registry

    kubectl("apply", "--server-side", "-f", str(REPO / "crds"))
    kubectl("wait", "--for=condition=Established", "crd/moedeployments.moeserve.io",
            "crd/moeworkerpools.moeserve.io", "--timeout=60s")
    stop = threading.Event()
    registry = build_registry(OperatorConfig(resync_seconds=5))
    thread = threading.Thread(target=lambda: asyncio.run(kopf.operator(
        registry=registry, clusterwide=True, standalone=True, stop_flag=stop)), daemon=True)
    thread.start()
    yield
    stop.set()
    thread.join(timeout=30)


@pytest.fixture
def namespace(operator: None) -> Iterator[str]:
    name = f"moeserve-e2e-{uuid.uuid4().hex[:6]}"
    kubectl("create", "namespace", name)
    yield name
    kubectl("delete", "namespace", name, "--wait=false", check=False)


def tiny(namespace: str, image: str | None = None) -> dict[str, Any]:
    doc = yaml.safe_load((REPO / "examples/tiny-cpu.yaml").read_text())
    doc["metadata"]["namespace"] = namespace
    if image:
        doc["spec"]["image"] = image
        doc["spec"]["router"]["image"] = image
        doc["spec"]["imagePullPolicy"] = "IfNotPresent"
    return doc


def sts_names(namespace: str) -> set[str]:
    items = (get("statefulsets", namespace) or {}).get("items", [])
    return {i["metadata"]["name"] for i in items}


def test_create_scale_and_restore(namespace: str) -> None:
    kubectl("apply", "-f", "-", stdin=yaml.safe_dump(tiny(namespace)))
    wait_for("groups", lambda: sts_names(namespace) == {"tiny-prefill-0", "tiny-decode-0"})
    dep = get("moedeployment", namespace, "tiny")
    for kind in ("statefulsets", "services", "deployments", "configmaps", "moeworkerpools",
                 "networkpolicies", "roles", "rolebindings"):
        for item in get(kind, namespace)["items"]:
            if item["metadata"].get("labels", {}).get("moeserve.io/deployment") != "tiny":
                continue
            refs = item["metadata"]["ownerReferences"]
            assert refs[0]["uid"] == dep["metadata"]["uid"], (kind, item["metadata"]["name"])

    kubectl("patch", "moedeployment", "tiny", "-n", namespace, "--type=merge",
            "-p", '{"spec": {"decode": {"replicas": 2}}}')
    wait_for("scale up", lambda: "tiny-decode-1" in sts_names(namespace))

    kubectl("delete", "statefulset", "tiny-decode-1", "-n", namespace)
    wait_for("restored", lambda: "tiny-decode-1" in sts_names(namespace))
    status = wait_for("status", lambda: (get("moedeployment", namespace, "tiny") or {}).get(
        "status", {}).get("phase"))
    assert status in ("Progressing", "Ready")


def test_api_server_rejects_invalid_spec_naming_the_field(namespace: str) -> None:
    doc = tiny(namespace)
    doc["spec"]["decode"]["parallelism"] = {"dp": 2, "ep": 3, "tp": 1}
    out = kubectl("apply", "-f", "-", stdin=yaml.safe_dump(doc), check=False)
    assert "spec.decode.parallelism.ep" in out, out
    assert get("moedeployment", namespace, "tiny") is None


@pytest.mark.skipif(not os.environ.get("MOESERVE_E2E_IMAGE"),
                    reason="readiness needs running workers: set MOESERVE_E2E_IMAGE")
def test_ready_when_workers_run(namespace: str) -> None:
    kubectl("apply", "-f", "-", stdin=yaml.safe_dump(tiny(namespace,
                                                          os.environ["MOESERVE_E2E_IMAGE"])))
    wait_for("Ready", lambda: (get("moedeployment", namespace, "tiny") or {}).get(
        "status", {}).get("phase") == "Ready", timeout=540)
