"""The MoEDeployment spec: one set of typed models for every target of a manifest.

The Kubernetes operator, `moeserve up -f` (local processes) and the Ray path all parse a manifest
with :func:`parse_manifest`, so defaults and rules live here once. The CRD schema in `crds/` is
generated from these models (``python -m moeserve.operator.crds``), CEL rules included, so the API
server and this module reject the same specs. Importing this module needs only pydantic.

Errors are :class:`SpecError` whose message names each offending field by its full path, for
example ``spec.decode.parallelism.ep: ep (12) must be a multiple of gpusPerPod (8)``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from moeserve.common.errors import ConfigError
from moeserve.common.spec_base import FieldRuleError, _cel, _field_path, _message, _Model
from moeserve.common.spec_model import CompileCacheSpec, ModelSource, ModelSpec, Parallelism
from moeserve.common.spec_ops import (
    AutoscalingSpec,
    PreflightSpec,
    RolloutSpec,
    SchedulingSpec,
    SlaAutoscalingSpec,
)
from moeserve.common.spec_security import SecuritySpec

__all__ = [
    "API_GROUP", "API_VERSION", "KIND_DEPLOYMENT", "KIND_WORKER_POOL", "ROLES", "Role",
    "Parallelism", "ModelSource", "ModelSpec", "EplbSpec", "DboSpec", "AutoscalingSpec",
    "EnvVar", "Resources", "PoolSpec", "RouterSpec", "MoEDeploymentSpec", "MoEDeployment",
    "SchedulingSpec", "RolloutSpec", "SlaAutoscalingSpec", "SpecError", "parse_spec",
    "parse_manifest", "pods_per_group", "ranks_per_pod",
]

API_GROUP = "moeserve.io"
API_VERSION = "v1alpha1"
KIND_DEPLOYMENT = "MoEDeployment"
KIND_WORKER_POOL = "MoEWorkerPool"

Role = Literal["prefill", "decode"]
ROLES: tuple[Role, ...] = ("prefill", "decode")

# Ports are fixed per container: every pod has its own network namespace, so they never collide.
# A pod's local rank i serves gRPC on PORT_WORKER_GRPC + i and metrics on PORT_WORKER_METRICS + i
# (moeserve/worker/parallel/launch.py), so each worker port owns a block of 100 (gpusPerPod <= 16).
PORT_WORKER_GRPC = 8100
PORT_WORKER_METRICS = 8200
PORT_WORKER_NIXL = 8300
PORT_WORKER_RENDEZVOUS = 8400  # torch.distributed store on pod 0 of each EP group
PORT_ROUTER_HTTP = 8000
PORT_ROUTER_GRPC = 8001
PORT_ROUTER_METRICS = 8002

# Environment of worker pods, read by the engine. One pod runs MOESERVE_RANKS_PER_POD ranks; the
# global rank of local process i is MOESERVE_RANK * MOESERVE_RANKS_PER_POD + i.
ENV_RANK = "MOESERVE_RANK"  # the pod's index in its group: label apps.kubernetes.io/pod-index
ENV_WORLD_SIZE = "MOESERVE_WORLD_SIZE"  # ranks in the EP group (= ep)
ENV_RANKS_PER_POD = "MOESERVE_RANKS_PER_POD"
ENV_NUM_PODS = "MOESERVE_NUM_PODS"  # pods in the group
ENV_GROUP = "MOESERVE_GROUP"  # index of the EP group within its pool
ENV_RENDEZVOUS = "MOESERVE_RENDEZVOUS"  # host:port of pod 0's rendezvous port
ENV_ROLE = "MOESERVE_ROLE"  # prefill | decode
ENV_MODEL = "MOESERVE_MODEL"  # served model name (spec.model.name), part of block hashes
ENV_DEPLOYMENT = "MOESERVE_DEPLOYMENT"
ENV_NAMESPACE = "MOESERVE_NAMESPACE"
ENV_POD_NAME = "MOESERVE_POD_NAME"
ENV_POD_IP = "MOESERVE_POD_IP"
ENV_TP = "MOESERVE_TP"
ENV_BLOCK_SIZE = "MOESERVE_BLOCK_SIZE"
ENV_METRICS_PORT = "MOESERVE_METRICS_PORT"
ENV_NIXL_PORT = "MOESERVE_NIXL_PORT"
ENV_EPLB_ENABLED = "MOESERVE_EPLB_ENABLED"
ENV_EPLB_REDUNDANT_EXPERTS = "MOESERVE_EPLB_REDUNDANT_EXPERTS"
ENV_DBO_ENABLED = "MOESERVE_DBO_ENABLED"
ENV_LOG_LEVEL = "MOESERVE_LOG_LEVEL"
ENV_API_KEYS = "MOESERVE_API_KEYS"  # router: comma-separated keys from the Secret
# Workers, under spec.router.apiKeyMetrics: the same keys, wanted on their metrics port.
ENV_METRICS_KEYS = "MOESERVE_METRICS_KEYS"
# Marks the JSON `moeserve preflight` (an init container) writes to its termination message,
# where the operator reads the fabric check's numbers from.
PREFLIGHT_RESULT_KEY = "moeservePreflight"

# Labels the router discovers workers by (EndpointSlices / Pods).
LABEL_DEPLOYMENT = "moeserve.io/deployment"
LABEL_ROLE = "moeserve.io/role"
LABEL_GROUP = "moeserve.io/group"
LABEL_COMPONENT = "moeserve.io/component"  # worker | router
LABEL_POD_INDEX = "apps.kubernetes.io/pod-index"  # set on StatefulSet pods by Kubernetes >= 1.28

# Prometheus series the workers export (vLLM style) and the names prometheus-adapter serves them
# under to the HPA (the custom metrics API takes no colons, so the adapter rules rename them).
METRIC_NUM_REQUESTS_WAITING = "moeserve:num_requests_waiting"
METRIC_KV_CACHE_USAGE_PERC = "moeserve:kv_cache_usage_perc"
METRIC_TIME_TO_FIRST_TOKEN = "moeserve:time_to_first_token_seconds"
# The router's gauge of requests held at zero workers: the operator wakes a scaled-to-zero pool.
METRIC_REQUESTS_HELD = "moeserve:router_requests_held"
HPA_METRIC_NUM_REQUESTS_WAITING = "moeserve_num_requests_waiting"
HPA_METRIC_KV_CACHE_USAGE_PERC = "moeserve_kv_cache_usage_perc"
HPA_METRIC_TIME_TO_FIRST_TOKEN_P90 = "moeserve_time_to_first_token_seconds_p90"

DEFAULT_IMAGE = "ghcr.io/moeserve/moeserve:0.1.0"
DEFAULT_WORKER_IMAGE = "ghcr.io/moeserve/moeserve-worker:0.1.0"
# StatefulSet pod names carry a controller-revision-hash label "<sts>-<10 chars>" (<= 63), and
# the StatefulSet is "<name>-<role>-<group>", so the deployment name must leave room for both.
MAX_NAME_LENGTH = 40
NAME_PATTERN = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"

Quantity = int | str


class SpecError(ConfigError):
    """An invalid MoEDeployment; ``fields`` lists the full path of every offending field."""

    def __init__(self, problems: list[tuple[str, str]]):
        self.problems = problems
        self.fields = [field for field, _ in problems]
        super().__init__("\n".join(f"{field}: {message}" for field, message in problems))


class EplbSpec(_Model):
    enabled: bool = False
    redundant_experts: int = Field(0, ge=0, le=1024)


class DboSpec(_Model):
    enabled: bool = False


class EnvVar(_Model):
    name: str = Field(pattern=r"^[-._a-zA-Z][-._a-zA-Z0-9]*$")
    value: str = ""


class Resources(_Model):
    requests: dict[str, Quantity] = Field(default_factory=dict)
    limits: dict[str, Quantity] = Field(default_factory=dict)


_LWS_GANG = "with workload lws the LeaderWorkerSet controller gangs each group; gang must be none"


class PoolSpec(_Model):
    """One worker pool: `replicas` EP groups, each a StatefulSet of ep / gpusPerPod pods."""

    model_config = ConfigDict(json_schema_extra={"x-kubernetes-validations": [
        _cel("self.gpusPerPod == 0 || self.parallelism.ep % self.gpusPerPod == 0",
             "parallelism.ep must be a multiple of gpusPerPod", ".parallelism.ep"),
        _cel("self.gpusPerPod == 0 || self.gpusPerPod % self.parallelism.tp == 0",
             "parallelism.tp must divide gpusPerPod", ".parallelism.tp"),
        _cel("!has(self.workload) || self.workload != 'lws' || !has(self.scheduling) || "
             "self.scheduling.gang == 'none'", _LWS_GANG, ".scheduling.gang"),
    ]})

    replicas: int = Field(1, ge=1, le=1000, description="EP groups (HPA scales this).")
    parallelism: Parallelism = Field(default_factory=Parallelism)
    gpus_per_pod: int = Field(8, ge=0, le=16,
                              description="GPUs per pod; 0 runs on CPU with one rank per pod.")
    gpu_memory_gib: float | None = Field(
        None, alias="gpuMemoryGiB", gt=0, le=4096,
        description="Memory of one GPU (GiB) for the memory plan; default: from nodeSelector "
                    "nvidia.com/gpu.product when the product is known.")
    image: str | None = Field(None, min_length=1, description="Defaults to spec.image.")
    resources: Resources = Field(default_factory=Resources)
    node_selector: dict[str, str] = Field(default_factory=dict)
    tolerations: list[dict[str, Any]] = Field(default_factory=list)
    affinity: dict[str, Any] = Field(default_factory=dict)
    env: list[EnvVar] = Field(default_factory=list)
    extra_args: list[str] = Field(default_factory=list)
    shared_memory_size: str = Field("2Gi", pattern=r"^[0-9]+(Ki|Mi|Gi|Ti)?$",
                                    description="Size of the /dev/shm emptyDir (NCCL, NIXL).")
    eplb: EplbSpec = Field(default_factory=EplbSpec)
    dbo: DboSpec = Field(default_factory=DboSpec)
    autoscaling: AutoscalingSpec = Field(default_factory=AutoscalingSpec)
    scheduling: SchedulingSpec = Field(default_factory=SchedulingSpec)
    rollout: RolloutSpec = Field(default_factory=RolloutSpec)
    preflight: PreflightSpec = Field(default_factory=PreflightSpec)
    workload: Literal["statefulset", "lws"] = Field("statefulset", description="lws: one "
                                                    "LeaderWorkerSet per pool (it rolls itself).")

    @model_validator(mode="after")
    def _pods(self) -> PoolSpec:
        gpus, ep, tp = self.gpus_per_pod, self.parallelism.ep, self.parallelism.tp
        if gpus and ep % gpus:
            raise FieldRuleError("parallelism.ep", f"ep ({ep}) must be a multiple of "
                                                   f"gpusPerPod ({gpus})")
        if gpus and gpus % tp:
            raise FieldRuleError("parallelism.tp", f"tp ({tp}) must divide gpusPerPod ({gpus})")
        if self.workload == "lws" and self.scheduling.gang != "none":
            raise FieldRuleError("scheduling.gang", _LWS_GANG)
        return self


_METRICS_KEYS = "router.apiKeyMetrics needs router.apiKeySecret (the keys it checks)"
_AUTO_TOOLS = "router.enableAutoToolChoice needs router.toolCallParser (what parses the calls)"


class RouterSpec(_Model):
    model_config = ConfigDict(json_schema_extra={"x-kubernetes-validations": [
        _cel("!has(self.apiKeyMetrics) || !self.apiKeyMetrics || has(self.apiKeySecret)",
             _METRICS_KEYS, ".apiKeyMetrics"),
        _cel("!has(self.enableAutoToolChoice) || !self.enableAutoToolChoice || "
             "has(self.toolCallParser)", _AUTO_TOOLS, ".enableAutoToolChoice"),
    ]})

    replicas: int = Field(1, ge=1, le=100)
    image: str | None = Field(None, min_length=1, description="Defaults to the operator image.")
    resources: Resources = Field(default_factory=Resources)
    disagg_threshold: int = Field(256, ge=0, description="Uncached prompt tokens below which "
                                  "the decode worker prefills locally.")
    service_type: Literal["ClusterIP", "NodePort", "LoadBalancer"] = "ClusterIP"
    api_key_secret: str | None = Field(None, min_length=1, description="Secret with key "
                                       "`api-keys` (comma-separated); unset means no auth.")
    api_key_metrics: bool = Field(False, description="Put the router's /metrics (HTTP and "
                                  "metrics ports) behind apiKeySecret's keys too.")
    tool_call_parser: Literal["deepseek_v3"] | None = Field(
        None, description="Return the model's tool calls as tool_calls (the router's "
        "--tool-call-parser); tool_choice required or a named function then works.")
    enable_auto_tool_choice: bool = Field(False, description="Serve tool_choice auto "
                                          "(--enable-auto-tool-choice); needs toolCallParser.")
    reasoning_parser: Literal["deepseek_r1"] | None = Field(
        None, description="Return <think> text as reasoning_content (--reasoning-parser).")
    node_selector: dict[str, str] = Field(default_factory=dict)
    tolerations: list[dict[str, Any]] = Field(default_factory=list)

    @model_validator(mode="after")
    def _metrics_keys(self) -> RouterSpec:
        if self.api_key_metrics and not self.api_key_secret:
            raise FieldRuleError("apiKeyMetrics", _METRICS_KEYS)
        if self.enable_auto_tool_choice and not self.tool_call_parser:
            raise FieldRuleError("enableAutoToolChoice", _AUTO_TOOLS)
        return self

    def chat_args(self) -> list[str]:
        """The router's flags for these fields (router/chat.py parses them)."""
        args = ["--tool-call-parser", self.tool_call_parser] if self.tool_call_parser else []
        if self.enable_auto_tool_choice:
            args.append("--enable-auto-tool-choice")
        if self.reasoning_parser:
            args += ["--reasoning-parser", self.reasoning_parser]
        return args


_SLA_HPA_MESSAGE = "a pool's HPA must be off when spec.autoscaling.mode is sla"


class MoEDeploymentSpec(_Model):
    """A disaggregated MoE deployment: model, router and the prefill and decode pools."""

    model_config = ConfigDict(json_schema_extra={"x-kubernetes-validations": [
        _cel(f"!has(self.model.numExperts) || (self.model.numExperts + "
             f"self.{role}.eplb.redundantExperts) % self.{role}.parallelism.ep == 0",
             f"{role}.parallelism.ep must divide model.numExperts + "
             f"{role}.eplb.redundantExperts", f".{role}.parallelism.ep")
        for role in ROLES
    ] + [
        _cel(f"!has(self.autoscaling) || self.autoscaling.mode != 'sla' || "
             f"!self.{role}.autoscaling.enabled", _SLA_HPA_MESSAGE, f".{role}.autoscaling.enabled")
        for role in ROLES
    ]})

    model: ModelSpec
    image: str = Field(DEFAULT_WORKER_IMAGE, min_length=1, description="Worker image.")
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = "IfNotPresent"
    image_pull_secrets: list[str] = Field(default_factory=list)
    cluster_domain: str = Field("cluster.local", min_length=1)
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    compile_cache: CompileCacheSpec = Field(default_factory=CompileCacheSpec)
    router: RouterSpec = Field(default_factory=RouterSpec)
    prefill: PoolSpec
    decode: PoolSpec
    security: SecuritySpec = Field(default_factory=SecuritySpec)
    autoscaling: SlaAutoscalingSpec = Field(default_factory=SlaAutoscalingSpec)

    @model_validator(mode="after")
    def _experts(self) -> MoEDeploymentSpec:
        for role in ROLES:  # one owner of a pool's size: its HPA or the SLA planner
            if self.autoscaling.mode == "sla" and self.pool(role).autoscaling.enabled:
                raise FieldRuleError(f"{role}.autoscaling.enabled", _SLA_HPA_MESSAGE)
        experts = self.model.num_experts
        for role in ROLES:
            pool: PoolSpec = getattr(self, role)
            ep = pool.parallelism.ep
            total = (experts or 0) + pool.eplb.redundant_experts
            if experts is not None and total % ep:
                raise FieldRuleError(f"{role}.parallelism.ep", (
                    f"ep ({ep}) must divide model.numExperts + {role}.eplb.redundantExperts "
                    f"({experts} + {pool.eplb.redundant_experts} = {total})"))
        return self

    def pool(self, role: Role) -> PoolSpec:
        return self.prefill if role == "prefill" else self.decode


class MoEDeployment(BaseModel):
    """A parsed manifest: identity plus spec. ``uid`` is known only for objects from a cluster."""

    model_config = ConfigDict(frozen=True)

    name: str
    namespace: str
    spec: MoEDeploymentSpec
    uid: str | None = None
    generation: int | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)


def parse_spec(data: Any, prefix: str = "spec") -> MoEDeploymentSpec:
    """Validate ``data`` (the manifest's ``spec``) or raise SpecError naming every bad field."""
    if not isinstance(data, Mapping):
        raise SpecError([(prefix, "must be a mapping")])
    try:
        return MoEDeploymentSpec.model_validate(data)
    except ValidationError as exc:
        problems = [
            (_field_path((prefix, *err["loc"]), err), _message(err)) for err in exc.errors()
        ]
        raise SpecError(problems) from None


def parse_manifest(doc: Any, default_namespace: str = "default") -> MoEDeployment:
    """Parse a whole MoEDeployment object (as applied with kubectl or read from the cluster)."""
    if not isinstance(doc, Mapping):
        raise SpecError([("(document)", "must be a mapping")])
    problems: list[tuple[str, str]] = []
    if doc.get("apiVersion") != f"{API_GROUP}/{API_VERSION}":
        problems.append(("apiVersion", f"must be {API_GROUP}/{API_VERSION}"))
    if doc.get("kind") != KIND_DEPLOYMENT:
        problems.append(("kind", f"must be {KIND_DEPLOYMENT}"))
    meta = doc.get("metadata") or {}
    name = meta.get("name") if isinstance(meta, Mapping) else None
    if not isinstance(name, str) or not re.match(NAME_PATTERN, name):
        problems.append(("metadata.name", "must be a DNS-1035 label (lowercase letters, digits, "
                                          "'-', starting with a letter)"))
    elif len(name) > MAX_NAME_LENGTH:
        problems.append(("metadata.name", f"must be at most {MAX_NAME_LENGTH} characters"))
    try:
        spec = parse_spec(doc.get("spec"))
    except SpecError as exc:
        problems.extend(exc.problems)
    if problems:
        raise SpecError(problems)
    return MoEDeployment(
        name=name, namespace=meta.get("namespace") or default_namespace, spec=spec,
        uid=meta.get("uid"), generation=meta.get("generation"),
        labels=dict(meta.get("labels") or {}), annotations=dict(meta.get("annotations") or {}),
    )


def ranks_per_pod(pool: PoolSpec) -> int:
    """Ranks (processes) in one pod: its GPUs, or one rank per pod on the CPU."""
    return pool.gpus_per_pod or 1


def pods_per_group(pool: PoolSpec) -> int:
    return pool.parallelism.ep // ranks_per_pod(pool)
