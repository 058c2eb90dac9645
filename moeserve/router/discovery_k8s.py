"""Worker discovery on Kubernetes: the router's worker pool follows the EndpointSlices of the
deployment's per-group worker Services.

The operator gives every EP group a headless Service labelled with the deployment, component,
role and group; the EndpointSlice controller copies those labels onto the group's slices. The
watcher lists the slices matching ``discovery.selector``, then watches from the list's
resourceVersion (bookmarks keep it fresh); a broken or expired watch is retried with backoff and
re-listed, and no error ever leaves the watcher thread. Each serving endpoint becomes one worker
address per local rank (``port + i``, as `moeserve worker --dp N --ep N` serves rank i), under the
role its slice's ``roleLabel`` names. The pool is updated through ``WorkerPool.set_workers``, the
same seam the Ray discovery uses.

The services publish not-ready addresses (ranks must rendezvous before they are ready), so an
endpoint's ``ready`` is always true there; ``serving`` carries the pod's readiness instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from moeserve.common.errors import UnavailableError
from moeserve.router.config import DiscoveryConfig
from moeserve.router.metrics import RouterMetrics
from moeserve.router.prefix_index import PrefixIndex
from moeserve.router.workers import WorkerPool

__all__ = ["EndpointSliceWatcher", "K8sWorkerPool", "workers_from_slices"]

logger = logging.getLogger(__name__)
ROLES = ("prefill", "decode")


def _as_dict(obj: Any) -> dict[str, Any]:
    """API JSON form (camelCase keys) of a kubernetes client model or a plain dict."""
    if isinstance(obj, dict):
        return obj
    from kubernetes.client import ApiClient

    return ApiClient().sanitize_for_serialization(obj)


def _address(ip: str, port: int) -> str:
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


def _serving(endpoint: Mapping[str, Any]) -> bool:
    cond = endpoint.get("conditions") or {}
    if cond.get("terminating"):
        return False  # draining: it finishes what it holds, the router sends nothing new
    serving = cond.get("serving")
    if serving is None:
        serving = cond.get("ready")
    return serving is not False  # unset means ready (EndpointConditions API docs)


def workers_from_slices(
    slices: Iterable[Mapping[str, Any]], cfg: DiscoveryConfig
) -> dict[str, str]:
    """Worker address -> role for every serving endpoint of ``slices`` (API JSON form)."""
    out: dict[str, str] = {}
    for sl in slices:
        labels = (sl.get("metadata") or {}).get("labels") or {}
        # The API server filters by the selector already; checked again so that no watch
        # (a proxy or emulator that ignores labelSelector) adds another deployment's workers.
        if any(labels.get(k) != v for k, v in cfg.selector.items()):
            continue
        role = labels.get(cfg.role_label)
        if role not in ROLES:
            continue
        for ep in sl.get("endpoints") or []:
            addresses = ep.get("addresses") or []
            if not addresses or not _serving(ep):
                continue
            # Kubernetes: consumers use the first address (the others are the same pod).
            for rank in range(cfg.ranks(role)):
                out[_address(addresses[0], cfg.port + rank)] = role
    return out


class EndpointSliceWatcher:
    """List + watch EndpointSlices in a thread (the kubernetes client blocks); every change in
    the worker set is handed to ``on_change`` (from that thread)."""

    def __init__(self, cfg: DiscoveryConfig, on_change: Callable[[dict[str, str]], None], *,
                 api: Any = None, watch_factory: Callable[[], Any] | None = None,
                 backoff_base_s: float = 0.5, backoff_max_s: float = 30.0,
                 watch_timeout_s: int = 300):  # fmt: skip
        self.cfg = cfg
        self.on_change = on_change
        self._api = api
        self._watch_factory = watch_factory
        self.backoff_base_s = backoff_base_s
        self.backoff_max_s = backoff_max_s
        self.watch_timeout_s = watch_timeout_s
        self.slices: dict[str, dict[str, Any]] = {}
        self.published: dict[str, str] | None = None
        self.errors = 0
        self._stop = threading.Event()
        self._watch: Any = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self.run, name="k8s discovery", daemon=True)
        self._thread.start()

    def stop(self, join_s: float = 2.0) -> None:
        self._stop.set()
        with contextlib.suppress(Exception):
            if self._watch is not None:
                self._watch.stop()
        if self._thread is not None:
            self._thread.join(join_s)  # daemon: a read blocked in the client may outlive this

    def _client(self) -> tuple[Any, Callable[[], Any]]:
        if self._api is None:
            from kubernetes import client, config

            try:
                config.load_incluster_config()
            except config.ConfigException:  # outside a pod: the user's kubeconfig
                config.load_kube_config()
            self._api = client.DiscoveryV1Api()
        if self._watch_factory is None:
            from kubernetes import watch

            self._watch_factory = watch.Watch
        return self._api, self._watch_factory

    def run(self) -> None:
        backoff = self.backoff_base_s
        while not self._stop.is_set():
            try:
                rv = self._list()
                backoff = self.backoff_base_s
                while not self._stop.is_set():
                    rv = self._watch_once(rv)  # returns when the server ends the watch
            except Exception as e:  # never let discovery die: keep the last known workers
                self.errors += 1
                logger.warning(
                    "EndpointSlice discovery in %s failed (%s: %s); retrying in %.1f s",
                    self.cfg.namespace,
                    type(e).__name__,
                    e,
                    backoff,
                )
            self._stop.wait(backoff)
            backoff = min(backoff * 2, self.backoff_max_s)

    def _list(self) -> str:
        api, _ = self._client()
        resp = _as_dict(
            api.list_namespaced_endpoint_slice(
                self.cfg.namespace, label_selector=self.cfg.label_selector()
            )
        )
        self.slices = {(i.get("metadata") or {}).get("name", ""): i
                       for i in resp.get("items") or []}  # fmt: skip
        self._publish()
        return (resp.get("metadata") or {}).get("resourceVersion", "")

    def _watch_once(self, rv: str) -> str:
        api, factory = self._client()
        self._watch = factory()
        stream = self._watch.stream(
            api.list_namespaced_endpoint_slice, self.cfg.namespace,
            label_selector=self.cfg.label_selector(), resource_version=rv,
            allow_watch_bookmarks=True, timeout_seconds=self.watch_timeout_s,
            # A silent dead connection must not hang the watch past the server's timeout.
            _request_timeout=(10, self.watch_timeout_s + 30),
        )  # fmt: skip
        for event in stream:
            if self._stop.is_set():
                break
            kind = event.get("type")
            obj = _as_dict(event.get("object") or event.get("raw_object") or {})
            if kind == "ERROR":  # e.g. 410 Gone: the resourceVersion expired; list again
                raise RuntimeError(f"watch error: {obj.get('message') or obj}")
            meta = obj.get("metadata") or {}
            rv = meta.get("resourceVersion") or rv
            if kind == "BOOKMARK":
                continue
            name = meta.get("name", "")
            if kind == "DELETED":
                self.slices.pop(name, None)
            elif kind in ("ADDED", "MODIFIED"):
                self.slices[name] = obj
            self._publish()
        return rv

    def _publish(self) -> None:
        wanted = workers_from_slices(self.slices.values(), self.cfg)
        if wanted != self.published:
            self.published = wanted
            self.on_change(dict(wanted))


class K8sWorkerPool(WorkerPool):
    """The router's ``WorkerPool`` with the workers found through EndpointSlices."""

    def __init__(self, cfg: DiscoveryConfig, index: PrefixIndex, metrics: RouterMetrics,
                 watcher_kwargs: Mapping[str, Any] | None = None, **pool_kwargs: Any):  # fmt: skip
        super().__init__([], [], index, metrics, **pool_kwargs)
        self.discovery = cfg
        self._watcher_kwargs = dict(watcher_kwargs or {})
        self.watcher: EndpointSliceWatcher | None = None

    def start(self) -> None:
        super().start()
        loop = asyncio.get_running_loop()

        def on_change(wanted: dict[str, str]) -> None:
            loop.call_soon_threadsafe(self.set_workers, wanted)

        self.watcher = EndpointSliceWatcher(self.discovery, on_change, **self._watcher_kwargs)
        self.watcher.start()

    async def close(self) -> None:
        if self.watcher is not None:
            await asyncio.to_thread(self.watcher.stop)
        await super().close()

    async def wait_for_decode(self, timeout_s: float) -> None:
        """Until a decode worker is healthy (on a fresh cluster workers may load for minutes)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while not self.healthy("decode") or self.model_info() is None:
            if loop.time() > deadline:
                raise UnavailableError(f"no decode worker in namespace {self.discovery.namespace}"
                                       f" became healthy in {timeout_s} s")  # fmt: skip
            await asyncio.sleep(0.2)
