"""Triton kernels for MLA attention, MoE routing, fused MoE, block-fp8 GEMM, small fusions.

The package-level functions dispatch (FlashInfer / DeepGEMM when importable, else Triton on
CUDA, else the torch reference on CPU) and `last_path(op)` says which one ran. Each kernel
module also exposes its Triton wrapper and its plain-torch `*_ref` directly.
"""

from moeserve.kernels.dispatch import (
    BackendChoice,
    fp8_gemm,
    fused_moe,
    last_path,
    mla_decode,
    mla_prefill,
    mla_prefill_mha,
    mla_prefill_mha_packed,
    optional_library_status,
    select_backend,
)
from moeserve.kernels.moe_route import route_topk
from moeserve.kernels.rmsnorm import rmsnorm
from moeserve.kernels.rope_cache import rope_cache_write

__all__ = [
    "BackendChoice",
    "fp8_gemm",
    "fused_moe",
    "last_path",
    "mla_decode",
    "mla_prefill",
    "mla_prefill_mha",
    "mla_prefill_mha_packed",
    "optional_library_status",
    "rmsnorm",
    "rope_cache_write",
    "route_topk",
    "select_backend",
]
