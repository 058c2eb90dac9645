"""Worker pool manifests: MoEWorkerPool, one StatefulSet + headless Service per EP group,
a NetworkPolicy and (when autoscaled) an HPA per pool.

Rank convention (read by the engine): every pod of a group gets ``MOESERVE_RANK`` from the
label ``apps.kubernetes.io/pod-index`` through the downward API (the StatefulSet ordinal; the
label exists on Kubernetes >= 1.28), so the worker never parses its hostname.
"""

from __future__ import annotations

from typing import Any

from moeserve.common import spec as s
from moeserve.common.launch_plan import WORKER_DRAIN_GRACE_S, Placement, pool_launch
from moeserve.common.launch_plan import worker_launch as plan_worker
from moeserve.common.spec import MoEDeployment, PoolSpec, Role, pods_per_group, ranks_per_pod
from moeserve.common.spec_model import MODELS_DIR
from moeserve.operator.build_security import (
    monitoring_selector,
    plane_secret_env,
    tls_args,
    tls_mounts,
    tls_probe,
    tls_volumes,
)
from moeserve.operator.meta import (
    child_labels,
    group_name,
    object_meta,
    place_pod,
    pod_security_context,
    pool_name,
    pool_selector,
    security_context,
)

__all__ = ["build_worker_pool", "build_group_statefulset", "build_group_service",
           "build_network_policy", "build_hpa", "build_worker_service_account",
           "worker_launch", "prestop_hook", "model_volume", "preset_init_containers",
           "PRESTOP_SLEEP_S", "WORKER_DRAIN_GRACE_S"]


def build_worker_service_account(dep: MoEDeployment) -> dict[str, Any]:
    # Workers never call the API: no token is mounted.
    return {
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": object_meta(dep, f"{dep.name}-worker", child_labels(dep, "worker")),
        "automountServiceAccountToken": False,
    }


def build_worker_pool(dep: MoEDeployment, role: Role, groups: int) -> dict[str, Any]:
    pool = dep.spec.pool(role)
    return {
        "apiVersion": f"{s.API_GROUP}/{s.API_VERSION}",
        "kind": s.KIND_WORKER_POOL,
        "metadata": object_meta(dep, pool_name(dep, role),
                                child_labels(dep, "worker", **{s.LABEL_ROLE: role})),
        "spec": {
            "deployment": dep.name,
            "role": role,
            "replicas": groups,
            "podsPerGroup": pods_per_group(pool),
            "ranksPerGroup": pool.parallelism.ep,
        },
    }


def build_group_service(dep: MoEDeployment, role: Role, group: int) -> dict[str, Any]:
    labels = child_labels(dep, "worker", **{s.LABEL_ROLE: role, s.LABEL_GROUP: str(group)})
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": object_meta(dep, group_name(dep, role, group), labels),
        "spec": {
            "clusterIP": "None",
            # Ranks rendezvous before any of them is ready, so DNS must resolve unready pods.
            "publishNotReadyAddresses": True,
            "selector": {**pool_selector(dep, role), s.LABEL_GROUP: str(group)},
            "ports": [_port(name, port) for name, port in _worker_ports()],
        },
    }


def _worker_ports() -> list[tuple[str, int]]:
    return [("grpc", s.PORT_WORKER_GRPC), ("metrics", s.PORT_WORKER_METRICS),
            ("nixl", s.PORT_WORKER_NIXL), ("rendezvous", s.PORT_WORKER_RENDEZVOUS)]


def _port(name: str, port: int) -> dict[str, Any]:
    return {"name": name, "port": port, "targetPort": port, "protocol": "TCP"}


# Graceful drain (SIGTERM): preStop waits for the endpoint removal to reach the routers, the
# worker then finishes what it holds within its drain grace, and the kubelet's
# terminationGracePeriodSeconds covers both plus a margin before SIGKILL.
PRESTOP_SLEEP_S = 5
# Triton's kernel cache: in the pod's /cache emptyDir, or spec.compileCache mounted here.
TRITON_CACHE_DIR = "/cache/triton"
WORKER_TERMINATION_GRACE_S = PRESTOP_SLEEP_S + WORKER_DRAIN_GRACE_S + 5


def prestop_hook() -> dict[str, Any]:
    return {"preStop": {"exec": {"command": ["sleep", str(PRESTOP_SLEEP_S)]}}}


def worker_launch(dep: MoEDeployment, role: Role,
                  group: int) -> tuple[list[str], list[dict[str, Any]]]:
    """The worker container's command and environment for one group of ``role``: the launch
    plan (moeserve.common.launch_plan) placed in a pod of a StatefulSet."""
    pool = dep.spec.pool(role)
    name = group_name(dep, role, group)
    rendezvous = (f"{name}-0.{name}.{dep.namespace}.svc.{dep.spec.cluster_domain}:"
                  f"{s.PORT_WORKER_RENDEZVOUS}")
    where = Placement(
        ranks_per_process=ranks_per_pod(pool), group=group, rendezvous=rendezvous,
        address_args=("--port", str(s.PORT_WORKER_GRPC)),
        address_env=((s.ENV_METRICS_PORT, str(s.PORT_WORKER_METRICS)),
                     (s.ENV_NIXL_PORT, str(s.PORT_WORKER_NIXL))),
        target_args=tuple(tls_args(dep)),
        # Caches (Triton, torch inductor, HF) go to the writable emptyDir, not the read-only root.
        target_env=(("HOME", "/cache"), ("XDG_CACHE_HOME", "/cache"),
                    ("TRITON_CACHE_DIR", TRITON_CACHE_DIR)),
    )  # fmt: skip
    launch = plan_worker(pool_launch(dep, role, dep.spec.model.container_path()), where)
    env: list[dict[str, Any]] = [
        # The pod's index in its group: the StatefulSet ordinal, from the downward API.
        {"name": s.ENV_RANK, "valueFrom": {"fieldRef": {
            "fieldPath": f"metadata.labels['{s.LABEL_POD_INDEX}']"}}},
        {"name": s.ENV_POD_NAME, "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": s.ENV_NAMESPACE, "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
        {"name": s.ENV_POD_IP, "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
    ]
    env.extend({"name": k, "value": v} for k, v in launch.env.items())
    env.extend(plane_secret_env(dep, launch.secret_env))  # the tokens, from the Secret
    router = dep.spec.router
    if router.api_key_metrics and router.api_key_secret:  # the router's metrics key, on ours
        env.append({"name": s.ENV_METRICS_KEYS, "valueFrom": {"secretKeyRef": {
            "name": router.api_key_secret, "key": "api-keys"}}})
    return ["moeserve", *launch.argv], env


def _resources(pool: PoolSpec) -> dict[str, Any]:
    requests = dict(pool.resources.requests)
    limits = dict(pool.resources.limits)
    if pool.gpus_per_pod:
        requests["nvidia.com/gpu"] = limits["nvidia.com/gpu"] = pool.gpus_per_pod
    out: dict[str, Any] = {}
    if requests:
        out["requests"] = requests
    if limits:
        out["limits"] = limits
    return out


def compile_cache_volumes(dep: MoEDeployment) -> tuple[list[dict[str, Any]],
                                                        list[dict[str, Any]]]:
    """(volumes, mounts) of spec.compileCache: Triton's cache kept beyond the pod (none: it
    lives in the pod's /cache emptyDir and each new pod compiles again)."""
    cache = dep.spec.compile_cache
    if cache.pvc:
        volume: dict[str, Any] = {"persistentVolumeClaim": {"claimName": cache.pvc}}
    elif cache.host_path:
        volume = {"hostPath": {"path": cache.host_path, "type": "DirectoryOrCreate"}}
    else:
        return [], []
    return ([{"name": "compile-cache", **volume}],
            [{"name": "compile-cache", "mountPath": TRITON_CACHE_DIR}])


def model_volume(dep: MoEDeployment) -> dict[str, Any]:
    source = dep.spec.model.source
    if source.pvc:
        return {"name": "models", "persistentVolumeClaim": {
            "claimName": source.pvc.claim_name, "readOnly": True}}
    if source.host_path:
        return {"name": "models", "hostPath": {"path": source.host_path.path,
                                               "type": "Directory"}}
    return {"name": "models", "emptyDir": {}}


def preset_init_containers(dep: MoEDeployment, image: str) -> list[dict[str, Any]]:
    """An init container writing the preset checkpoint, when the model is a preset."""
    preset = dep.spec.model.source.preset
    if not preset:
        return []
    return [{
        "name": "make-checkpoint",
        "image": image,
        "imagePullPolicy": dep.spec.image_pull_policy,
        "command": ["moeserve", "make-checkpoint", "--preset", preset,
                    "--out", dep.spec.model.container_path()],
        "securityContext": security_context(),
        "volumeMounts": [{"name": "models", "mountPath": MODELS_DIR},
                         {"name": "tmp", "mountPath": "/tmp"}],
    }]


def _pod_spec(dep: MoEDeployment, role: Role, group: int) -> dict[str, Any]:
    pool = dep.spec.pool(role)
    image = pool.image or dep.spec.image
    command, env = worker_launch(dep, role, group)
    cache_volumes, cache_mounts = compile_cache_volumes(dep)
    container = {
        "name": "worker",
        "image": image,
        "imagePullPolicy": dep.spec.image_pull_policy,
        "command": command,
        "ports": [{"name": n, "containerPort": p, "protocol": "TCP"} for n, p in _worker_ports()],
        "env": env,
        "resources": _resources(pool),
        "securityContext": security_context(),
        # Loading a DeepSeek checkpoint and capturing CUDA graphs takes minutes.
        "startupProbe": tls_probe(dep, {"grpc": {"port": s.PORT_WORKER_GRPC},
                                        "periodSeconds": 10, "failureThreshold": 180}),
        "readinessProbe": tls_probe(dep, {"grpc": {"port": s.PORT_WORKER_GRPC},
                                          "periodSeconds": 5, "failureThreshold": 3}),
        "livenessProbe": tls_probe(dep, {"grpc": {"port": s.PORT_WORKER_GRPC},
                                         "periodSeconds": 15, "failureThreshold": 4}),
        "lifecycle": prestop_hook(),
        "volumeMounts": [
            {"name": "models", "mountPath": MODELS_DIR, "readOnly": True},
            {"name": "tmp", "mountPath": "/tmp"},
            {"name": "cache", "mountPath": "/cache"},
            {"name": "dshm", "mountPath": "/dev/shm"},
            *cache_mounts,
            *tls_mounts(dep),
        ],
    }
    spec: dict[str, Any] = {
        "serviceAccountName": f"{dep.name}-worker",
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "securityContext": pod_security_context(),
        "terminationGracePeriodSeconds": WORKER_TERMINATION_GRACE_S,
        "initContainers": preset_init_containers(dep, image),
        "containers": [container],
        "volumes": [
            model_volume(dep),
            {"name": "tmp", "emptyDir": {}},
            {"name": "cache", "emptyDir": {}},
            {"name": "dshm",
             "emptyDir": {"medium": "Memory", "sizeLimit": pool.shared_memory_size}},
            *cache_volumes,
            *tls_volumes(dep),
        ],
    }
    place_pod(spec, dep, pool.node_selector, pool.tolerations, pool.affinity)
    return spec


def build_group_statefulset(dep: MoEDeployment, role: Role, group: int) -> dict[str, Any]:
    pool = dep.spec.pool(role)
    name = group_name(dep, role, group)
    selector = {**pool_selector(dep, role), s.LABEL_GROUP: str(group)}
    labels = child_labels(dep, "worker", **{s.LABEL_ROLE: role, s.LABEL_GROUP: str(group)})
    return {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": object_meta(dep, name, labels),
        "spec": {
            "replicas": pods_per_group(pool),
            "serviceName": name,
            # All ranks of a group must start together to rendezvous.
            "podManagementPolicy": "Parallel",
            "selector": {"matchLabels": selector},
            "template": {"metadata": {"labels": labels}, "spec": _pod_spec(dep, role, group)},
        },
    }


def build_network_policy(dep: MoEDeployment, role: Role) -> dict[str, Any]:
    """Ingress of a pool: the deployment's workers on every port (NCCL / gloo / NIXL pick
    ephemeral ports), its router on gRPC only, the monitoring namespaces
    (``spec.security.monitoringNamespaceSelector``) on metrics only. Pod selectors without a
    namespaceSelector match this namespace only."""
    workers = {s.LABEL_DEPLOYMENT: dep.name, s.LABEL_COMPONENT: "worker"}
    router = {s.LABEL_DEPLOYMENT: dep.name, s.LABEL_COMPONENT: "router"}
    ranks = ranks_per_pod(dep.spec.pool(role))

    def per_rank(port: int) -> dict[str, Any]:
        # Local rank i of a pod serves on port + i (moeserve/worker/parallel/launch.py).
        out: dict[str, Any] = {"port": port, "protocol": "TCP"}
        if ranks > 1:
            out["endPort"] = port + ranks - 1
        return out

    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": object_meta(dep, pool_name(dep, role),
                                child_labels(dep, "worker", **{s.LABEL_ROLE: role})),
        "spec": {
            "podSelector": {"matchLabels": pool_selector(dep, role)},
            "policyTypes": ["Ingress"],
            "ingress": [
                {"from": [{"podSelector": {"matchLabels": workers}}]},
                {"from": [{"podSelector": {"matchLabels": router}}],
                 "ports": [per_rank(s.PORT_WORKER_GRPC)]},
                {"from": [{"namespaceSelector": {"matchLabels": monitoring_selector(dep)}}],
                 "ports": [per_rank(s.PORT_WORKER_METRICS)]},
            ],
        },
    }


def _quantity(value: float) -> str:
    """An exact Kubernetes quantity: whole numbers as-is, fractions in milli-units."""
    if float(value).is_integer():
        return str(int(value))
    return f"{round(value * 1000)}m"


def _pods_metric(name: str, target: float) -> dict[str, Any]:
    return {"type": "Pods", "pods": {"metric": {"name": name}, "target": {
        "type": "AverageValue", "averageValue": _quantity(target)}}}


def build_hpa(dep: MoEDeployment, role: Role) -> dict[str, Any]:
    scaling = dep.spec.pool(role).autoscaling
    metrics = []
    if scaling.target_num_requests_waiting is not None:
        metrics.append(_pods_metric(s.HPA_METRIC_NUM_REQUESTS_WAITING,
                                    scaling.target_num_requests_waiting))
    if scaling.target_kv_cache_usage_perc is not None:
        metrics.append(_pods_metric(s.HPA_METRIC_KV_CACHE_USAGE_PERC,
                                    scaling.target_kv_cache_usage_perc))
    if scaling.target_time_to_first_token_seconds is not None:
        metrics.append(_pods_metric(s.HPA_METRIC_TIME_TO_FIRST_TOKEN_P90,
                                    scaling.target_time_to_first_token_seconds))
    return {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": object_meta(dep, pool_name(dep, role),
                                child_labels(dep, "worker", **{s.LABEL_ROLE: role})),
        "spec": {
            "scaleTargetRef": {"apiVersion": f"{s.API_GROUP}/{s.API_VERSION}",
                               "kind": s.KIND_WORKER_POOL, "name": pool_name(dep, role)},
            "minReplicas": scaling.min_replicas,
            "maxReplicas": scaling.max_replicas,
            "metrics": metrics,
            # A group is many GPUs that load weights for minutes: add one at a time, remove slowly.
            "behavior": {
                "scaleUp": {"stabilizationWindowSeconds": 60, "selectPolicy": "Max",
                            "policies": [{"type": "Pods", "value": 1, "periodSeconds": 300}]},
                "scaleDown": {
                    "stabilizationWindowSeconds": scaling.scale_down_stabilization_seconds,
                    "policies": [{"type": "Pods", "value": 1, "periodSeconds": 600}]},
            },
        },
    }
