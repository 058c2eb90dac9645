"""`moeserve up` passes engine flags to every worker (through the pools' extraArgs, as Ray does)
and router flags to the router; nothing given changes nothing; workers sharing one GPU split
the default memory fraction."""

from __future__ import annotations

import io

from moeserve.cli import build_parser
from moeserve.deploy.local import LocalCluster
from moeserve.deploy.manifest_local import cluster_spec_from_manifest, model_deployment
from moeserve.deploy.up_cli import _cluster_spec
from moeserve.deploy.up_flags import shared_gpu_args


def _launches(*argv: str) -> tuple[LocalCluster, list, io.StringIO]:
    args = build_parser().parse_args(["up", *argv])
    log = io.StringIO()
    cluster = LocalCluster(_cluster_spec(args), log=log)
    return cluster, cluster._worker_launches("/ckpt"), log


def _after(argv: list[str], flag: str) -> str:
    return argv[len(argv) - 1 - argv[::-1].index(flag) + 1]


def test_engine_and_router_flags_reach_every_child() -> None:
    cluster, launches, _ = _launches("--max-num-batched-tokens", "4096", "--api-key", "K",
                                     "--api-key", "K2", "--no-enable-prefix-caching")
    assert [name for name, _, _ in launches] == ["prefill-0", "decode-0"]
    for _, launch, _ in launches:
        assert _after(launch.argv, "--max-num-batched-tokens") == "4096"
        assert "--no-enable-prefix-caching" in launch.argv and "--api-key" not in launch.argv
    assert cluster.spec.router_args == ["--api-key", "K", "--api-key", "K2"]
    # the worker's own parser reads them back
    worker = build_parser().parse_args(launches[0][1].argv)
    assert worker.max_num_batched_tokens == 4096 and worker.enable_prefix_caching is False


def test_nothing_given_changes_nothing() -> None:
    cluster, launches, _ = _launches()
    assert cluster.spec.router_args == []
    assert all("--max-num-batched-tokens" not in launch.argv for _, launch, _ in launches)


def test_workers_on_one_gpu_split_the_default_and_say_so() -> None:
    flags, line = shared_gpu_args([["worker"], ["worker"]])
    assert flags == ["--gpu-memory-utilization", "0.45"] and "2 workers share one GPU" in line
    assert shared_gpu_args([["worker"]]) == ([], None)
    given = [["worker", "--gpu-memory-utilization=0.3"], ["worker"]]
    assert shared_gpu_args(given) == ([], None)
    assert shared_gpu_args([["w"]] * 3)[0] == ["--gpu-memory-utilization", "0.3"]


def test_up_splits_only_gpu_workers_and_keeps_a_given_utilization() -> None:
    # without a GPU here the pools are gpusPerPod 0 (--device cpu): no split
    _, launches, log = _launches()
    on_cpu = [launch.argv for _, launch, _ in launches]
    assert all("--gpu-memory-utilization" not in a for a in on_cpu) and not log.getvalue()
    _, launches, _ = _launches("--gpu-memory-utilization", "0.4")
    assert all(_after(launch.argv, "--gpu-memory-utilization") == "0.4"
               for _, launch, _ in launches)


def test_prefill_and_decode_on_one_gpu_get_half_each() -> None:
    spec = cluster_spec_from_manifest(model_deployment(None, 1, 1, gpus=1))
    log = io.StringIO()
    launches = LocalCluster(spec, log=log)._worker_launches("/ckpt")
    assert [_after(launch.argv, "--gpu-memory-utilization") for _, launch, _ in launches] == [
        "0.45", "0.45"]
    assert "2 workers share one GPU: --gpu-memory-utilization 0.45 each" in log.getvalue()


def test_tool_and_reasoning_parsers_reach_the_router() -> None:
    flags = ["--tool-call-parser", "deepseek_v3", "--enable-auto-tool-choice",
             "--reasoning-parser", "deepseek_r1"]
    cluster, launches, _ = _launches(*flags)
    assert cluster.spec.router_args == flags
    assert all("--tool-call-parser" not in launch.argv for _, launch, _ in launches)
