"""A MoEDeployment as a Ray Serve application.

Three deployments, built from the spec that moeserve.common.spec parses for every target:

- ``prefill`` and ``decode``: one replica per EP group (``ray_workers.EPGroup``); each replica's
  placement group has one bundle per rank (STRICT_PACK when a group fits one node, PACK across
  nodes otherwise) and holds the group's rank actors. Sizes come from ``replicas``, or from
  Serve autoscaling within ``autoscaling.min/maxReplicas`` on the HPA's signals
  (``PoolAutoscaler``);
- ``router``: the ingress (``ray_router.RouterDeployment``), the code of `moeserve router`,
  finding workers through their named actors.

Use it with ``serve run moeserve.deploy.ray_app:app_builder manifest=examples/tiny-cpu.yaml``
(or a Serve config file whose ``args`` hold ``manifest`` or ``model``/``prefill``/``decode``,
and optionally ``served_model_name``),
or through ``moeserve up --ray`` (ray_cli.py).
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

import yaml

from moeserve.common import spec as s
from moeserve.common.launch_plan import STARTUP_TIMEOUT_S, pool_launch
from moeserve.common.served_name import with_served_name
from moeserve.common.spec import ENV_API_KEYS, MoEDeployment, PoolSpec, SpecError
from moeserve.common.worker_auth import (
    ENV_INSECURE,
    ROUTER_SECRET_ENV,
    WORKER_SECRET_ENV,
    PlaneSecret,
)
from moeserve.deploy.manifest_local import model_deployment

__all__ = [
    "app_builder", "build_app", "load_deployment", "model_directory", "pool_plan",
    "pool_options", "PoolAutoscaler", "required_cpus", "router_argv",
]

DEFAULT_CPUS_PER_RANK = 1.0


def load_deployment(manifest: str | None = None, model: str | None = None, prefill: int = 1,
                    decode: int = 1, gpus: int | None = None) -> MoEDeployment:
    """A manifest file, or the `moeserve up --model DIR` topology as an equivalent manifest."""
    if manifest:
        path = Path(manifest)
        if not path.is_file():
            raise SpecError([("-f", f"no such manifest file: {manifest}")])
        return s.parse_manifest(yaml.safe_load(path.read_text()))
    return model_deployment(model, prefill, decode, gpus)


def model_directory(dep: MoEDeployment) -> str:
    """The checkpoint directory every Ray node reads (a shared path, as on a Ray cluster)."""
    model = dep.spec.model
    if model.source.preset == "tiny":
        from moeserve.worker.checkpoint import ensure_tiny_checkpoint

        return str(ensure_tiny_checkpoint())
    if model.source.host_path is not None:
        return str(Path(model.source.host_path.path) / model.path)
    raise SpecError([("spec.model.source.pvc", "a PersistentVolumeClaim exists only on "
                      "Kubernetes; on Ray use hostPath (a path every node can read) or preset")])


def _cpus(pool: PoolSpec) -> float:
    """CPUs per rank: the pod's CPU request spread over its ranks (Kubernetes quantities)."""
    raw = pool.resources.requests.get("cpu")
    if raw is None:
        return DEFAULT_CPUS_PER_RANK
    text = str(raw)
    value = float(text[:-1]) / 1000 if text.endswith("m") else float(text)
    return value / s.ranks_per_pod(pool)


def pool_plan(dep: MoEDeployment, role: s.Role, model_dir: str, num_kv_blocks: int = 0
              ) -> Any:  # fmt: skip
    """The launch plan of ``role``'s ranks and what one rank holds (a GPU, or CPUs)."""
    from moeserve.deploy.ray_workers import RankPlan

    pool = dep.spec.pool(role)
    return RankPlan(launch=pool_launch(dep, role, model_dir, num_kv_blocks),
                    gpus_per_rank=1 if pool.gpus_per_pod else 0, cpus_per_rank=_cpus(pool))


def _strategy(bundle: dict[str, float], ranks: int) -> str:
    """STRICT_PACK when some node can hold the whole group, else PACK (spread only as needed)."""
    import ray

    if not ray.is_initialized():
        return "STRICT_PACK"
    for node in ray.nodes():
        res = node.get("Resources", {}) if node.get("Alive") else {}
        if all(res.get(k, 0) >= v * ranks for k, v in bundle.items()):
            return "STRICT_PACK"
    return "PACK"


class PoolAutoscaler:
    """Serve autoscaling policy on the HPA's signals: desired = ceil(current * value / target)
    for each target set (average per group, as the HPA averages per pod), the largest wins."""

    def __init__(self, target_num_requests_waiting: float | None = None,
                 target_kv_cache_usage_perc: float | None = None):  # fmt: skip
        self.targets = {"num_requests_waiting": target_num_requests_waiting,
                        "kv_cache_usage_perc": target_kv_cache_usage_perc}  # fmt: skip

    def desired(self, current: int, metrics: dict[str, dict[Any, float]] | None) -> int:
        wants = []
        for key, target in self.targets.items():
            values = list((metrics or {}).get(key, {}).values())
            if target and values:
                wants.append(math.ceil(current * (sum(values) / len(values)) / target))
        return max(wants) if wants else current

    def __call__(self, ctx: Any) -> tuple[int, dict[str, Any]]:
        current = max(ctx.current_num_replicas, 1)
        want = self.desired(current, ctx.aggregated_metrics)
        lo, hi = ctx.capacity_adjusted_min_replicas, ctx.capacity_adjusted_max_replicas
        return min(max(want, lo), hi), ctx.policy_state


def pool_options(dep: MoEDeployment, role: s.Role, plan: Any) -> dict[str, Any]:
    pool = dep.spec.pool(role)
    bundle: dict[str, float] = {"CPU": plan.cpus_per_rank}
    if plan.gpus_per_rank:
        bundle["GPU"] = plan.gpus_per_rank
    opts: dict[str, Any] = {
        "name": role,
        # The replica only supervises; its ranks hold the bundles' resources.
        "ray_actor_options": {"num_cpus": 0},
        "placement_group_bundles": [dict(bundle) for _ in range(plan.ep)],
        "placement_group_strategy": _strategy(bundle, plan.ep),
        "health_check_period_s": 2.0,
        "health_check_timeout_s": 30.0,
        "graceful_shutdown_timeout_s": 5.0,
    }
    auto = pool.autoscaling
    if auto.enabled:
        opts["autoscaling_config"] = {
            "min_replicas": auto.min_replicas, "max_replicas": auto.max_replicas,
            "initial_replicas": min(max(pool.replicas, auto.min_replicas), auto.max_replicas),
            "downscale_delay_s": float(auto.scale_down_stabilization_seconds),
            "upscale_delay_s": 5.0, "metrics_interval_s": 2.0, "look_back_period_s": 10.0,
            "policy": {"policy_function": f"{__name__}:PoolAutoscaler", "policy_kwargs": {
                "target_num_requests_waiting": auto.target_num_requests_waiting,
                "target_kv_cache_usage_perc": auto.target_kv_cache_usage_perc}},
        }  # fmt: skip
    else:
        opts["num_replicas"] = pool.replicas
    return opts


def _version(*parts: Any) -> str:
    # Serve restarts every replica of a deployment whose version changes; pinning it to the
    # constructor arguments makes a size-only change (scaling) add or remove replicas only.
    blob = json.dumps([repr(p) for p in parts], sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def required_cpus(dep: MoEDeployment, spare_groups: int = 1) -> float:
    """Logical CPUs a local Ray instance needs: every group at its largest, plus spares."""
    total = 1.0  # Serve controller and proxy
    for role in s.ROLES:
        pool = dep.spec.pool(role)
        groups = max(pool.replicas, pool.autoscaling.max_replicas if pool.autoscaling.enabled
                     else 0) + spare_groups  # fmt: skip
        total += groups * pool.parallelism.ep * _cpus(pool)
    return total


def _secret_env(plane: PlaneSecret | None, names: tuple[str, ...]) -> dict[str, Any]:
    """ray_actor_options' runtime_env: the worker-plane tokens as environment, never as
    arguments (rank actors, which an EPGroup replica starts, inherit its runtime_env)."""
    env = {ENV_INSECURE: "1"} if plane is None else plane.env(names)
    return {"runtime_env": {"env_vars": env}}


def router_argv(dep: MoEDeployment, extra: list[str] | tuple[str, ...] = ()
                ) -> tuple[list[str], list[str]]:  # fmt: skip
    """(flags, API keys) of the Ray router replica: the manifest's spec.router as the
    operator renders it (disaggThreshold, the chat parsers, apiKeyMetrics), then ``extra``
    (`moeserve up --ray`'s router flags, which win). ``--api-key`` values are taken out: they
    travel in the replica's environment, not in arguments Serve shows in its status."""
    r = dep.spec.router
    argv = ["--disagg-threshold", str(r.disagg_threshold), *r.chat_args()]
    if r.api_key_metrics:
        argv.append("--api-key-metrics")
    keys: list[str] = []
    rest = list(extra)
    while rest:
        flag = rest.pop(0)
        if flag == "--api-key" and rest:
            keys.append(rest.pop(0))
        elif flag.startswith("--api-key="):
            keys.append(flag.split("=", 1)[1])
        else:
            argv.append(flag)
    return argv, keys


def build_app(dep: MoEDeployment, num_kv_blocks: int = 0,
              startup_timeout_s: float = STARTUP_TIMEOUT_S,
              insecure_worker_plane: bool = False,
              extra_router_argv: list[str] | tuple[str, ...] = ()) -> Any:  # fmt: skip
    """The Serve application of one MoEDeployment (needs ray[serve]), with a fresh
    worker-plane secret unless ``insecure_worker_plane`` (development only);
    ``extra_router_argv``: router flags on top of the manifest's (see ``router_argv``)."""
    from ray import serve

    from moeserve.deploy.ray_router import RouterDeployment, parse_router_argv
    from moeserve.deploy.ray_workers import EPGroup
    from moeserve.router.auth import keys_from_sources

    model_dir = model_directory(dep)
    argv, flag_keys = router_argv(dep, extra_router_argv)
    keys = keys_from_sources(flag_keys)  # and MOESERVE_API_KEY(S): the replica gets them all
    if dep.spec.router.api_key_secret and not keys:
        raise ValueError(f"spec.router.apiKeySecret {dep.spec.router.api_key_secret!r} is a "
                         "Kubernetes Secret; on Ray give the keys with --api-key or "
                         f"${ENV_API_KEYS} (without them the router would serve with no key)")
    parse_router_argv(argv)  # a bad flag fails here, not in a replica that restarts forever
    plane = None if insecure_worker_plane else PlaneSecret.generate()
    pools = {}
    for role in s.ROLES:
        plan = pool_plan(dep, role, model_dir, num_kv_blocks)
        opts = pool_options(dep, role, plan)
        opts["ray_actor_options"] |= _secret_env(plane, WORKER_SECRET_ENV)
        deployment = serve.deployment(EPGroup).options(
            **opts, version=_version(plan), _internal=True)
        pools[role] = deployment.bind(plan)
    options = {"num_cpus": 0, **_secret_env(plane, ROUTER_SECRET_ENV)}
    if keys:
        options["runtime_env"]["env_vars"][ENV_API_KEYS] = ",".join(keys)
    router = serve.deployment(serve.ingress()(RouterDeployment)).options(
        name="router", num_replicas=dep.spec.router.replicas, ray_actor_options=options,
        max_ongoing_requests=1024, health_check_period_s=2.0, graceful_shutdown_timeout_s=5.0,
        version=_version(dep.name, model_dir, argv, keys), _internal=True,
    )  # fmt: skip
    return router.bind(dep.name, model_dir, argv, startup_timeout_s, **pools)


def app_builder(args: dict[str, Any]) -> Any:
    """`serve run moeserve.deploy.ray_app:app_builder manifest=FILE` (or model=DIR prefill=N
    decode=N): the import path for Serve config files too."""
    known = {"manifest", "model", "prefill", "decode", "num_kv_blocks", "served_model_name"}
    unknown = sorted(set(args) - known)
    if unknown:
        raise SpecError([(k, f"unknown argument; expected one of {sorted(known)}")
                         for k in unknown])  # fmt: skip
    dep = load_deployment(args.get("manifest"), args.get("model"),
                          int(args.get("prefill", 1)), int(args.get("decode", 1)))  # fmt: skip
    dep = with_served_name(dep, args.get("served_model_name"))
    return build_app(dep, int(args.get("num_kv_blocks", 0)))
