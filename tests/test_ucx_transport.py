"""The UCX transport plan for the KV cache (worker/kv_handoff/ucx_transport.py)."""

from __future__ import annotations

import logging

from moeserve.worker.kv_handoff.ucx_transport import (
    GET_ZCOPY_ENV,
    plan_ucx_transport,
    setup_ucx_transport,
)


def _plan(mem: str = "VRAM", env: dict | None = None, cuda: bool = True, rdma=("mlx5_0",)):
    return plan_ucx_transport(mem, dict(env or {}), cuda_module_loads=cuda,
                              rdma_devices=list(rdma))


def test_vram_defaults_to_cuda_ipc_reads_and_rdma_across_nodes() -> None:
    plan = _plan()
    assert plan.set_env == {GET_ZCOPY_ENV: "on"}  # UCX's auto turns GETs off without NVLink
    assert plan.intra_node.startswith("cuda_ipc") and plan.inter_node.startswith("RDMA")
    assert plan.warnings == []
    assert "cuda_ipc" in plan.describe() and "UCX_TLS=all" in plan.describe()


def test_operator_settings_win_and_tcp_for_vram_is_named() -> None:
    for env, why in [({"UCX_TLS": "tcp,cuda_copy"}, "leaves out cuda_ipc"),
                     ({"UCX_TLS": "^cuda_ipc"}, "leaves out cuda_ipc"),
                     ({GET_ZCOPY_ENV: "off"}, "cannot serve READs")]:
        plan = _plan(env=env)
        assert plan.intra_node.startswith("TCP"), env
        assert any(why in w for w in plan.warnings), (env, plan.warnings)
        assert GET_ZCOPY_ENV not in plan.set_env or GET_ZCOPY_ENV not in env
    assert _plan(env={"UCX_TLS": "cuda,sm,rc"}).warnings == []  # aliases cover both


def test_missing_cuda_module_or_rdma_is_warned() -> None:
    assert any("cannot load its CUDA" in w for w in _plan(cuda=False).warnings)
    plan = _plan(rdma=())
    assert plan.inter_node.startswith("TCP") and any("another node" in w for w in plan.warnings)
    assert _plan(env={"UCX_TLS": "cuda_ipc,cuda_copy,tcp"}).inter_node.startswith("TCP")


def test_vmm_allocations_are_warned() -> None:
    env = {"PYTORCH_CUDA_ALLOC_CONF": "max_split_size_mb:512,expandable_segments:True"}
    assert any("VMM memory" in w for w in _plan(env=env).warnings)
    assert _plan(env={"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:False"}).warnings == []


def test_host_memory_needs_nothing_and_is_not_warned() -> None:
    plan = _plan("DRAM", rdma=())
    assert plan.set_env == {} and plan.warnings == []
    assert plan.intra_node == "shared memory"


def test_setup_adds_the_environment_and_logs(caplog) -> None:
    env: dict[str, str] = {}
    with caplog.at_level(logging.INFO):
        plan = setup_ucx_transport("VRAM", env)
    assert plan.set_env[GET_ZCOPY_ENV] == "on" and env[GET_ZCOPY_ENV] == "on"
    assert "NIXL/UCX transport for the KV cache (VRAM)" in caplog.text
