"""The worker-plane tokens on Kubernetes: the operator's Secret per deployment and generation
(created without reading any Secret, owned by the deployment), the env refs in the router and
every worker, and a rotation (annotation bump: new Secret, pods roll, the previous generation
stays accepted while they do, older ones are deleted)."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from moeserve.common.spec import SpecError, parse_manifest
from moeserve.common.worker_auth import (
    ENV_ROUTER_TOKEN,
    ENV_ROUTER_TOKEN_SHA256,
    ENV_WORKER_TOKEN,
    PREVIOUS,
    WorkerAuth,
    worker_auth_from_env,
)
from moeserve.operator.apply import ensure_plane_secret
from moeserve.operator.build_security import ROTATION_ANNOTATION
from moeserve.operator.kube import KubeError
from tests.operator.test_operator_render import example, rendered

UID = "0b7b8f4e-1f7a-4c39-9f0e-3c1d2f8a9e10"


def _doc(rotation: str | None = None) -> dict[str, Any]:
    doc = copy.deepcopy(example("tiny-cpu.yaml"))
    if rotation is not None:
        doc["metadata"].setdefault("annotations", {})[ROTATION_ANNOTATION] = rotation
    return doc


def _envs(objs: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, Any]]]:
    """workload name -> env name -> env entry, for the router Deployment and worker pods."""
    out = {}
    for o in objs:
        if o["kind"] in ("Deployment", "StatefulSet"):
            env = o["spec"]["template"]["spec"]["containers"][0]["env"]
            out[o["metadata"]["name"]] = {e["name"]: e for e in env}
    return out


def _ref(entry: dict[str, Any]) -> dict[str, Any]:
    return entry["valueFrom"]["secretKeyRef"]


def test_router_and_workers_take_their_tokens_from_the_deployment_secret() -> None:
    envs = _envs(rendered(_doc()))
    name = parse_manifest(_doc()).name
    secret = f"{name}-worker-plane-0"
    router = envs.pop(f"{name}-router")
    assert _ref(router[ENV_ROUTER_TOKEN]) == {"name": secret, "key": "router-token"}
    assert ENV_WORKER_TOKEN not in router
    assert envs, "no worker pods rendered"
    for env in envs.values():
        assert _ref(env[ENV_WORKER_TOKEN]) == {"name": secret, "key": "worker-token"}
        assert _ref(env[ENV_ROUTER_TOKEN_SHA256]) == {"name": secret,
                                                      "key": "router-token-sha256"}
        assert ENV_ROUTER_TOKEN not in env  # a worker cannot act as the router
        assert not any(k.endswith(PREVIOUS) for k in env)
        assert all("value" not in e for k, e in env.items() if k in (ENV_WORKER_TOKEN,))


def test_a_rotation_rolls_the_pods_and_keeps_the_previous_generation_optional() -> None:
    before, after = rendered(_doc()), rendered(_doc("3"))
    name = parse_manifest(_doc()).name
    for env in _envs(after).values():
        for key, entry in env.items():
            if key.endswith(PREVIOUS):
                assert _ref(entry)["name"] == f"{name}-worker-plane-2" and _ref(entry)["optional"]
            elif "valueFrom" in entry and "secretKeyRef" in entry["valueFrom"]:
                assert _ref(entry)["name"] == f"{name}-worker-plane-3"

    def revisions(objs):
        return {o["metadata"]["name"]: o["spec"]["template"]["metadata"]["labels"].get(
            "moeserve.io/revision") for o in objs if o["kind"] == "StatefulSet"}

    assert all(revisions(before)[k] != v for k, v in revisions(after).items())


def test_a_bad_rotation_annotation_is_named() -> None:
    with pytest.raises(SpecError, match=ROTATION_ANNOTATION):
        rendered(_doc("soon"))


class _Kube:
    """Records calls; holds Secrets by name. No get or list: the operator must not need them."""

    def __init__(self) -> None:
        self.secrets: dict[str, dict[str, Any]] = {}
        self.calls: list[tuple[str, str]] = []

    def create(self, api_version: str, kind: str, namespace: str, manifest: dict) -> bool:
        name = manifest["metadata"]["name"]
        self.calls.append(("create", name))
        if name in self.secrets:
            return False
        self.secrets[name] = manifest
        return True

    def delete(self, api_version: str, kind: str, namespace: str, name: str) -> None:
        self.calls.append(("delete", name))
        self.secrets.pop(name, None)

    def __getattr__(self, attr: str) -> Any:
        raise KubeError(f"the operator called {attr} on Secrets", 403)


def test_secret_created_once_owned_and_rotated_without_reading_secrets() -> None:
    kube = _Kube()
    dep = parse_manifest(_doc()).model_copy(update={"uid": UID})
    ensure_plane_secret(kube, dep)
    first = kube.secrets[f"{dep.name}-worker-plane-0"]
    ensure_plane_secret(kube, dep)  # a resync: the existing tokens stay
    assert kube.secrets[f"{dep.name}-worker-plane-0"] is first
    assert first["metadata"]["ownerReferences"][0]["uid"] == UID  # garbage-collected with it
    data = first["stringData"]
    assert set(data) == {"worker-token", "router-token", "router-token-sha256"}
    env = {ENV_WORKER_TOKEN: data["worker-token"],
           ENV_ROUTER_TOKEN_SHA256: data["router-token-sha256"]}
    worker = worker_auth_from_env("worker", False, env)
    assert worker.role_of([("x-moeserve-worker-token", data["router-token"])]) == "router"

    for gen in (1, 2):
        rotated = parse_manifest(_doc(str(gen))).model_copy(update={"uid": UID})
        ensure_plane_secret(kube, rotated)
    assert sorted(kube.secrets) == [f"{dep.name}-worker-plane-1", f"{dep.name}-worker-plane-2"]
    new = kube.secrets[f"{dep.name}-worker-plane-2"]["stringData"]
    assert new["worker-token"] != data["worker-token"]
    assert isinstance(worker, WorkerAuth)
