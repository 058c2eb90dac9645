"""Router manifests: ServiceAccount + Role/RoleBinding for discovery, ConfigMap, Deployment,
Service.

The router reads /etc/moeserve/router.yaml (rendered by :func:`router_config`)::

    model: {name, path, blockSize}
    listen: {host, http, grpc, metrics}
    disaggThreshold: int
    discovery: {namespace, port, selector: {label: value}, roleLabel, groupLabel,
                ranksPerPod: {prefill: int, decode: int}}

(parsed by ``moeserve/router/config.py``; any router flag may also appear at the top level in
camelCase) and finds workers by watching the EndpointSlices in ``discovery.namespace`` that carry
``discovery.selector`` (the per-group worker Services' labels, which Kubernetes copies onto their
slices); a worker's pool comes from its ``roleLabel``, and a pod with N ranks serves rank i on
``port + i``.
"""

from __future__ import annotations

import hashlib
from typing import Any

import yaml

from moeserve.common import spec as s
from moeserve.common.launch_plan import ROUTER_DRAIN_GRACE_S
from moeserve.common.served_name import served_model_name
from moeserve.common.spec import MoEDeployment, ranks_per_pod
from moeserve.common.spec_model import MODELS_DIR
from moeserve.common.worker_auth import ROUTER_SECRET_ENV
from moeserve.operator.build_security import plane_secret_env, tls_args, tls_mounts, tls_volumes
from moeserve.operator.build_workers import (
    PRESTOP_SLEEP_S,
    model_volume,
    preset_init_containers,
    prestop_hook,
)
from moeserve.operator.meta import (
    child_labels,
    object_meta,
    place_pod,
    pod_security_context,
    router_name,
    security_context,
)

__all__ = ["build_router", "router_config"]

CONFIG_PATH = "/etc/moeserve/router.yaml"

ROUTER_STARTUP_TIMEOUT_S = 3600
_PORTS = (("http", s.PORT_ROUTER_HTTP), ("grpc", s.PORT_ROUTER_GRPC),
          ("metrics", s.PORT_ROUTER_METRICS))



def build_router(dep: MoEDeployment) -> list[dict[str, Any]]:
    return [
        build_service_account(dep), build_role(dep), build_role_binding(dep),
        build_config_map(dep), build_deployment(dep), build_service(dep),
    ]


def _labels(dep: MoEDeployment) -> dict[str, str]:
    return child_labels(dep, "router")


def build_service_account(dep: MoEDeployment) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "ServiceAccount",
            "metadata": object_meta(dep, router_name(dep), _labels(dep))}


def build_role(dep: MoEDeployment) -> dict[str, Any]:
    # Exactly what moeserve.router.discovery_k8s does: list, then watch, EndpointSlices.
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "Role",
        "metadata": object_meta(dep, router_name(dep), _labels(dep)),
        "rules": [{"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"],
                   "verbs": ["list", "watch"]}],
    }


def build_role_binding(dep: MoEDeployment) -> dict[str, Any]:
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": object_meta(dep, router_name(dep), _labels(dep)),
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                    "name": router_name(dep)},
        "subjects": [{"kind": "ServiceAccount", "name": router_name(dep),
                      "namespace": dep.namespace}],
    }


def router_config(dep: MoEDeployment) -> dict[str, Any]:
    model = dep.spec.model
    config: dict[str, Any] = {
        # model.name is the router's --served-model-name (router/config.py).
        "model": {"name": served_model_name(manifest=dep), "path": model.container_path(),
                  "blockSize": model.block_size},
        # All interfaces: the kubelet's probes and the Service reach the pod IP.
        "listen": {"host": "0.0.0.0", "http": s.PORT_ROUTER_HTTP, "grpc": s.PORT_ROUTER_GRPC,
                   "metrics": s.PORT_ROUTER_METRICS},
        "disaggThreshold": dep.spec.router.disagg_threshold,
        # Workers may load for many minutes; the router waits for them instead of crash-looping.
        "startupTimeoutS": ROUTER_STARTUP_TIMEOUT_S,
        "discovery": {
            "namespace": dep.namespace,
            "port": s.PORT_WORKER_GRPC,
            "selector": {s.LABEL_DEPLOYMENT: dep.name, s.LABEL_COMPONENT: "worker"},
            "roleLabel": s.LABEL_ROLE,
            "groupLabel": s.LABEL_GROUP,
            "ranksPerPod": {role: ranks_per_pod(dep.spec.pool(role)) for role in s.ROLES},
        },
    }
    zero = dep.spec.autoscaling.scale_to_zero
    if dep.spec.autoscaling.mode == "sla" and zero.enabled:
        config["wakeHoldS"] = zero.hold_seconds  # hold requests while the pools wake
    return config


def build_config_map(dep: MoEDeployment) -> dict[str, Any]:
    text = yaml.safe_dump(router_config(dep), sort_keys=False)
    return {"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": object_meta(dep, router_name(dep), _labels(dep)),
            "data": {"router.yaml": text}}


def _container(dep: MoEDeployment, image: str) -> dict[str, Any]:
    router = dep.spec.router
    env: list[dict[str, Any]] = [
        {"name": s.ENV_LOG_LEVEL, "value": dep.spec.log_level},
        {"name": "HOME", "value": "/cache"},
        {"name": "XDG_CACHE_HOME", "value": "/cache"},
    ]
    if router.api_key_secret:
        env.append({"name": s.ENV_API_KEYS, "valueFrom": {"secretKeyRef": {
            "name": router.api_key_secret, "key": "api-keys"}}})
    env.extend(plane_secret_env(dep, ROUTER_SECRET_ENV))  # its worker-plane token
    resources: dict[str, Any] = {}
    if router.resources.requests:
        resources["requests"] = dict(router.resources.requests)
    if router.resources.limits:
        resources["limits"] = dict(router.resources.limits)
    return {
        "name": "router",
        "image": image,
        "imagePullPolicy": dep.spec.image_pull_policy,
        # The TLS flags make the router's calls to workers present its certificate.
        "command": ["moeserve", "router", "--config", CONFIG_PATH, *tls_args(dep),
                    *(["--api-key-metrics"] if router.api_key_metrics else []),
                    *router.chat_args()],
        "ports": [{"name": n, "containerPort": p, "protocol": "TCP"} for n, p in _PORTS],
        "env": env,
        "resources": resources,
        "securityContext": security_context(),
        "readinessProbe": {"httpGet": {"path": "/health", "port": "http"},
                           "periodSeconds": 5, "failureThreshold": 3},
        # /health is 503 while no decode worker serves (readiness); the metrics port answers
        # as long as the process does, workers or not, so only a hung router is restarted.
        # With metrics auth the kubelet (no key) reads that port's open /health instead.
        "livenessProbe": {"httpGet": {"path": "/health" if router.api_key_metrics else "/metrics",
                                      "port": "metrics"},
                          "periodSeconds": 15, "failureThreshold": 4},
        "lifecycle": prestop_hook(),
        "volumeMounts": [
            {"name": "config", "mountPath": "/etc/moeserve", "readOnly": True},
            # The router owns the tokenizer, which it reads from the model directory.
            {"name": "models", "mountPath": MODELS_DIR, "readOnly": True},
            {"name": "tmp", "mountPath": "/tmp"},
            {"name": "cache", "mountPath": "/cache"},
            *tls_mounts(dep),
        ],
    }


def build_deployment(dep: MoEDeployment) -> dict[str, Any]:
    router = dep.spec.router
    image = router.image or s.DEFAULT_IMAGE
    selector = {s.LABEL_DEPLOYMENT: dep.name, s.LABEL_COMPONENT: "router"}
    pod: dict[str, Any] = {
        "serviceAccountName": router_name(dep),
        "enableServiceLinks": False,
        "securityContext": pod_security_context(),
        # preStop, then the router's drain (RouterSettings.drain_grace_s), then a margin.
        "terminationGracePeriodSeconds": PRESTOP_SLEEP_S + ROUTER_DRAIN_GRACE_S + 5,
        "initContainers": preset_init_containers(dep, image),
        "containers": [_container(dep, image)],
        "volumes": [
            {"name": "config", "configMap": {"name": router_name(dep)}},
            model_volume(dep),
            {"name": "tmp", "emptyDir": {}},
            {"name": "cache", "emptyDir": {}},
            *tls_volumes(dep),
        ],
    }
    place_pod(pod, dep, router.node_selector, router.tolerations)
    # A config change must roll the pods: the checksum of the rendered config goes on the pod.
    checksum = _digest(yaml.safe_dump(router_config(dep), sort_keys=True))
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": object_meta(dep, router_name(dep), _labels(dep)),
        "spec": {
            "replicas": router.replicas,
            "selector": {"matchLabels": selector},
            "template": {
                "metadata": {"labels": _labels(dep),
                             "annotations": {"moeserve.io/config-checksum": checksum}},
                "spec": pod,
            },
        },
    }


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def build_service(dep: MoEDeployment) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": object_meta(dep, router_name(dep), _labels(dep)),
        "spec": {
            "type": dep.spec.router.service_type,
            "selector": {s.LABEL_DEPLOYMENT: dep.name, s.LABEL_COMPONENT: "router"},
            "ports": [{"name": n, "port": p, "targetPort": n, "protocol": "TCP"}
                      for n, p in _PORTS],
        },
    }
