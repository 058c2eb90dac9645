"""One launch plan for every target: the operator's pod, `moeserve up -f` and the Ray rank actor
give the same worker argv and environment for the same pool, apart from what a target alone
decides (where the checkpoint is mounted, addresses, how ranks map to processes), and that
environment reads back, through the worker's one env parser, as the flags the pool asks for."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from moeserve.cli import build_parser
from moeserve.common import spec as s
from moeserve.common.launch_plan import WorkerLaunch
from moeserve.common.spec import parse_manifest
from moeserve.deploy.local import LAPTOP_DISAGG_THRESHOLD, local_launch
from moeserve.deploy.manifest_local import cluster_spec_from_manifest, model_deployment
from moeserve.deploy.ray_app import pool_plan
from moeserve.deploy.ray_workers import rank_launch
from moeserve.operator.build_workers import worker_launch as pod_launch
from moeserve.worker.env_defaults import env_defaults

TINY = Path(__file__).resolve().parents[1] / "examples" / "tiny-cpu.yaml"
ADDRESS_FLAGS = {"--model", "--host", "--port", "--metrics-port"}
PLACED_ENV = {s.ENV_RANK, s.ENV_RANKS_PER_POD, s.ENV_NUM_PODS, s.ENV_GROUP, s.ENV_RENDEZVOUS,
              s.ENV_METRICS_PORT, s.ENV_NIXL_PORT}  # fmt: skip
# Each target's own environment: a pod's cache dirs on its emptyDir; a Ray actor is a one-rank
# "pod" on shared CPUs.
TARGET_ENV = {"HOME", "XDG_CACHE_HOME", "TRITON_CACHE_DIR", "MOESERVE_LOCAL_RANK",
              "OMP_NUM_THREADS"}  # fmt: skip


def _manifest() -> s.MoEDeployment:
    """tiny-cpu with every pool setting the plan carries set away from its default."""
    doc = yaml.safe_load(TINY.read_text())
    doc["spec"]["logLevel"] = "debug"
    doc["spec"]["model"]["blockSize"] = 32
    doc["spec"]["decode"].update({
        "eplb": {"enabled": True, "redundantExperts": 2}, "dbo": {"enabled": True},
        "extraArgs": ["--max-num-seqs", "8"], "env": [{"name": "FOO", "value": "bar"}],
    })  # fmt: skip
    return parse_manifest(doc)


def _shared(launch: WorkerLaunch) -> tuple[list[str], dict[str, str]]:
    argv, args = [], iter(launch.argv)
    for a in args:
        if a in ADDRESS_FLAGS:
            next(args)
        else:
            argv.append(a)
    env = {k: v for k, v in launch.env.items() if k not in PLACED_ENV | TARGET_ENV}
    return argv, env


def _targets(dep: s.MoEDeployment, role: s.Role) -> dict[str, WorkerLaunch]:
    command, pod_env = pod_launch(dep, role, 0)
    operator = WorkerLaunch(command[1:], {e["name"]: e["value"] for e in pod_env if "value" in e})
    local = local_launch(cluster_spec_from_manifest(dep, model="/ckpt"), role, 0, "/ckpt")
    ray = rank_launch(pool_plan(dep, role, "/ckpt"), group=0, rank=0, rendezvous="10.0.0.1:1",
                      host="10.0.0.2", port=5000, metrics_port=5001)  # fmt: skip
    return {"operator": operator, "local": local, "ray": ray}


@pytest.mark.parametrize("role", s.ROLES)
def test_every_target_launches_the_same_worker(role: s.Role) -> None:
    dep = _manifest()
    launches = _targets(dep, role)
    shared = {name: _shared(launch) for name, launch in launches.items()}
    assert shared["local"] == shared["operator"], role
    assert shared["ray"] == shared["operator"], role
    for name, launch in launches.items():  # each target places the whole group
        env = launch.env
        assert int(env[s.ENV_RANKS_PER_POD]) * int(env[s.ENV_NUM_PODS]) == int(
            env[s.ENV_WORLD_SIZE]) == dep.spec.pool(role).parallelism.ep, name  # fmt: skip


def test_the_environment_reads_back_as_the_pools_flags() -> None:
    dep = _manifest()
    for name, launch in _targets(dep, "decode").items():
        got = env_defaults(launch.env)
        assert (got["enable_eplb"], got["eplb_redundant_experts"], got["enable_dbo"]) == (
            True, 2, True), name  # fmt: skip
        assert (got["block_size"], got["model_id"], got["role"]) == (
            32, "moeserve/tiny-deepseek", "decode"), name  # fmt: skip
        args = build_parser().parse_args(launch.argv)
        assert (args.ep, args.device, args.max_num_seqs) == (2, "cpu", 8), name
        assert launch.env["FOO"] == "bar" and launch.env[s.ENV_LOG_LEVEL] == "debug", name


def test_extra_args_and_env_of_the_pool_win() -> None:
    doc = yaml.safe_load(TINY.read_text())
    doc["spec"]["decode"].update({"extraArgs": ["--ep", "2", "--block-size", "16"],
                                  "env": [{"name": s.ENV_LOG_LEVEL, "value": "error"}]})
    for name, launch in _targets(parse_manifest(doc), "decode").items():
        assert launch.argv[-4:] == ["--ep", "2", "--block-size", "16"], name
        assert build_parser().parse_args(launch.argv).block_size == 16, name
        assert launch.env[s.ENV_LOG_LEVEL] == "error", name


def test_plain_up_is_a_manifest_with_the_spec_defaults(tmp_path: Path) -> None:
    """`moeserve up` without -f: the same defaults as a manifest, one named override."""
    dep = model_deployment(None, prefill=2, decode=1, gpus=0)
    bare = parse_manifest({
        "apiVersion": f"{s.API_GROUP}/{s.API_VERSION}", "kind": s.KIND_DEPLOYMENT,
        "metadata": {"name": "moeserve"},
        "spec": {"model": {"name": dep.spec.model.name, "source": {"preset": "tiny"}},
                 "prefill": {"replicas": 2, "gpusPerPod": 0}, "decode": {"gpusPerPod": 0}},
    })  # fmt: skip
    router = bare.spec.router.model_copy(update={"disagg_threshold": LAPTOP_DISAGG_THRESHOLD})
    assert dep.spec == bare.spec.model_copy(update={"router": router})
    spec = cluster_spec_from_manifest(dep)
    assert (spec.prefill, spec.decode, spec.disagg_threshold) == (2, 1, LAPTOP_DISAGG_THRESHOLD)
