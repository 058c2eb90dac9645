"""Fabric preflight: `moeserve preflight` over 2 local processes (gloo all-to-all + NIXL UCX
read), the init container it renders as, and FabricReady from pod status (pure and through the
real operator against the API emulator)."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from moeserve.common.spec import parse_manifest
from moeserve.operator.conditions import fabric_condition
from moeserve.operator.render import render
from moeserve.worker.preflight import RESULT_KEY

REPO = Path(__file__).resolve().parents[2]
API = "moeserve.io/v1alpha1"


def tiny(preflight: dict[str, Any] | None = None) -> dict[str, Any]:
    body = yaml.safe_load((REPO / "examples/tiny-cpu.yaml").read_text())
    body["spec"]["decode"]["preflight"] = preflight or {
        "enabled": True, "minAllToAllGbps": 0.5, "minNixlGbps": 1, "bytes": 1 << 20}
    return body


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _run_pair(tmp_path: Path, *floors: str) -> list[tuple[int, dict[str, Any]]]:
    rendezvous = f"127.0.0.1:{_free_port()}"
    procs = [subprocess.Popen(
        [sys.executable, "-m", "moeserve.cli", "preflight", "--rank", str(rank),
         "--world-size", "2", "--rendezvous", rendezvous, "--bytes", str(4 << 20),
         "--timeout-s", "60", "--result-file", str(tmp_path / f"r{rank}.json"), *floors],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for rank in range(2)]
    codes = [p.wait(timeout=120) for p in procs]
    return [(code, json.loads((tmp_path / f"r{rank}.json").read_text())[RESULT_KEY])
            for rank, code in enumerate(codes)]


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_two_local_processes_pass_and_fail_on_the_floor(tmp_path: Path) -> None:
    results = _run_pair(tmp_path)
    for code, data in results:
        assert code == 0 and data["ok"] and data["problems"] == []
        assert data["all_to_all_gbps"] > 0 and data["nixl_gbps"] > 0
    results = _run_pair(tmp_path, "--min-nixl-gbps", "1e6")
    for code, data in results:
        assert code == 1 and not data["ok"]
        assert data["nixl_gbps"] > 0  # measured, and below the floor
        assert any("NIXL read" in p and "< floor 1000000.0" in p for p in data["problems"])


@pytest.mark.timeout(60)
def test_renders_an_init_container_that_validates() -> None:
    dep = parse_manifest(tiny()).model_copy(update={"uid": "u-1"})
    objs = render(dep)
    sts = {o["metadata"]["name"]: o for o in objs if o["kind"] == "StatefulSet"}
    pod = sts["tiny-decode-0"]["spec"]["template"]["spec"]
    init = {c["name"]: c for c in pod["initContainers"]}
    assert list(init) == ["make-checkpoint", "preflight"]
    check = init["preflight"]
    assert check["command"] == ["moeserve", "preflight", "--min-alltoall-gbps", "0.5",
                                "--min-nixl-gbps", "1", "--bytes", "1048576",
                                "--timeout-s", "600"]
    env = {e["name"] for e in check["env"]}
    assert {"MOESERVE_RANK", "MOESERVE_NUM_PODS", "MOESERVE_RENDEZVOUS"} <= env
    assert "preflight" not in str(sts["tiny-prefill-0"]["spec"]["template"]["spec"])
    for version in ("1.30.0", "1.37.0"):
        kubernetes_validate.validate(sts["tiny-decode-0"], version, strict=True)


def _pod(name: str, state: dict[str, Any], last: dict[str, Any] | None = None) -> dict:
    status = {"name": "preflight", "state": state, "lastState": last or {}}
    return {"metadata": {"name": name, "labels": {"moeserve.io/role": "decode"}},
            "status": {"initContainerStatuses": [status]}}


def _terminated(code: int, problems: list[str], a2a: float, nixl: float) -> dict[str, Any]:
    message = json.dumps({RESULT_KEY: {"all_to_all_gbps": a2a, "nixl_gbps": nixl,
                                       "problems": problems, "ok": not problems}})
    return {"terminated": {"exitCode": code, "message": message}}


def test_fabric_condition_from_pod_status() -> None:
    dep = parse_manifest(tiny())
    slow = _terminated(1, ["all-to-all 0.2 GB/s < floor 0.5"], 0.2, 3.1)
    kind, ok, reason, message = fabric_condition(dep, [
        _pod("tiny-decode-0-0", {"waiting": {"reason": "PodInitializing"}}, slow),
        _pod("tiny-decode-0-1", _terminated(0, [], 2.0, 3.0))])
    assert (kind, ok, reason) == ("FabricReady", False, "PreflightFailed")
    assert "tiny-decode-0-0: all-to-all 0.2 GB/s, NIXL 3.1 GB/s" in message
    assert fabric_condition(dep, [_pod("p", {"running": {}})])[1:3] == (False, "Pending")
    assert fabric_condition(dep, [_pod("p", _terminated(0, [], 2.0, 3.0))])[1:3] == \
        (True, "Passed")
    assert fabric_condition(parse_manifest(tiny({"enabled": False})), []) is None


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_failed_preflight_keeps_group_unready_with_numbers(cluster_factory: Any) -> None:
    async def scenario() -> None:
        async with cluster_factory() as cluster:
            await cluster.create(tiny())
            await cluster.wait_for("group", lambda: cluster.get(
                "apps/v1", "StatefulSet", "tiny-decode-0"))
            pod = _pod("tiny-decode-0-0", {"waiting": {"reason": "PodInitializing"}},
                       _terminated(1, ["all-to-all 0.2 GB/s < floor 0.5"], 0.2, 3.1))
            pod["metadata"].update(namespace="default", labels={
                "moeserve.io/deployment": "tiny", "moeserve.io/role": "decode"})
            status = pod.pop("status")
            await cluster.create({"apiVersion": "v1", "kind": "Pod", **pod,
                                  "spec": {"containers": [{"name": "w", "image": "x"}]}})
            await cluster.patch("v1", "Pod", "default", "tiny-decode-0-0", {"status": status},
                                subresource="status")
            dep = await cluster.wait_for("FabricReady=False", lambda: (lambda d: d if any(
                c["type"] == "FabricReady" and c["reason"] == "PreflightFailed"
                for c in d.get("status", {}).get("conditions", [])) else None)(
                cluster.get(API, "MoEDeployment", "tiny")), timeout=30)
            fabric = next(c for c in dep["status"]["conditions"] if c["type"] == "FabricReady")
            assert fabric["status"] == "False" and "0.2 GB/s" in fabric["message"]
            assert dep["status"]["pools"]["decode"]["readyGroups"] == 0
            ready = next(c for c in dep["status"]["conditions"] if c["type"] == "Ready")
            assert ready["status"] == "False"

    asyncio.run(scenario())
