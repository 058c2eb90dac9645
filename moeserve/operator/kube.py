"""A small typed wrapper over the Kubernetes API for the kinds the operator manages.

Writes are server-side apply with the one field manager ``moeserve-operator`` (force, so the
operator wins conflicts over fields it renders: that is how drift is corrected). Status goes
through the status subresource with a merge patch. Sync on purpose: kopf runs sync handlers in
its thread pool, and the official client is sync.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import kubernetes
from kubernetes.client.exceptions import ApiException

from moeserve.common.spec import API_GROUP, API_VERSION, KIND_DEPLOYMENT, KIND_WORKER_POOL
from moeserve.operator.meta import FIELD_MANAGER

__all__ = ["Kube", "KubeError", "PLURALS", "load_config"]

# kind -> plural for everything render() produces, plus our own kinds.
PLURALS: dict[str, str] = {
    "ServiceAccount": "serviceaccounts",
    "Role": "roles",
    "RoleBinding": "rolebindings",
    "ConfigMap": "configmaps",
    "Service": "services",
    "Deployment": "deployments",
    "StatefulSet": "statefulsets",
    "NetworkPolicy": "networkpolicies",
    "HorizontalPodAutoscaler": "horizontalpodautoscalers",
    "Pod": "pods",
    "Secret": "secrets",  # created and deleted only, never read (the worker-plane tokens)
    "PodGroup": "podgroups",  # scheduler-plugins and Volcano: same kind and plural
    "LeaderWorkerSet": "leaderworkersets",
    KIND_WORKER_POOL: "moeworkerpools",
    KIND_DEPLOYMENT: "moedeployments",
}


class KubeError(RuntimeError):
    """An API call that failed; ``status`` is the HTTP status (0 when unknown)."""

    def __init__(self, message: str, status: int = 0):
        super().__init__(message)
        self.status = status


def load_config() -> kubernetes.client.Configuration:
    """In-cluster credentials inside a pod, else $KUBECONFIG or ~/.kube/config."""
    config = kubernetes.client.Configuration()
    if os.environ.get("KUBERNETES_SERVICE_HOST"):
        kubernetes.config.load_incluster_config(client_configuration=config)
    else:
        # Read $KUBECONFIG now: the client library reads it once, when it is imported.
        kubernetes.config.load_kube_config(config_file=os.environ.get("KUBECONFIG"),
                                           client_configuration=config)
    return config


def _path(api_version: str, kind: str, namespace: str, name: str | None = None) -> str:
    base = "/api/v1" if api_version == "v1" else f"/apis/{api_version}"
    path = f"{base}/namespaces/{namespace}/{PLURALS[kind]}"
    return f"{path}/{name}" if name else path


def _selector(labels: Mapping[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(labels.items()))


class Kube:
    def __init__(self, api: kubernetes.client.ApiClient):
        self.api = api

    @classmethod
    def from_environment(cls) -> Kube:
        return cls(kubernetes.client.ApiClient(load_config()))

    def _call(self, method: str, path: str, *, body: Any = None,
              query: list[tuple[str, str]] | None = None,
              content_type: str = "application/json") -> Any:
        request = self.api.param_serialize(
            method, path, query_params=query or [], body=body,
            header_params={"Content-Type": content_type, "Accept": "application/json"},
            auth_settings=["BearerToken"],
        )
        try:
            response = self.api.call_api(*request, _request_timeout=30)
            data = response.read()
            status = response.status
        except ApiException as exc:
            data, status = exc.body, exc.status or 0
        if status >= 400 or status == 0:
            raise KubeError(f"{method} {path}: {status}: {data!r}", status)
        return json.loads(data) if data else None

    def apply(self, manifest: Mapping[str, Any]) -> dict[str, Any]:
        meta = manifest["metadata"]
        path = _path(manifest["apiVersion"], manifest["kind"], meta["namespace"], meta["name"])
        return self._call("PATCH", path, body=dict(manifest),
                          query=[("fieldManager", FIELD_MANAGER), ("force", "true")],
                          content_type="application/apply-patch+yaml")

    def create(self, api_version: str, kind: str, namespace: str,
               manifest: Mapping[str, Any]) -> bool:
        """POST; False when an object of that name exists already (it is left as it is)."""
        try:
            self._call("POST", _path(api_version, kind, namespace), body=dict(manifest))
        except KubeError as exc:
            if exc.status == 409:
                return False
            raise
        return True

    def get(self, api_version: str, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            return self._call("GET", _path(api_version, kind, namespace, name))
        except KubeError as exc:
            if exc.status == 404:
                return None
            raise

    def list(self, api_version: str, kind: str, namespace: str,
             labels: Mapping[str, str]) -> list[dict[str, Any]]:
        result = self._call("GET", _path(api_version, kind, namespace),
                            query=[("labelSelector", _selector(labels))])
        items = (result or {}).get("items") or []
        # Filter again client-side: cheap, and correct even where the server ignores selectors.
        return [i for i in items
                if all((i.get("metadata", {}).get("labels") or {}).get(k) == v
                       for k, v in labels.items())]

    def delete(self, api_version: str, kind: str, namespace: str, name: str,
               propagation: str = "Background") -> None:
        try:
            self._call("DELETE", _path(api_version, kind, namespace, name),
                       body={"propagationPolicy": propagation})
        except KubeError as exc:
            if exc.status != 404:
                raise

    def patch(self, api_version: str, kind: str, namespace: str, name: str,
              body: Mapping[str, Any], subresource: str = "") -> None:
        """A merge patch (``subresource`` "scale" writes replicas as an HPA would)."""
        path = _path(api_version, kind, namespace, name) + (f"/{subresource}" if subresource
                                                            else "")
        self._call("PATCH", path, body=dict(body), content_type="application/merge-patch+json")

    def patch_status(self, api_version: str, kind: str, namespace: str, name: str,
                     status: Mapping[str, Any]) -> None:
        path = _path(api_version, kind, namespace, name) + "/status"
        self._call("PATCH", path, body={"status": dict(status)},
                   content_type="application/merge-patch+json")

    def get_deployment(self, namespace: str, name: str) -> dict[str, Any] | None:
        return self.get(f"{API_GROUP}/{API_VERSION}", KIND_DEPLOYMENT, namespace, name)
