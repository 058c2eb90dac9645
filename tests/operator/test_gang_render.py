"""Gang rendering per kind, unplaced-group reasons, and revision / compatibility stamps."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from moeserve.common.spec import SpecError, parse_manifest
from moeserve.operator.build_groups import COMPAT_LABEL, REVISION_LABEL, pool_revision
from moeserve.operator.conditions import gang_problem
from moeserve.operator.render import render

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.timeout(30)


def tiny(**pools: Any) -> dict[str, Any]:
    body = yaml.safe_load((REPO / "examples/tiny-cpu.yaml").read_text())
    for role, patch in pools.items():
        body["spec"][role].update(copy.deepcopy(patch))
    return body


def by_name(objs: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {o["metadata"]["name"]: o for o in objs if o["kind"] == kind}


def test_kueue_labels_and_volcano_annotation() -> None:
    dep = parse_manifest(tiny(decode={"replicas": 2, "scheduling": {"gang": "kueue",
                                                                    "queue": "gpu"}},
                              prefill={"scheduling": {"gang": "volcano"}}))
    objs = render(dep)
    sts = by_name(objs, "StatefulSet")
    meta = sts["tiny-decode-1"]["spec"]["template"]["metadata"]
    assert meta["labels"]["kueue.x-k8s.io/pod-group-name"] == "tiny-decode-1"
    assert meta["labels"]["kueue.x-k8s.io/queue-name"] == "gpu"
    assert meta["annotations"]["kueue.x-k8s.io/pod-group-total-count"] == "2"
    assert "schedulerName" not in sts["tiny-decode-1"]["spec"]["template"]["spec"]
    prefill = sts["tiny-prefill-0"]["spec"]["template"]
    assert prefill["metadata"]["annotations"]["scheduling.k8s.io/group-name"] == \
        "tiny-prefill-0"
    assert prefill["spec"]["schedulerName"] == "volcano"
    assert set(by_name(objs, "PodGroup")) == {"tiny-prefill-0"}  # kueue makes its own
    with pytest.raises(SpecError, match="spec.decode.scheduling.queue"):
        parse_manifest(tiny(decode={"scheduling": {"gang": "kueue"}}))


def test_gang_problem_prefers_pod_group_then_pods() -> None:
    volcano = {"status": {"phase": "Pending", "conditions": [{
        "type": "Unschedulable", "status": "True", "reason": "NotEnoughResources",
        "message": "1/2 tasks in gang unschedulable"}]}}
    assert gang_problem(volcano, []) == \
        "NotEnoughResources: 1/2 tasks in gang unschedulable"
    cosched = {"spec": {"minMember": 4}, "status": {"phase": "Scheduling", "scheduled": 1}}
    assert gang_problem(cosched, []) == "PodGroup Scheduling: 1/4 members scheduled"
    gated = {"metadata": {"name": "p-0"}, "spec": {"schedulingGates": [
        {"name": "kueue.x-k8s.io/admission"}]}}
    assert gang_problem(None, [gated]) == "pod p-0 gated (kueue.x-k8s.io/admission)"
    assert gang_problem({"status": {"phase": "Running"}}, [{"metadata": {"name": "x"}}]) is None


def test_revision_follows_template_not_replicas_and_compat_spans_pools() -> None:
    base = parse_manifest(tiny())
    scaled = parse_manifest(tiny(decode={"replicas": 3}))
    env = parse_manifest(tiny(decode={"env": [{"name": "X", "value": "1"}]}))
    image = parse_manifest({**tiny(), "spec": {**tiny()["spec"], "image": "img:2"}})
    assert pool_revision(base, "decode") == pool_revision(scaled, "decode")
    # An env change rolls decode only and keeps the compatibility key: pairs stay valid.
    assert pool_revision(env, "decode") != pool_revision(base, "decode")
    assert pool_revision(env, "prefill") == pool_revision(base, "prefill")
    labels = {key: by_name(render(d), "StatefulSet")["tiny-prefill-0"]["metadata"]["labels"]
              for key, d in (("base", base), ("env", env), ("image", image))}
    assert labels["base"][COMPAT_LABEL] == labels["env"][COMPAT_LABEL]
    # An image change alters the workers' fingerprint: both pools roll.
    assert labels["image"][COMPAT_LABEL] != labels["base"][COMPAT_LABEL]
    assert pool_revision(image, "prefill") != pool_revision(base, "prefill")
    assert labels["base"][REVISION_LABEL] == pool_revision(base, "prefill")


def test_lws_keeps_the_worker_contract() -> None:
    dep = parse_manifest(tiny(decode={"workload": "lws", "replicas": 3}))
    objs = render(dep)
    assert not [n for n in by_name(objs, "StatefulSet") if "-decode-" in n]
    lws = by_name(objs, "LeaderWorkerSet")["tiny-decode"]["spec"]
    assert (lws["replicas"], lws["leaderWorkerTemplate"]["size"]) == (3, 2)
    assert lws["rolloutStrategy"]["rollingUpdateConfiguration"] == {
        "maxSurge": 1, "maxUnavailable": 0}
    env = lws["leaderWorkerTemplate"]["workerTemplate"]["spec"]["containers"][0]["env"]
    names = [e["name"] for e in env]
    assert names.index("MOESERVE_GROUP") < names.index("MOESERVE_RENDEZVOUS")
    by = {e["name"]: e for e in env}
    assert by["MOESERVE_RANK"]["valueFrom"]["fieldRef"]["fieldPath"] == \
        "metadata.labels['leaderworkerset.sigs.k8s.io/worker-index']"
    assert by["MOESERVE_RENDEZVOUS"]["value"] == \
        "tiny-decode-$(MOESERVE_GROUP).tiny-decode.default.svc.cluster.local:8400"
    with pytest.raises(SpecError, match="spec.decode.scheduling.gang"):
        parse_manifest(tiny(decode={"workload": "lws", "scheduling": {"gang": "volcano"}}))
