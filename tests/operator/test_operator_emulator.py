"""The real kopf operator against a stateful API emulator: create, scale, drift, readiness,
invalid specs, HPA-driven scaling."""

from __future__ import annotations

import asyncio
import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from moeserve.common.spec import parse_manifest
from moeserve.operator.render import render

REPO = Path(__file__).resolve().parents[2]
API = "moeserve.io/v1alpha1"
pytestmark = [pytest.mark.timeout(120), pytest.mark.slow]


def tiny() -> dict[str, Any]:
    return yaml.safe_load((REPO / "examples/tiny-cpu.yaml").read_text())


def names(cluster: Any, api_version: str, kind: str) -> set[str]:
    return {o["metadata"]["name"] for o in cluster.objects(api_version, kind)}


def expected_children(body: dict[str, Any]) -> set[tuple[str, str]]:
    return {(c["kind"], c["metadata"]["name"]) for c in render(parse_manifest(body))}


def all_children(cluster: Any) -> set[tuple[str, str]]:
    return {key for key in _by_key(cluster) if key[0] not in ("MoEDeployment", "Event", "Pod")}


def condition(body: dict[str, Any] | None, kind: str) -> dict[str, Any]:
    for cond in ((body or {}).get("status") or {}).get("conditions") or ():
        if cond["type"] == kind:
            return cond
    return {}


def test_create_scale_drift_ready(cluster_factory: Any) -> None:
    async def scenario() -> None:
        async with cluster_factory() as cluster:
            body = tiny()
            created = await cluster.create(body)
            want = expected_children({**body, "metadata": created["metadata"]})
            await cluster.wait_for("every child", lambda: all_children(cluster) >= want)
            assert all_children(cluster) == want
            uid = created["metadata"]["uid"]
            for kind, name in want:
                obj = next(o for (k, n), o in _by_key(cluster).items() if (k, n) == (kind, name))
                refs = obj["metadata"].get("ownerReferences") or []
                assert [(r["kind"], r["uid"], r.get("controller")) for r in refs] == [
                    ("MoEDeployment", uid, True)], (kind, name)

            # Status: Progressing until every group and the router report ready.
            dep = await cluster.wait_for("status", lambda: (cluster.get(API, "MoEDeployment",
                                         "tiny") or {}).get("status", {}).get("phase"))
            assert dep == "Progressing"

            # Scale decode from 1 to 3 groups, then back to 2.
            await cluster.patch(API, "MoEDeployment", "default", "tiny",
                                {"spec": {"decode": {"replicas": 3}}})
            decode = {"tiny-decode-0", "tiny-decode-1", "tiny-decode-2"}
            await cluster.wait_for("3 decode groups", lambda: decode <= names(
                cluster, "apps/v1", "StatefulSet"))
            await cluster.patch(API, "MoEDeployment", "default", "tiny",
                                {"spec": {"decode": {"replicas": 2}}})
            await cluster.wait_for("decode group 2 pruned", lambda: "tiny-decode-2" not in names(
                cluster, "apps/v1", "StatefulSet") and "tiny-decode-2" not in names(
                cluster, "v1", "Service"))
            pool = cluster.get(API, "MoEWorkerPool", "tiny-decode")
            assert pool["spec"]["replicas"] == 2

            # Drift: a deleted StatefulSet comes back; an edited one is restored.
            await cluster.delete("apps/v1", "StatefulSet", "default", "tiny-decode-1")
            await cluster.wait_for("deleted group restored", lambda: "tiny-decode-1" in names(
                cluster, "apps/v1", "StatefulSet"))
            await cluster.patch("apps/v1", "StatefulSet", "default", "tiny-prefill-0",
                                {"spec": {"replicas": 7}})
            await cluster.wait_for("edit reverted", lambda: cluster.get(
                "apps/v1", "StatefulSet", "tiny-prefill-0")["spec"]["replicas"] == 1)

            # Ready once every group's pods and the router report ready.
            for name, pods in (("tiny-prefill-0", 1), ("tiny-decode-0", 2), ("tiny-decode-1", 2)):
                await cluster.patch("apps/v1", "StatefulSet", "default", name,
                                    {"status": {"replicas": pods, "readyReplicas": pods}},
                                    subresource="status")
            await cluster.patch("apps/v1", "Deployment", "default", "tiny-router",
                                {"status": {"replicas": 1, "readyReplicas": 1}},
                                subresource="status")
            ready = await cluster.wait_for("Ready", lambda: (lambda d: d if d["status"].get(
                "phase") == "Ready" else None)(cluster.get(API, "MoEDeployment", "tiny")))
            status = ready["status"]
            assert status["ready"] == "3/3"
            assert status["pools"]["decode"].items() >= {
                "desiredGroups": 2, "readyGroups": 2, "updatedGroups": 2, "currentGroups": 0,
            }.items()
            assert status["routerEndpoint"] == "http://tiny-router.default.svc:8000"
            assert status["observedGeneration"] == ready["metadata"]["generation"]
            assert condition(ready, "Ready")["status"] == "True"
            assert condition(ready, "Degraded")["status"] == "False"
            pool = await cluster.wait_for("pool status", lambda: (lambda p: p if p.get(
                "status", {}).get("readyReplicas") == 2 else None)(
                cluster.get(API, "MoEWorkerPool", "tiny-decode")))
            assert pool["status"]["selector"] == \
                "moeserve.io/deployment=tiny,moeserve.io/role=decode"

    asyncio.run(scenario())


def _by_key(cluster: Any) -> dict[tuple[str, str], dict[str, Any]]:
    out = {}
    for api_version, kind in cluster.kinds:
        for obj in cluster.objects(api_version, kind):
            out[(kind, obj["metadata"]["name"])] = obj
    return out


def test_invalid_spec_degraded_event_no_children(cluster_factory: Any) -> None:
    async def scenario() -> None:
        async with cluster_factory() as cluster:
            body = tiny()
            body["spec"]["decode"]["parallelism"] = {"dp": 2, "ep": 3, "tp": 1}
            await cluster.create(body)
            dep = await cluster.wait_for("Degraded", lambda: (lambda d: d if condition(
                d, "Degraded").get("status") == "True" else None)(
                cluster.get(API, "MoEDeployment", "tiny")))
            degraded = condition(dep, "Degraded")
            assert degraded["reason"] == "InvalidSpec"
            assert "spec.decode.parallelism.ep" in degraded["message"]
            assert dep["status"]["phase"] == "Degraded"
            events = await cluster.wait_for("Warning event", lambda: [
                e for e in cluster.objects("v1", "Event") if e.get("reason") == "InvalidSpec"])
            assert events[0]["type"] == "Warning"
            assert "spec.decode.parallelism.ep" in events[0]["message"]
            assert events[0]["involvedObject"]["name"] == "tiny"
            await asyncio.sleep(1.5)  # past one resync: still nothing was created
            assert all_children(cluster) == set()

            # Fixing the spec recovers: children appear and Degraded clears.
            await cluster.patch(API, "MoEDeployment", "default", "tiny",
                                {"spec": {"decode": {"parallelism": {"ep": 2}}}})
            await cluster.wait_for("children after fix", lambda: ("StatefulSet", "tiny-decode-0")
                                   in all_children(cluster))
            await cluster.wait_for("Degraded cleared", lambda: condition(cluster.get(
                API, "MoEDeployment", "tiny"), "Degraded").get("status") == "False")

    asyncio.run(scenario())


def test_hpa_scales_pool_through_scale_subresource(cluster_factory: Any) -> None:
    async def scenario() -> None:
        async with cluster_factory() as cluster:
            body = copy.deepcopy(tiny())
            body["spec"]["decode"]["autoscaling"] = {
                "enabled": True, "minReplicas": 1, "maxReplicas": 3,
                "targetNumRequestsWaiting": 4}
            await cluster.create(body)
            await cluster.wait_for("HPA", lambda: cluster.get(
                "autoscaling/v2", "HorizontalPodAutoscaler", "tiny-decode"))
            hpa = cluster.get("autoscaling/v2", "HorizontalPodAutoscaler", "tiny-decode")
            assert hpa["spec"]["scaleTargetRef"] == {
                "apiVersion": API, "kind": "MoEWorkerPool", "name": "tiny-decode"}
            # What the HPA controller does: write replicas through the scale subresource.
            await cluster.wait_for("pool", lambda: cluster.get(API, "MoEWorkerPool",
                                                               "tiny-decode"))
            await cluster.patch(API, "MoEWorkerPool", "default", "tiny-decode",
                                {"spec": {"replicas": 3}}, subresource="scale")
            await cluster.wait_for("3 decode groups", lambda: {
                "tiny-decode-0", "tiny-decode-1", "tiny-decode-2"} <= names(
                cluster, "apps/v1", "StatefulSet"))
            await cluster.wait_for("pool status follows", lambda: cluster.get(
                API, "MoEWorkerPool", "tiny-decode").get("status", {}).get("replicas") == 3)
            # The operator does not fight the HPA on the next resync.
            await asyncio.sleep(1.5)
            assert cluster.get(API, "MoEWorkerPool", "tiny-decode")["spec"]["replicas"] == 3

            # Turning autoscaling off removes the HPA and returns to spec.replicas.
            await cluster.patch(API, "MoEDeployment", "default", "tiny",
                                {"spec": {"decode": {"autoscaling": {"enabled": False}}}})
            await cluster.wait_for("HPA pruned", lambda: cluster.get(
                "autoscaling/v2", "HorizontalPodAutoscaler", "tiny-decode") is None)
            await cluster.wait_for("back to 1 group", lambda: names(
                cluster, "apps/v1", "StatefulSet") == {"tiny-prefill-0", "tiny-decode-0"})

    asyncio.run(scenario())


def test_restart_resumes_and_repairs(cluster_factory: Any) -> None:
    """What changed while the operator was down is repaired when it comes back (resume)."""
    async def scenario() -> None:
        async with cluster_factory(resync_seconds=60) as cluster:
            await cluster.create(tiny())
            await cluster.wait_for("children", lambda: "tiny-decode-0" in names(
                cluster, "apps/v1", "StatefulSet"))
            await cluster.stop_operator()
            await cluster.delete("apps/v1", "StatefulSet", "default", "tiny-decode-0")
            await cluster.patch(API, "MoEDeployment", "default", "tiny",
                                {"spec": {"prefill": {"replicas": 2}}})
            assert "tiny-decode-0" not in names(cluster, "apps/v1", "StatefulSet")
            await cluster.start_operator()
            await cluster.wait_for("repaired after restart", lambda: {
                "tiny-decode-0", "tiny-prefill-0", "tiny-prefill-1"} <= names(
                cluster, "apps/v1", "StatefulSet"))

    asyncio.run(scenario())
