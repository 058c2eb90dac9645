"""A manifest whose GPUs cannot hold the model is refused before any pod exists: by
`moeserve operator render` (a message naming the numbers) and by the operator (a Degraded
condition naming them, no children); a spec that fits reports its plan in MemoryFits."""

from __future__ import annotations

import asyncio
import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from moeserve.operator.cli import main

REPO = Path(__file__).resolve().parents[2]
API = "moeserve.io/v1alpha1"
NODE = REPO / "examples/deepseek-v3-8xh200.yaml"


def v3_on(gpu_memory_gib: float | None = None, product: str | None = None) -> dict[str, Any]:
    doc = yaml.safe_load(NODE.read_text())
    doc["metadata"]["namespace"] = "default"
    pool = doc["spec"]["decode"]
    if gpu_memory_gib is not None:
        pool["gpuMemoryGiB"] = gpu_memory_gib
    if product is not None:
        pool["nodeSelector"] = {"nvidia.com/gpu.product": product}
    return doc


def run_cli(tmp_path: Path, doc: dict[str, Any], command: str, capsys) -> tuple[int, str, str]:
    path = tmp_path / "manifest.yaml"
    path.write_text(yaml.safe_dump(doc))
    rc = main(["operator", command, "-f", str(path)])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_render_refuses_v3_on_80gb_gpus_naming_the_numbers(tmp_path: Path, capsys) -> None:
    rc, out, err = run_cli(tmp_path, v3_on(product="NVIDIA-H100-80GB-HBM3"), "render", capsys)
    assert rc == 2 and out == ""
    assert "MoEDeployment does not fit its GPUs" in err
    # 0.9 x 81559 MiB - 1 GiB runtime = 70.68 GiB for weights and KV; weights need 95.07
    assert ("spec.decode: does not fit its GPUs: weights 95.07 GiB per GPU > 70.68 GiB usable "
            "(0.9 of 79.65 GiB less 1.00 GiB runtime)") in err
    assert "spec.prefill" not in err  # the H200 pool fits


def test_render_and_plan_accept_v3_on_h200(tmp_path: Path, capsys) -> None:
    rc, out, err = run_cli(tmp_path, v3_on(), "render", capsys)
    assert rc == 0 and "kind: StatefulSet" in out, err
    rc, out, _ = run_cli(tmp_path, v3_on(), "plan", capsys)
    assert rc == 0 and "| **KV cache per rank (GPU)** | **30.29 GiB** (32.5 GB)" in out
    rc, out, _ = run_cli(tmp_path, v3_on(gpu_memory_gib=80), "plan", capsys)
    assert rc == 2 and "NO: weights 95.07 GiB per GPU > " in out


def test_unknown_gpu_or_model_is_not_refused_but_said(tmp_path: Path, capsys) -> None:
    doc = v3_on()
    del doc["spec"]["decode"]["nodeSelector"]
    rc, out, _ = run_cli(tmp_path, doc, "plan", capsys)
    assert rc == 0
    assert "- decode: no plan, the GPU's memory is unknown: set spec.decode.gpuMemoryGiB" in out


def test_bad_engine_flags_are_named(tmp_path: Path, capsys) -> None:
    doc = v3_on()
    doc["spec"]["decode"]["extraArgs"] = ["--gpu-memory-utilization", "lots"]
    rc, _, err = run_cli(tmp_path, doc, "render", capsys)
    assert rc == 2
    assert "spec.decode.extraArgs: argument --gpu-memory-utilization: invalid float value" in err
    doc["spec"]["decode"]["extraArgs"] = ["--gpu-memory-utilization=1.5"]
    rc, _, err = run_cli(tmp_path, doc, "render", capsys)
    assert rc == 2 and "spec.decode.extraArgs: gpu-memory-utilization must be in (0, 1]" in err


def condition(body: dict[str, Any] | None, kind: str) -> dict[str, Any]:
    for cond in ((body or {}).get("status") or {}).get("conditions") or ():
        if cond["type"] == kind:
            return cond
    return {}


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_operator_refuses_before_any_pod_then_applies_once_it_fits(cluster_factory) -> None:
    def children(cluster: Any) -> set[str]:
        return {o["metadata"]["name"] for o in cluster.objects("apps/v1", "StatefulSet")}

    async def scenario() -> None:
        async with cluster_factory() as cluster:
            await cluster.create(copy.deepcopy(v3_on(gpu_memory_gib=80)))
            dep = await cluster.wait_for("Degraded", lambda: (lambda d: d if condition(
                d, "Degraded").get("status") == "True" else None)(
                cluster.get(API, "MoEDeployment", "deepseek-v3-node")))
            degraded = condition(dep, "Degraded")
            assert degraded["reason"] == "InsufficientGPUMemory"
            assert "spec.decode: does not fit its GPUs: weights 95.07 GiB per GPU > " \
                   "71.00 GiB usable (0.9 of 80.00 GiB" in degraded["message"]
            await asyncio.sleep(1.5)  # past one resync: still nothing was created
            assert children(cluster) == set()

            await cluster.patch(API, "MoEDeployment", "default", "deepseek-v3-node",
                                {"spec": {"decode": {"gpuMemoryGiB": 140}}})
            await cluster.wait_for("workers after the fix", lambda: {
                "deepseek-v3-node-decode-0", "deepseek-v3-node-prefill-0"} <= children(cluster))
            dep = await cluster.wait_for("MemoryFits", lambda: (lambda d: d if condition(
                d, "MemoryFits").get("status") == "True" else None)(
                cluster.get(API, "MoEDeployment", "deepseek-v3-node")))
            fits = condition(dep, "MemoryFits")["message"]
            assert "decode: weights 95.07 GiB per GPU" in fits and "KV cache" in fits
            assert condition(dep, "Degraded")["status"] == "False"

    asyncio.run(scenario())
