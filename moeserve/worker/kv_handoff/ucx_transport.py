"""Which UCX transport will carry the KV cache's bytes, set up before the NIXL agent starts.

A decode worker READs the prefill worker's KV blocks (``ucp_get``). For GPU memory on one node
that READ should be a CUDA IPC copy (``cuda_ipc``: NVLink, or the copy engines of a shared GPU);
UCX's default turns ``cuda_ipc`` GETs off when NVML finds no active NVLink (a single GPU, PCIe
cards), and the READ then falls back to active messages over TCP loopback staged through host
memory (``rma_am(tcp/lo)``: 0.5 GiB/s measured on one H200, against 1.4+ TB/s for a device copy).
So for VRAM we set ``UCX_CUDA_IPC_ENABLE_GET_ZCOPY=on`` unless the operator chose otherwise.
Across nodes the READ wants RDMA (``rc``/``dc`` on InfiniBand or RoCE, GPUDirect with
nvidia-peermem); without an RDMA device it is TCP.

UCX does not report its choice through NIXL's Python API, so the start-up line is derived from
what decides it: the memory type, ``UCX_TLS`` (and the GET switch), whether UCX's CUDA transport
module can load (it needs ``libcuda.so.1`` and ``libnvidia-ml.so.1``) and whether the host has
RDMA devices. ``UCX_PROTO_INFO=y`` makes UCX print the protocol it actually selected per
endpoint (e.g. ``rma_bw(cuda_ipc/cuda)``): benchmarks/nixl_bandwidth.py turns it on.
"""

from __future__ import annotations

import ctypes
import logging
import os
from collections.abc import Callable, MutableMapping
from dataclasses import dataclass, field

__all__ = ["UcxTransportPlan", "plan_ucx_transport", "setup_ucx_transport"]

logger = logging.getLogger(__name__)

GET_ZCOPY_ENV = "UCX_CUDA_IPC_ENABLE_GET_ZCOPY"
# UCX_TLS aliases (ucx_info -h: "sm", "shm", "cuda", "ib", "rocm"...), enough for what we check.
_ALIASES = {
    "cuda": {"cuda_copy", "cuda_ipc", "gdr_copy"},
    "sm": {"posix", "sysv", "cma", "knem", "xpmem"},
    "shm": {"posix", "sysv", "cma", "knem", "xpmem"},
    "mm": {"posix", "sysv", "xpmem"},
    "ib": {"rc_verbs", "rc_mlx5", "dc_mlx5", "ud_verbs", "ud_mlx5"},
    "rc": {"rc_verbs", "rc_mlx5"},
    "rc_x": {"rc_mlx5"},
    "dc": {"dc_mlx5"},
    "dc_x": {"dc_mlx5"},
    "ud": {"ud_verbs", "ud_mlx5"},
}
_RDMA = {"rc_verbs", "rc_mlx5", "dc_mlx5"}
_SHM = {"posix", "sysv", "cma", "xpmem", "knem"}


def _expand(names: set[str]) -> set[str]:
    out: set[str] = set()
    for name in names:
        out |= _ALIASES.get(name, {name})
    return out


def _tls_allows(tls: str) -> Callable[[set[str]], bool]:
    """A predicate: does ``UCX_TLS`` (empty: UCX's default, all; ``^a,b``: all but a and b)
    allow any of these transports?"""
    spec = tls.strip().lower()
    if spec in ("", "all"):
        return lambda tl: True
    exclude = spec.startswith("^")
    names = _expand({t.strip() for t in spec.lstrip("^").split(",") if t.strip()})
    if exclude:
        return lambda tl: not tl <= names
    return lambda tl: bool(tl & names)


def _can_load(lib: str) -> bool:
    try:
        ctypes.CDLL(lib)
    except OSError:
        return False
    return True


def _rdma_devices() -> list[str]:
    try:
        return sorted(os.listdir("/sys/class/infiniband"))
    except OSError:
        return []


@dataclass
class UcxTransportPlan:
    mem_type: str
    intra_node: str
    inter_node: str
    set_env: dict[str, str] = field(default_factory=dict)  # what we add to the environment
    warnings: list[str] = field(default_factory=list)
    tls: str = ""

    def describe(self) -> str:
        added = ", ".join(f"{k}={v}" for k, v in self.set_env.items()) or "none"
        return (f"NIXL/UCX transport for the KV cache ({self.mem_type}): within a node "
                f"{self.intra_node}; between nodes {self.inter_node} "
                f"(UCX_TLS={self.tls or 'all (UCX default)'}; set here: {added})")


def plan_ucx_transport(mem_type: str, environ: MutableMapping[str, str] | None = None, *,
                       cuda_module_loads: bool | None = None,
                       rdma_devices: list[str] | None = None) -> UcxTransportPlan:
    """What UCX will use for KV memory of ``mem_type`` ("VRAM" or "DRAM"), and the environment
    to add for it; pure apart from the probes, which tests pass in."""
    env = os.environ if environ is None else environ
    tls = env.get("UCX_TLS", "")
    allows = _tls_allows(tls)
    rdma = _rdma_devices() if rdma_devices is None else rdma_devices
    if rdma and allows(_RDMA):
        inter = f"RDMA ({', '.join(rdma[:4])})"
    else:
        inter = "TCP" + ("" if rdma else " (no RDMA device on this host)")
    plan = UcxTransportPlan(mem_type, "", inter, tls=tls)
    if mem_type != "VRAM":
        plan.intra_node = "shared memory" if allows(_SHM) else "TCP loopback"
        return plan
    if cuda_module_loads is None:
        cuda_module_loads = _can_load("libcuda.so.1") and _can_load("libnvidia-ml.so.1")
    if GET_ZCOPY_ENV not in env:
        plan.set_env[GET_ZCOPY_ENV] = "on"
    get_zcopy = plan.set_env.get(GET_ZCOPY_ENV) or env.get(GET_ZCOPY_ENV, "")
    if not cuda_module_loads:
        plan.intra_node = "TCP (UCX's CUDA transports cannot load)"
        plan.warnings.append(
            "UCX cannot load its CUDA transports (libcuda.so.1 or libnvidia-ml.so.1 missing): "
            "GPU KV would move over TCP through host memory, if at all")
    elif not allows({"cuda_ipc"}):
        plan.intra_node = "TCP staged through host memory (cuda_ipc not in UCX_TLS)"
        plan.warnings.append(f"UCX_TLS={tls} leaves out cuda_ipc: KV READs between GPUs of "
                             "one node go over TCP through host memory (~1000x slower)")
    elif get_zcopy.lower() in ("off", "n", "no", "0"):
        plan.intra_node = f"TCP staged through host memory ({GET_ZCOPY_ENV}={get_zcopy})"
        plan.warnings.append(f"{GET_ZCOPY_ENV}={get_zcopy}: cuda_ipc cannot serve READs, so "
                             "KV READs between GPUs of one node go over TCP")
    else:
        plan.intra_node = "cuda_ipc (GPU to GPU READ)"
        if not allows({"cuda_copy"}):
            plan.warnings.append(f"UCX_TLS={tls} leaves out cuda_copy, which UCX needs to "
                                 "detect GPU memory")
    if "expandable_segments:true" in env.get("PYTORCH_CUDA_ALLOC_CONF", "").lower().replace(
            " ", ""):
        # The KV cache then lives in cuMemCreate (VMM) memory, which CUDA's legacy IPC handles
        # (cudaIpcGetMemHandle) cannot export.
        plan.warnings.append("PYTORCH_CUDA_ALLOC_CONF has expandable_segments:True: the KV "
                             "cache is VMM memory, which cuda_ipc may not export; if READs "
                             "fall back to TCP, start the worker without it")
    if inter.startswith("TCP"):
        plan.warnings.append(f"KV READs from a prefill worker on another node go over {inter}: "
                             "fine for one node, slow across nodes")
    return plan


def setup_ucx_transport(mem_type: str,
                        environ: MutableMapping[str, str] | None = None) -> UcxTransportPlan:
    """Plan, add the environment UCX reads when the NIXL agent starts, and log the choice
    (warnings loud: VRAM over TCP costs 1000x in hand-off time)."""
    env = os.environ if environ is None else environ
    plan = plan_ucx_transport(mem_type, env)
    env.update(plan.set_env)
    logger.info("%s", plan.describe())
    for warning in plan.warnings:
        logger.warning("KV TRANSFER OVER TCP: %s", warning)
    return plan
