"""Kubernetes worker discovery against a fake API serving real EndpointSlice objects (the
kubernetes client's models): list, watch from the list's resourceVersion, endpoints appearing,
turning unready, terminating and disappearing, bookmarks, a dropped connection and an expired
(410) watch, each followed by a re-list; the router's pool following along; and the real
kubernetes client over HTTP against kmock's KubernetesEmulator."""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from typing import Any

import pytest
import urllib3
from kubernetes.client import (
    V1Endpoint,
    V1EndpointConditions,
    V1EndpointSlice,
    V1EndpointSliceList,
    V1ListMeta,
    V1ObjectMeta,
    V1ObjectReference,
)

from moeserve.common import spec as s
from moeserve.router.config import DiscoveryConfig
from moeserve.router.discovery_k8s import EndpointSliceWatcher, K8sWorkerPool, workers_from_slices
from moeserve.router.metrics import RouterMetrics
from moeserve.router.prefix_index import PrefixIndex

pytestmark = pytest.mark.timeout(30)

CFG = DiscoveryConfig(
    namespace="llm", selector={s.LABEL_DEPLOYMENT: "tiny", s.LABEL_COMPONENT: "worker"},
    ranks_per_pod={"decode": 2},
)  # fmt: skip
SELECTOR = "moeserve.io/component=worker,moeserve.io/deployment=tiny"


def slice_(name: str, role: str, endpoints: list[tuple[str, bool | None, bool]], rv: int
           ) -> V1EndpointSlice:  # fmt: skip
    """endpoints: (ip, serving, terminating). Ready is always true: the worker Services publish
    not-ready addresses, so only ``serving`` tells a ready pod (as on a real cluster)."""
    labels = {s.LABEL_DEPLOYMENT: "tiny", s.LABEL_COMPONENT: "worker", s.LABEL_ROLE: role,
              s.LABEL_GROUP: "0", "kubernetes.io/service-name": name}  # fmt: skip
    return V1EndpointSlice(
        api_version="discovery.k8s.io/v1", kind="EndpointSlice", address_type="IPv4",
        metadata=V1ObjectMeta(name=name, namespace="llm", labels=labels,
                              resource_version=str(rv)),
        endpoints=[V1Endpoint(addresses=[ip], conditions=V1EndpointConditions(
            ready=True, serving=serving, terminating=term),
            target_ref=V1ObjectReference(kind="Pod", name=f"{name}-{i}", namespace="llm"))
            for i, (ip, serving, term) in enumerate(endpoints)],
    )  # fmt: skip


class FakeApi:
    """DiscoveryV1Api's two calls the watcher makes; a watch stream is fed from a queue."""

    def __init__(self) -> None:
        self.slices: dict[str, V1EndpointSlice] = {}
        self.rv = 10
        self.lists = 0
        self.watch_rvs: list[str] = []
        self.events: queue.Queue[Any] = queue.Queue()

    def list_namespaced_endpoint_slice(self, namespace: str, label_selector: str = "",
                                       **kw: Any) -> V1EndpointSliceList:  # fmt: skip
        assert (namespace, label_selector) == ("llm", SELECTOR)
        self.lists += 1
        return V1EndpointSliceList(metadata=V1ListMeta(resource_version=str(self.rv)),
                                   items=list(self.slices.values()))  # fmt: skip

    def event(self, kind: str, obj: V1EndpointSlice) -> None:
        name = obj.metadata.name
        if kind == "DELETED":
            self.slices.pop(name, None)
        else:
            self.slices[name] = obj
        self.rv = int(obj.metadata.resource_version)
        self.events.put({"type": kind, "object": obj})


class FakeWatch:
    def __init__(self, api: FakeApi):
        self.api = api
        self.stopped = threading.Event()

    def stop(self) -> None:
        self.stopped.set()

    def stream(self, func: Any, namespace: str, **kw: Any):
        assert func == self.api.list_namespaced_endpoint_slice and kw["allow_watch_bookmarks"]
        self.api.watch_rvs.append(kw["resource_version"])
        while not self.stopped.is_set():
            try:
                item = self.api.events.get(timeout=0.05)
            except queue.Empty:
                continue
            if item == "drop":  # the connection breaks mid-watch
                raise urllib3.exceptions.ProtocolError("Connection broken: reset by peer")
            if item == "timeout":  # the server ends the watch (timeoutSeconds)
                return
            yield item


def _wait(pred: Any, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not pred():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


def test_workers_from_slices_ranks_conditions_ipv6() -> None:
    slices = [
        slice_("tiny-decode-0", "decode", [("10.0.0.1", True, False), ("10.0.0.2", False, False),
                                           ("10.0.0.3", True, True)], 1),
        slice_("tiny-prefill-0", "prefill", [("fd00::7", None, False)], 1),
    ]  # fmt: skip
    got = workers_from_slices([_json(x) for x in slices], CFG)
    assert got == {"10.0.0.1:8100": "decode", "10.0.0.1:8101": "decode",
                   "[fd00::7]:8100": "prefill"}  # fmt: skip


def _json(obj: V1EndpointSlice) -> dict[str, Any]:
    from kubernetes.client import ApiClient

    return ApiClient().sanitize_for_serialization(obj)


def test_watch_follows_endpoints_and_recovers_from_broken_watches() -> None:
    api = FakeApi()
    api.slices["tiny-decode-0"] = slice_(
        "tiny-decode-0", "decode", [("127.0.0.11", True, False)], 10
    )
    api.slices["tiny-prefill-0"] = slice_("tiny-prefill-0", "prefill",
                                          [("127.0.0.12", False, False)], 10)  # fmt: skip
    seen: list[dict[str, str]] = []
    w = EndpointSliceWatcher(CFG, seen.append, api=api, watch_factory=lambda: FakeWatch(api),
                             backoff_base_s=0.01, backoff_max_s=0.05)  # fmt: skip
    w.start()
    try:
        _wait(lambda: seen and api.watch_rvs == ["10"])  # watch starts at the list's version
        assert seen[-1] == {"127.0.0.11:8100": "decode", "127.0.0.11:8101": "decode"}
        # A prefill pod turns ready; a second decode group appears.
        api.event(
            "MODIFIED", slice_("tiny-prefill-0", "prefill", [("127.0.0.12", True, False)], 11)
        )
        api.event("ADDED", slice_("tiny-decode-1", "decode", [("127.0.0.13", True, False)], 12))
        _wait(lambda: set(seen[-1]) == {"127.0.0.11:8100", "127.0.0.11:8101", "127.0.0.12:8100",
                                        "127.0.0.13:8100", "127.0.0.13:8101"})  # fmt: skip
        assert seen[-1]["127.0.0.12:8100"] == "prefill"
        # Not ready (readiness probe NOT_SERVING), then terminating: gone from the pool.
        api.event("MODIFIED", slice_("tiny-decode-0", "decode", [("127.0.0.11", False, False)], 13))
        _wait(lambda: "127.0.0.11:8100" not in seen[-1])
        api.event("MODIFIED", slice_("tiny-decode-1", "decode", [("127.0.0.13", True, True)], 14))
        _wait(lambda: "127.0.0.13:8100" not in seen[-1])
        # The connection drops; meanwhile a slice is deleted: the re-list sees it.
        lists = api.lists
        api.slices.pop("tiny-decode-1")
        api.events.put("drop")
        _wait(lambda: api.lists == lists + 1 and len(api.watch_rvs) == 2)
        assert w.errors == 1 and api.watch_rvs[-1] == "14"
        # A bookmark moves the version on; a server-side timeout re-watches from it, no list.
        # (the client leaves bookmarks as dicts: they are not complete objects)
        bookmark = {"kind": "EndpointSlice", "metadata": {"resourceVersion": "20"}}
        api.events.put({"type": "BOOKMARK", "object": bookmark})
        api.events.put("timeout")
        _wait(lambda: len(api.watch_rvs) == 3)
        assert api.watch_rvs[-1] == "20" and api.lists == lists + 1
        # The slice disappears; then an expired version (410) forces a re-list.
        api.event("DELETED", slice_("tiny-prefill-0", "prefill", [], 21))
        _wait(lambda: seen[-1] == {})
        api.events.put(
            {
                "type": "ERROR",
                "object": {"kind": "Status", "code": 410, "message": "too old resource version"},
            }
        )
        _wait(lambda: api.lists == lists + 2)
        api.event("ADDED", slice_("tiny-decode-2", "decode", [("127.0.0.14", True, False)], 22))
        _wait(lambda: seen[-1] == {"127.0.0.14:8100": "decode", "127.0.0.14:8101": "decode"})
        assert w.errors == 2 and w._thread is not None and w._thread.is_alive()
    finally:
        w.stop()


def test_a_failing_api_never_kills_discovery() -> None:
    class Broken(FakeApi):
        def list_namespaced_endpoint_slice(self, *a: Any, **kw: Any) -> V1EndpointSliceList:
            self.lists += 1
            if self.lists < 4:
                raise RuntimeError("apiserver unavailable")
            return super().list_namespaced_endpoint_slice(*a, **kw)

    api = Broken()
    api.slices["tiny-decode-0"] = slice_(
        "tiny-decode-0", "decode", [("127.0.0.21", True, False)], 10
    )
    seen: list[dict[str, str]] = []
    w = EndpointSliceWatcher(CFG, seen.append, api=api, watch_factory=lambda: FakeWatch(api),
                             backoff_base_s=0.01, backoff_max_s=0.02)  # fmt: skip
    w.start()
    try:
        _wait(lambda: bool(seen))
        assert w.errors == 3 and "127.0.0.21:8100" in seen[-1]
    finally:
        w.stop()


def test_router_pool_follows_discovery() -> None:
    api = FakeApi()
    api.slices["tiny-decode-0"] = slice_(
        "tiny-decode-0", "decode", [("127.0.0.31", True, False)], 10
    )

    async def go() -> None:
        pool = K8sWorkerPool(CFG, PrefixIndex(), RouterMetrics(), probe_interval_s=0.05,
                             watcher_kwargs={"api": api, "watch_factory": lambda: FakeWatch(api),
                                             "backoff_base_s": 0.01})  # fmt: skip
        pool.start()
        try:

            async def until(pred: Any) -> None:
                for _ in range(500):
                    if pred():
                        return
                    await asyncio.sleep(0.01)
                raise AssertionError(f"pool is {sorted(pool.clients)}")

            await until(lambda: set(pool.clients) == {"127.0.0.31:8100", "127.0.0.31:8101"})
            assert all(c.roles == {"decode"} for c in pool.clients.values())
            assert pool.healthy("decode") == []  # nothing listens there: known, not routable
            api.event(
                "ADDED", slice_("tiny-prefill-0", "prefill", [("127.0.0.32", True, False)], 11)
            )
            api.event(
                "MODIFIED", slice_("tiny-decode-0", "decode", [("127.0.0.31", True, True)], 12)
            )
            await until(lambda: set(pool.clients) == {"127.0.0.32:8100"})
            assert pool.clients["127.0.0.32:8100"].roles == {"prefill"}
            assert pool.clients["127.0.0.32:8100"].probe_task is not None
        finally:
            await pool.close()
        assert not pool.watcher._thread.is_alive()

    asyncio.run(go())


def test_real_client_against_kmock_emulator() -> None:
    """The kubernetes client itself (HTTP list + watch, deserialization) against kmock's
    KubernetesEmulator on loopback: slices created, patched unready, deleted; other labels
    ignored."""
    import kmock
    from kubernetes import client

    def body(name: str, role: str, ip: str, serving: bool, deployment: str = "tiny") -> dict:
        labels = {s.LABEL_DEPLOYMENT: deployment, s.LABEL_COMPONENT: "worker", s.LABEL_ROLE: role}
        return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                "addressType": "IPv4",
                "metadata": {"name": name, "namespace": "llm", "labels": labels},
                "endpoints": [{"addresses": [ip],
                               "conditions": {"ready": True, "serving": serving}}]}  # fmt: skip

    async def go() -> None:
        emulator = kmock.KubernetesEmulator()
        resource = kmock.resource(group="discovery.k8s.io", version="v1", plural="endpointslices")
        emulator.resources[resource] = kmock.ResourceInfo(
            kind="EndpointSlice", singular="endpointslice", namespaced=True,
            verbs={"get", "list", "watch", "create", "patch", "delete"})  # fmt: skip
        async with emulator, kmock.Server(emulator) as server:
            conf = client.Configuration(host=str(server.url).rstrip("/"))
            api = client.DiscoveryV1Api(client.ApiClient(conf))

            async def call(fn: Any, *a: Any) -> None:
                await asyncio.to_thread(fn, *a)

            await call(api.create_namespaced_endpoint_slice, "llm",
                       body("d0", "decode", "127.0.0.41", True))  # fmt: skip
            await call(api.create_namespaced_endpoint_slice, "llm",
                       body("x0", "decode", "127.0.0.49", True, deployment="other"))  # fmt: skip
            seen: list[dict[str, str]] = []
            w = EndpointSliceWatcher(CFG, seen.append, api=api, backoff_base_s=0.05,
                                     watch_timeout_s=5)  # fmt: skip

            async def until(want: dict[str, str]) -> None:
                for _ in range(200):
                    if seen and seen[-1] == want:
                        return
                    await asyncio.sleep(0.025)
                raise AssertionError(f"saw {seen}")

            w.start()
            try:
                d0 = {"127.0.0.41:8100": "decode", "127.0.0.41:8101": "decode"}
                await until(d0)
                await call(api.create_namespaced_endpoint_slice, "llm",
                           body("p0", "prefill", "127.0.0.42", True))  # fmt: skip
                await until({**d0, "127.0.0.42:8100": "prefill"})
                unready = {"endpoints": [{"addresses": ["127.0.0.41"],
                                          "conditions": {"ready": True, "serving": False}}]}
                await call(api.patch_namespaced_endpoint_slice, "d0", "llm", unready)
                await until({"127.0.0.42:8100": "prefill"})
                await call(api.delete_namespaced_endpoint_slice, "p0", "llm")
                await until({})
                assert w.errors == 0
            finally:
                await asyncio.to_thread(w.stop)

    asyncio.run(go())
