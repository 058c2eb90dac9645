"""Day 2 against the API emulator with the real kopf operator: gang objects and unplaced
groups, a group-by-group roll with a ready compatible pair at every observed moment, a stalled
roll that ends Degraded and is rolled back by editing the spec back."""

from __future__ import annotations

import asyncio
import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from moeserve.operator.build_groups import COMPAT_LABEL, REVISION_LABEL

REPO = Path(__file__).resolve().parents[2]
API = "moeserve.io/v1alpha1"
COSCHED = "scheduling.x-k8s.io/v1alpha1"
VOLCANO = "scheduling.volcano.sh/v1beta1"
pytestmark = [pytest.mark.timeout(150), pytest.mark.slow]


def tiny(**pools: Any) -> dict[str, Any]:
    body = yaml.safe_load((REPO / "examples/tiny-cpu.yaml").read_text())
    for role, patch in pools.items():
        body["spec"][role].update(copy.deepcopy(patch))
    return body


def condition(body: dict[str, Any] | None, kind: str) -> dict[str, Any]:
    for cond in ((body or {}).get("status") or {}).get("conditions") or ():
        if cond["type"] == kind:
            return cond
    return {}


def groups(cluster: Any) -> dict[str, dict[str, Any]]:
    return {o["metadata"]["name"]: o for o in cluster.objects("apps/v1", "StatefulSet")}


def test_gang_objects_min_member_owner_and_unplaced_reason(cluster_factory: Any) -> None:
    async def scenario() -> None:
        async with cluster_factory() as cluster:
            body = tiny(decode={"scheduling": {"gang": "coscheduling",
                                               "scheduleTimeoutSeconds": 1}},
                        prefill={"scheduling": {"gang": "volcano", "queue": "llm"}})
            created = await cluster.create(body)
            uid = created["metadata"]["uid"]
            await cluster.wait_for("PodGroups", lambda: cluster.get(COSCHED, "PodGroup",
                                   "tiny-decode-0") and cluster.get(VOLCANO, "PodGroup",
                                                                    "tiny-prefill-0"))
            decode_pg = cluster.get(COSCHED, "PodGroup", "tiny-decode-0")
            assert decode_pg["spec"] == {"minMember": 2, "scheduleTimeoutSeconds": 1}
            prefill_pg = cluster.get(VOLCANO, "PodGroup", "tiny-prefill-0")
            assert prefill_pg["spec"] == {"minMember": 1, "queue": "llm"}
            for pg in (decode_pg, prefill_pg):
                assert [(r["kind"], r["uid"], r["controller"]) for r in
                        pg["metadata"]["ownerReferences"]] == [("MoEDeployment", uid, True)]
            await cluster.wait_for("group", lambda: "tiny-decode-0" in groups(cluster))
            template = groups(cluster)["tiny-decode-0"]["spec"]["template"]
            assert template["spec"]["schedulerName"] == "scheduler-plugins-scheduler"
            assert template["metadata"]["labels"]["scheduling.x-k8s.io/pod-group"] == \
                "tiny-decode-0"

            # The scheduler cannot place the gang: its reason lands in GroupsScheduled.
            await cluster.create({"apiVersion": "v1", "kind": "Pod", "metadata": {
                "name": "tiny-decode-0-0", "namespace": "default",
                "labels": {"moeserve.io/deployment": "tiny"}},
                "spec": {"containers": [{"name": "w", "image": "x"}]}})
            await cluster.patch("v1", "Pod", "default", "tiny-decode-0-0", {"status": {
                "conditions": [{"type": "PodScheduled", "status": "False",
                                "reason": "Unschedulable",
                                "message": "0/4 nodes are available: 4 Insufficient cpu."}]}},
                subresource="status")
            dep = await cluster.wait_for("GroupsScheduled=False", lambda: (lambda d: d if
                condition(d, "GroupsScheduled").get("status") == "False" else None)(
                cluster.get(API, "MoEDeployment", "tiny")), timeout=30)
            message = condition(dep, "GroupsScheduled")["message"]
            assert condition(dep, "GroupsScheduled")["reason"] == "Unschedulable"
            assert "tiny-decode-0" in message and "Insufficient cpu" in message
            assert condition(dep, "Ready")["status"] == "False"

            # Scaling adds and prunes a gang per group.
            await cluster.patch(API, "MoEDeployment", "default", "tiny",
                                {"spec": {"decode": {"replicas": 2}}})
            await cluster.wait_for("second PodGroup", lambda: cluster.get(
                COSCHED, "PodGroup", "tiny-decode-1"))
            await cluster.patch(API, "MoEDeployment", "default", "tiny",
                                {"spec": {"decode": {"replicas": 1}}})
            await cluster.wait_for("PodGroup pruned", lambda: cluster.get(
                COSCHED, "PodGroup", "tiny-decode-1") is None)

    asyncio.run(scenario())


async def mark_ready(cluster: Any, name: str, pods: int) -> None:
    await cluster.patch("apps/v1", "StatefulSet", "default", name,
                        {"status": {"replicas": pods, "readyReplicas": pods}},
                        subresource="status")


def pods_of(name: str) -> int:
    return 1 if "-prefill-" in name else 2  # tiny: prefill ep 1, decode ep 2 (CPU: 1 rank/pod)


def ready_revisions(cluster: Any, role: str) -> set[str]:
    out = set()
    for name, sts in groups(cluster).items():
        ready = (sts.get("status") or {}).get("readyReplicas", 0) >= pods_of(name)
        if f"-{role}-" in name and ready:
            out.add(sts["metadata"]["labels"][COMPAT_LABEL])
    return out


async def ready_everything(cluster: Any) -> None:
    for name in groups(cluster):
        await mark_ready(cluster, name, pods_of(name))
    await cluster.patch("apps/v1", "Deployment", "default", "tiny-router",
                        {"status": {"replicas": 1, "readyReplicas": 1}}, subresource="status")


def test_image_change_rolls_group_by_group_with_a_pair_always_ready(
        cluster_factory: Any) -> None:
    async def scenario() -> None:
        async with cluster_factory() as cluster:
            await cluster.create(tiny(decode={"replicas": 2}))
            await cluster.wait_for("groups", lambda: len(groups(cluster)) == 3)
            await ready_everything(cluster)
            old = {role: ready_revisions(cluster, role) for role in ("prefill", "decode")}
            await cluster.wait_for("Ready", lambda: cluster.get(API, "MoEDeployment", "tiny")
                                   .get("status", {}).get("phase") == "Ready")
            await cluster.patch(API, "MoEDeployment", "default", "tiny",
                                {"spec": {"image": "ghcr.io/moeserve/moeserve-worker:0.2.0"}})
            history: list[tuple[str, ...]] = []
            for _ in range(40):
                # Wait for the operator to act, then check the pair before marking anything.
                await asyncio.sleep(0.6)
                snapshot = tuple(sorted(
                    f"{n}@{s['metadata']['labels'][COMPAT_LABEL]}"
                    f"{'+' if (s.get('status') or {}).get('readyReplicas', 0) >= pods_of(n) else '-'}"  # noqa: E501
                    for n, s in groups(cluster).items()))
                history.append(snapshot)
                assert ready_revisions(cluster, "prefill") & ready_revisions(cluster, "decode"), \
                    f"no ready compatible pair at {snapshot}\nhistory: {history}"
                pending = sorted(n for n, s in groups(cluster).items()
                                 if (s.get("status") or {}).get("readyReplicas", 0) < pods_of(n))
                dep = cluster.get(API, "MoEDeployment", "tiny")
                if not pending and dep["status"]["phase"] == "Ready" and len(snapshot) == 3 \
                        and dep["status"]["pools"]["decode"]["updatedGroups"] == 2:
                    break
                if pending:
                    await mark_ready(cluster, pending[0], pods_of(pending[0]))
            else:
                raise AssertionError(f"roll did not finish: {history}")
            final = groups(cluster)
            assert set(final) == {"tiny-prefill-0", "tiny-decode-0", "tiny-decode-1"}
            new = {s["metadata"]["labels"][COMPAT_LABEL] for s in final.values()}
            assert len(new) == 1 and new != old["decode"]
            for sts in final.values():
                image = sts["spec"]["template"]["spec"]["containers"][0]["image"]
                assert image.endswith(":0.2.0")
            # Decode first: new groups appear in decode before any in prefill.
            def is_new(entry: str) -> bool:
                role = "prefill" if "-prefill-" in entry else "decode"
                return entry.split("@")[1][:-1] not in old[role]

            first_new = next(snap for snap in history if any(map(is_new, snap)))
            assert all("-decode-" in e for e in first_new if is_new(e)), first_new
            assert len(history) >= 4  # group by group, not all at once
            status = cluster.get(API, "MoEDeployment", "tiny")["status"]["pools"]["decode"]
            assert status["updatedGroups"] == 2 and status["currentGroups"] == 0
            assert status["revision"] == final["tiny-decode-0"]["metadata"]["labels"][
                REVISION_LABEL]

    asyncio.run(scenario())


def test_stalled_roll_degrades_then_spec_edited_back_rolls_back(cluster_factory: Any) -> None:
    async def scenario() -> None:
        async with cluster_factory() as cluster:
            body = tiny(decode={"rollout": {"progressDeadlineSeconds": 2}},
                        prefill={"rollout": {"progressDeadlineSeconds": 2}})
            await cluster.create(body)
            await cluster.wait_for("groups", lambda: len(groups(cluster)) == 2)
            await ready_everything(cluster)
            before = {n: s["metadata"]["labels"][REVISION_LABEL]
                      for n, s in groups(cluster).items()}
            await cluster.patch(API, "MoEDeployment", "default", "tiny",
                                {"spec": {"image": "ghcr.io/moeserve/broken:1"}})
            # The new decode group never becomes ready: the roll stalls.
            dep = await cluster.wait_for("Degraded", lambda: (lambda d: d if condition(
                d, "Degraded").get("status") == "True" else None)(
                cluster.get(API, "MoEDeployment", "tiny")), timeout=30)
            degraded = condition(dep, "Degraded")
            assert degraded["reason"] == "ProgressDeadlineExceeded"
            assert "decode" in degraded["message"] and "no progress" in degraded["message"]
            assert dep["status"]["phase"] == "Degraded"
            events = await cluster.wait_for("Warning event", lambda: [
                e for e in cluster.objects("v1", "Event")
                if e.get("reason") == "ProgressDeadlineExceeded"])
            assert events[0]["type"] == "Warning"
            # The old pair still serves.
            assert ready_revisions(cluster, "prefill") & ready_revisions(cluster, "decode")
            assert {n: before[n] for n in before} == {
                n: groups(cluster)[n]["metadata"]["labels"][REVISION_LABEL] for n in before}

            # Editing the spec back rolls back: the surge group goes, Degraded clears.
            await cluster.patch(API, "MoEDeployment", "default", "tiny",
                                {"spec": {"image": body["spec"].get("image")}})
            await cluster.wait_for("rolled back", lambda: {
                n: s["metadata"]["labels"][REVISION_LABEL]
                for n, s in groups(cluster).items()} == before, timeout=30)
            await cluster.wait_for("Degraded cleared", lambda: condition(cluster.get(
                API, "MoEDeployment", "tiny"), "Degraded").get("status") == "False")

    asyncio.run(scenario())


def test_lws_workload_one_set_per_pool_ready_from_its_status(cluster_factory: Any) -> None:
    lws_api = "leaderworkerset.x-k8s.io/v1"

    async def scenario() -> None:
        async with cluster_factory() as cluster:
            await cluster.create(tiny(decode={"workload": "lws", "replicas": 2}))
            lws = await cluster.wait_for("LeaderWorkerSet", lambda: cluster.get(
                lws_api, "LeaderWorkerSet", "tiny-decode"))
            assert lws["spec"]["replicas"] == 2
            assert lws["spec"]["leaderWorkerTemplate"]["size"] == 2
            assert lws["metadata"]["ownerReferences"][0]["kind"] == "MoEDeployment"
            await cluster.wait_for("prefill group", lambda: "tiny-prefill-0" in groups(cluster))
            assert not [n for n in groups(cluster) if "-decode-" in n]
            # the operator applies children one after another: wait for it, don't race it
            await cluster.wait_for("decode Service", lambda: cluster.get(
                "v1", "Service", "tiny-decode-workers"))
            await mark_ready(cluster, "tiny-prefill-0", 1)
            await cluster.patch(lws_api, "LeaderWorkerSet", "default", "tiny-decode",
                                {"status": {"replicas": 2, "readyReplicas": 2}},
                                subresource="status")
            await cluster.patch("apps/v1", "Deployment", "default", "tiny-router",
                                {"status": {"replicas": 1, "readyReplicas": 1}},
                                subresource="status")
            dep = await cluster.wait_for("Ready", lambda: (lambda d: d if d.get(
                "status", {}).get("phase") == "Ready" else None)(
                cluster.get(API, "MoEDeployment", "tiny")), timeout=40)
            assert dep["status"]["pools"]["decode"]["readyGroups"] == 2

            # Back to StatefulSets: the LeaderWorkerSet is pruned, groups appear.
            await cluster.patch(API, "MoEDeployment", "default", "tiny",
                                {"spec": {"decode": {"workload": "statefulset"}}})
            await cluster.wait_for("LWS pruned", lambda: cluster.get(
                lws_api, "LeaderWorkerSet", "tiny-decode") is None)
            await cluster.wait_for("decode groups", lambda: {
                "tiny-decode-0", "tiny-decode-1"} <= set(groups(cluster)))

    asyncio.run(scenario())
