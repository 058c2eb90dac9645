"""The Ray application built from a MoEDeployment spec, without starting Ray."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

pytest.importorskip("ray")

from moeserve.common import spec as s  # noqa: E402
from moeserve.common.spec import SpecError  # noqa: E402
from moeserve.deploy.ray_app import (  # noqa: E402
    PoolAutoscaler,
    app_builder,
    build_app,
    load_deployment,
    pool_options,
    pool_plan,
    required_cpus,
    router_argv,
)
from moeserve.deploy.ray_workers import rank_launch  # noqa: E402

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(120)]

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "examples" / "tiny-cpu.yaml"


def _autoscaled(tmp_path: Path) -> Path:
    doc = yaml.safe_load(TINY.read_text())
    doc["spec"]["decode"]["autoscaling"] = {
        "enabled": True, "minReplicas": 1, "maxReplicas": 3, "targetNumRequestsWaiting": 4,
        "targetKvCacheUsagePerc": 0.8, "scaleDownStabilizationSeconds": 60,
    }  # fmt: skip
    path = tmp_path / "auto.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def test_tiny_manifest_gives_one_bundle_per_rank() -> None:
    dep = load_deployment(str(TINY))
    plan = pool_plan(dep, "decode", "/m")
    opts = pool_options(dep, "decode", plan)
    assert opts["num_replicas"] == 1
    assert opts["placement_group_bundles"] == [{"CPU": 0.5}, {"CPU": 0.5}]  # ep 2, 500m a pod
    assert opts["placement_group_strategy"] == "STRICT_PACK"
    prefill = pool_options(dep, "prefill", pool_plan(dep, "prefill", "/m"))
    assert prefill["placement_group_bundles"] == [{"CPU": 0.5}]
    assert required_cpus(dep) == pytest.approx(1 + 2 * 0.5 + 2 * 2 * 0.5)


def test_rank_env_mirrors_the_operator() -> None:
    dep = load_deployment(str(TINY))
    plan = pool_plan(dep, "decode", "/m")
    launch = rank_launch(plan, group=3, rank=1, rendezvous="10.0.0.1:1234", host="10.0.0.2",
                         port=5000, metrics_port=5001)  # fmt: skip
    env, argv = launch.env, launch.argv
    assert env[s.ENV_RANK] == "1" and env[s.ENV_WORLD_SIZE] == "2"
    assert env[s.ENV_RANKS_PER_POD] == "1" and env[s.ENV_NUM_PODS] == "2"
    assert env[s.ENV_GROUP] == "3" and env[s.ENV_RENDEZVOUS] == "10.0.0.1:1234"
    assert env[s.ENV_ROLE] == "decode" and env[s.ENV_MODEL] == "moeserve/tiny-deepseek"
    assert env[s.ENV_BLOCK_SIZE] == str(dep.spec.model.block_size)
    assert argv[:3] == ["worker", "--role", "decode"]
    assert ["--ep", "2"] == argv[argv.index("--ep"):argv.index("--ep") + 2]
    assert ["--port", "5000"] == argv[argv.index("--port"):argv.index("--port") + 2]
    assert "--device" in argv  # gpusPerPod 0: the CPU


def test_gpu_pool_asks_a_gpu_per_rank(tmp_path: Path) -> None:
    doc = yaml.safe_load(TINY.read_text())
    doc["spec"]["decode"].update({"gpusPerPod": 2, "parallelism": {"dp": 4, "ep": 4, "tp": 1}})
    path = tmp_path / "gpu.yaml"
    path.write_text(yaml.safe_dump(doc))
    dep = load_deployment(str(path))
    opts = pool_options(dep, "decode", pool_plan(dep, "decode", "/m"))
    assert opts["placement_group_bundles"] == [{"CPU": 0.25, "GPU": 1}] * 4


def test_autoscaling_uses_the_hpa_signals_within_bounds(tmp_path: Path) -> None:
    dep = load_deployment(str(_autoscaled(tmp_path)))
    opts = pool_options(dep, "decode", pool_plan(dep, "decode", "/m"))
    auto = opts["autoscaling_config"]
    assert "num_replicas" not in opts
    assert (auto["min_replicas"], auto["max_replicas"], auto["downscale_delay_s"]) == (1, 3, 60)
    policy = PoolAutoscaler(**auto["policy"]["policy_kwargs"])
    # HPA formula: ceil(current * average / target); the largest signal wins.
    assert policy.desired(1, {"num_requests_waiting": {"a": 10.0}}) == 3
    assert policy.desired(2, {"kv_cache_usage_perc": {"a": 0.2, "b": 0.2}}) == 1
    assert policy.desired(2, {}) == 2  # no data yet: stay
    ctx = SimpleNamespace(current_num_replicas=1, aggregated_metrics={
        "num_requests_waiting": {"a": 40.0}}, capacity_adjusted_min_replicas=1,
        capacity_adjusted_max_replicas=3, policy_state={})  # fmt: skip
    assert policy(ctx)[0] == 3  # clamped to maxReplicas
    build_app(dep)  # Serve accepts the options, the policy's import path included


def test_model_dir_topology_and_bad_input(tmp_path: Path, tiny_v3: Path) -> None:
    dep = load_deployment(model=str(tiny_v3), prefill=2, decode=3, gpus=0)
    assert (dep.spec.prefill.replicas, dep.spec.decode.replicas) == (2, 3)
    assert dep.spec.model.name == tiny_v3.name  # same model id as `moeserve up`
    with pytest.raises(SpecError, match="--model"):
        load_deployment(model=str(tmp_path))
    with pytest.raises(SpecError, match="no such manifest"):
        load_deployment(str(tmp_path / "missing.yaml"))
    bad = yaml.safe_load(TINY.read_text())
    bad["spec"]["decode"]["parallelism"] = {"dp": 2, "ep": 3, "tp": 1}
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(bad))
    with pytest.raises(SpecError, match=r"spec\.decode\.parallelism\.ep"):
        load_deployment(str(tmp_path / "bad.yaml"))
    pvc = yaml.safe_load(TINY.read_text())
    pvc["spec"]["model"]["source"] = {"pvc": {"claimName": "weights"}}
    (tmp_path / "pvc.yaml").write_text(yaml.safe_dump(pvc))
    with pytest.raises(SpecError, match="spec.model.source.pvc"):
        build_app(load_deployment(str(tmp_path / "pvc.yaml")))
    with pytest.raises(SpecError, match="replica"):
        app_builder({"manifest": str(TINY), "replica": 2})


def test_router_flags_come_from_the_manifest_and_up(tmp_path: Path, monkeypatch) -> None:
    """spec.router's fields reach the Ray router as the operator renders them (they were
    silently dropped on Ray), `up --ray`'s router flags after them, keys kept out of argv."""
    from moeserve.deploy.ray_router import parse_router_argv

    monkeypatch.delenv("MOESERVE_API_KEY", raising=False)
    monkeypatch.delenv("MOESERVE_API_KEYS", raising=False)
    doc = yaml.safe_load(TINY.read_text())
    doc["spec"]["router"].update(toolCallParser="deepseek_v3", enableAutoToolChoice=True,
                                 reasoningParser="deepseek_r1", disaggThreshold=64)
    (tmp_path / "m.yaml").write_text(yaml.safe_dump(doc))
    dep = load_deployment(str(tmp_path / "m.yaml"))
    argv, keys = router_argv(dep, ["--api-key", "k1", "--max-stop-strings", "2",
                                   "--api-key=k2"])
    assert keys == ["k1", "k2"] and "k1" not in argv and "--api-key=k2" not in argv
    args = parse_router_argv(argv)
    assert (args.tool_call_parser, args.enable_auto_tool_choice, args.reasoning_parser) == (
        "deepseek_v3", True, "deepseek_r1")
    assert args.disagg_threshold == 64 and args.max_stop_strings == 2
    from moeserve.router.settings import settings_from_args

    # every flag the replica reads has a value (the parser leaves defaults to the config step)
    assert settings_from_args(args).disagg_threshold == 64 and args.probe_interval_s == 1.0
    for bad, message in ((["--header-timeout-s", "3"], "does not apply on Ray"),
                         (["--no-such-flag"], "unknown router flags: --no-such-flag"),
                         (["--max-stop-strings", "x"], "invalid int value")):
        with pytest.raises(ValueError, match=message):
            parse_router_argv(bad)
    with pytest.raises(ValueError, match="does not apply on Ray"):
        build_app(dep, extra_router_argv=["--header-timeout-s", "3"])
    doc["spec"]["router"]["apiKeySecret"] = "keys"
    (tmp_path / "k.yaml").write_text(yaml.safe_dump(doc))
    with pytest.raises(ValueError, match="apiKeySecret 'keys' is a Kubernetes Secret"):
        build_app(load_deployment(str(tmp_path / "k.yaml")))
    build_app(load_deployment(str(tmp_path / "k.yaml")), extra_router_argv=["--api-key", "k"])
