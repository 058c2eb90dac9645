"""Pick the implementation of each kernel op at call time and record which one ran.

Order: an optional vendor library where one exists for the op and is importable (FlashInfer
for MLA attention, DeepGEMM for the fp8 GEMM), else Triton on CUDA tensors (or on CPU tensors
under TRITON_INTERPRET=1), else the plain-torch reference. Optional libraries are imported on
first use, never when this module is imported; a failed import is remembered with its reason
(`optional_library_status`). A vendor call that raises falls back to Triton, logs a warning
once per op and records the fallback, so a serving step never dies on an optional library.
"""

from __future__ import annotations

import importlib
import logging
import os
from dataclasses import dataclass
from types import ModuleType

import torch

from moeserve.kernels import fp8_gemm as _fp8
from moeserve.kernels import fused_moe as _moe
from moeserve.kernels import mla_decode as _decode
from moeserve.kernels import mla_prefill as _prefill
from moeserve.kernels import mla_prefill_mha as _mha

__all__ = [
    "BackendChoice", "select_backend", "last_path", "optional_library_status",
    "mla_decode", "mla_prefill", "mla_prefill_mha", "mla_prefill_mha_packed", "fused_moe",
    "fp8_gemm", "OPS",
]

log = logging.getLogger(__name__)

OPS = ("mla_decode", "mla_prefill", "fused_moe", "fp8_gemm")
# fused_moe takes DeepGEMM for fp8 weights only; bf16 always runs Triton.
_VENDOR = {"mla_decode": "flashinfer", "mla_prefill": "flashinfer", "fp8_gemm": "deep_gemm",
           "fused_moe": "deep_gemm"}


@dataclass(frozen=True)
class BackendChoice:
    """name: "flashinfer" | "deep_gemm" | "triton" | "torch"; reason: why, for logs."""

    name: str
    reason: str


class _Registry:
    """Import results of optional libraries and the path each op last took (per process)."""

    def __init__(self) -> None:
        self.modules: dict[str, ModuleType | None] = {}
        self.import_errors: dict[str, str] = {}
        self.last: dict[str, str] = {}
        self.warned: set[str] = set()
        # FlashInfer's planner carves its buffers out of one workspace per device.
        self.workspaces: dict[torch.device, torch.Tensor] = {}

    def library(self, name: str) -> ModuleType | None:
        if name not in self.modules:
            try:
                self.modules[name] = importlib.import_module(name)
            except Exception as exc:  # ImportError, or a broken CUDA extension inside it
                self.modules[name] = None
                self.import_errors[name] = f"{type(exc).__name__}: {exc}"
                log.info("optional kernel library %s unavailable (%s)", name,
                         self.import_errors[name])
        return self.modules[name]


_REGISTRY = _Registry()


def optional_library_status() -> dict[str, str]:
    """{library: "available" | "absent: <import error>"} for the libraries tried so far."""
    return {name: "available" if mod is not None else f"absent: {_REGISTRY.import_errors[name]}"
            for name, mod in _REGISTRY.modules.items()}


def select_backend(op: str, device: torch.device | str, allow_vendor: bool = True
                   ) -> BackendChoice:
    """The backend `op` would run on tensors of `device` (imports optional libraries lazily)."""
    if op not in OPS:
        raise ValueError(f"unknown kernel op {op!r}; known: {OPS}")
    device = torch.device(device)
    vendor = _VENDOR.get(op)
    if device.type == "cuda":
        if vendor and allow_vendor:
            if _REGISTRY.library(vendor) is not None:
                return BackendChoice(vendor, f"{vendor} importable")
            return BackendChoice("triton", f"{vendor} absent "
                                 f"({_REGISTRY.import_errors[vendor]})")
        return BackendChoice("triton", "CUDA tensors")
    if os.environ.get("TRITON_INTERPRET") == "1":
        return BackendChoice("triton", "TRITON_INTERPRET=1 on CPU tensors")
    return BackendChoice("torch", f"{device.type} tensors: plain-torch reference")


def last_path(op: str) -> str | None:
    """The backend name the last call of `op` in this process actually ran, None before one."""
    return _REGISTRY.last.get(op)


def _choose(op: str, device: torch.device, backend: str | None) -> str:
    if backend is None:
        return select_backend(op, device).name
    if backend not in ("flashinfer", "deep_gemm", "triton", "torch"):
        raise ValueError(f"unknown backend {backend!r}")
    return backend


def _vendor_failed(op: str, exc: Exception) -> None:
    if op not in _REGISTRY.warned:
        _REGISTRY.warned.add(op)
        log.warning("%s: %s call failed (%s: %s); using Triton", op, _VENDOR[op],
                    type(exc).__name__, exc)


def mla_decode(q: torch.Tensor, layer_cache: torch.Tensor, block_tables: torch.Tensor,
               seq_lens: torch.Tensor, scale: float, kv_lora_rank: int,
               backend: str | None = None, q_pe: torch.Tensor | None = None) -> torch.Tensor:
    """`moeserve.kernels.mla_decode.mla_decode` (shapes there) on the selected backend."""
    name = _choose("mla_decode", q.device, backend)
    if name == "flashinfer":
        try:
            qo_indptr = torch.arange(q.shape[0] + 1, dtype=torch.int32, device=q.device)
            out = _flashinfer_mla(q, layer_cache, block_tables, seq_lens, qo_indptr, False,
                                  scale, kv_lora_rank, q_pe)
            _REGISTRY.last["mla_decode"] = name
            return out
        except Exception as exc:
            _vendor_failed("mla_decode", exc)
            name = "triton"
    if name == "torch":
        out = _decode.mla_decode_ref(q if q_pe is None else torch.cat([q, q_pe], -1),
                                     layer_cache, block_tables, seq_lens, scale, kv_lora_rank)
    else:
        out = _decode.mla_decode(q, layer_cache, block_tables, seq_lens, scale, kv_lora_rank,
                                 q_pe=q_pe)
    _REGISTRY.last["mla_decode"] = name
    return out


def mla_prefill(q: torch.Tensor, layer_cache: torch.Tensor, block_tables: torch.Tensor,
                seq_lens: torch.Tensor, query_start_loc: torch.Tensor, max_query_len: int,
                scale: float, kv_lora_rank: int, backend: str | None = None,
                q_pe: torch.Tensor | None = None) -> torch.Tensor:
    """`moeserve.kernels.mla_prefill.mla_prefill` (shapes there) on the selected backend."""
    name = _choose("mla_prefill", q.device, backend)
    if name != "triton" and q_pe is not None:  # they take the joint query
        q, q_pe = torch.cat([q, q_pe], dim=-1), None
    if name == "flashinfer":
        try:
            out = _flashinfer_mla(q, layer_cache, block_tables, seq_lens,
                                  query_start_loc.to(torch.int32), True, scale, kv_lora_rank)
            _REGISTRY.last["mla_prefill"] = name
            return out
        except Exception as exc:
            _vendor_failed("mla_prefill", exc)
            name = "triton"
    if name == "torch":
        out = _prefill.mla_prefill_ref(q, layer_cache, block_tables, seq_lens, query_start_loc,
                                       max_query_len, scale, kv_lora_rank)
    else:
        out = _prefill.mla_prefill(q, layer_cache, block_tables, seq_lens, query_start_loc,
                                   max_query_len, scale, kv_lora_rank, q_pe=q_pe)
    _REGISTRY.last["mla_prefill"] = name
    return out


def mla_prefill_mha(query: torch.Tensor, latents: torch.Tensor, kv_b_weight: torch.Tensor,
                    scale: float, kv_lora_rank: int, v_head_dim: int) -> torch.Tensor:
    """`moeserve.kernels.mla_prefill_mha.mla_prefill_mha`: torch SDPA (flash attention on
    CUDA); recorded as the "sdpa_mha" path of mla_prefill."""
    out = _mha.mla_prefill_mha(query, latents, kv_b_weight, scale, kv_lora_rank, v_head_dim)
    _REGISTRY.last["mla_prefill"] = "sdpa_mha"
    return out


def mla_prefill_mha_packed(query: torch.Tensor, latents: torch.Tensor,
                           kv_b_weight: torch.Tensor, scale: float, kv_lora_rank: int,
                           v_head_dim: int, bounds: list[tuple[int, int]],
                           out: torch.Tensor | None = None) -> torch.Tensor:
    """`moeserve.kernels.mla_prefill_mha.mla_prefill_mha_packed`, recorded as "sdpa_mha"."""
    out = _mha.mla_prefill_mha_packed(query, latents, kv_b_weight, scale, kv_lora_rank,
                                      v_head_dim, bounds, out)
    _REGISTRY.last["mla_prefill"] = "sdpa_mha"
    return out


def fused_moe(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
              topk_ids: torch.Tensor, backend: str | None = None, num_shared: int = 0,
              w13_scale: torch.Tensor | None = None, w2_scale: torch.Tensor | None = None,
              block_shape: tuple[int, int] = (128, 128)) -> torch.Tensor:
    """`moeserve.kernels.fused_moe.fused_moe` (shapes there) on the selected backend; with
    w13_scale / w2_scale the weights are fp8 (W8A8, block scales of block_shape).

    fp8 runs DeepGEMM's grouped GEMMs where it is installed (masked layout for decode
    batches, contiguous for prefill), Triton if that call raises; bf16 never takes DeepGEMM.
    """
    name = _choose("fused_moe", x.device, backend)
    fp8 = {} if w13_scale is None and w2_scale is None else {
        "w13_scale": w13_scale, "w2_scale": w2_scale, "block_shape": tuple(block_shape)}
    if name in ("deep_gemm", "flashinfer") and not fp8:
        name = "triton"
    if name == "deep_gemm":
        try:
            out = _deep_gemm_moe(x, w13, w2, topk_weights, topk_ids, num_shared, w13_scale,
                                 w2_scale, tuple(block_shape))
            _REGISTRY.last["fused_moe"] = name
            return out
        except Exception as exc:
            _vendor_failed("fused_moe", exc)
            name = "triton"
    if name == "torch":
        out = _moe.fused_moe_ref(x, w13, w2, topk_weights, topk_ids, **fp8)
    else:
        out = _moe.fused_moe(x, w13, w2, topk_weights, topk_ids, num_shared=num_shared, **fp8)
    _REGISTRY.last["fused_moe"] = "torch" if name == "torch" else "triton"
    return out


def _deep_gemm_moe(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
                   topk_weights: torch.Tensor, topk_ids: torch.Tensor, num_shared: int,
                   w13_scale: torch.Tensor | None, w2_scale: torch.Tensor | None,
                   block_shape: tuple[int, int]) -> torch.Tensor:
    from moeserve.kernels.fused_moe_deep_gemm import deep_gemm_fused_moe

    deep_gemm = _REGISTRY.library("deep_gemm")
    if deep_gemm is None:
        raise ImportError(_REGISTRY.import_errors["deep_gemm"])
    if w13_scale is None or w2_scale is None:
        raise ValueError("DeepGEMM's fused MoE needs both w13_scale and w2_scale")
    return deep_gemm_fused_moe(deep_gemm, x, w13, w2, topk_weights, topk_ids, num_shared,
                               w13_scale, w2_scale, block_shape)


def fp8_gemm(x: torch.Tensor, weight: torch.Tensor, weight_scale_inv: torch.Tensor,
             out_dtype: torch.dtype = torch.bfloat16, block_size: tuple[int, int] = (128, 128),
             backend: str | None = None) -> torch.Tensor:
    """`moeserve.kernels.fp8_gemm.fp8_gemm` (shapes there) on the selected backend."""
    name = _choose("fp8_gemm", x.device, backend)
    if name == "deep_gemm":
        try:
            out = _deep_gemm_fp8(x, weight, weight_scale_inv, out_dtype, block_size)
            _REGISTRY.last["fp8_gemm"] = name
            return out
        except Exception as exc:
            _vendor_failed("fp8_gemm", exc)
            name = "triton"
    if name == "triton" and _fp8.cublas_blockwise(x, weight, weight_scale_inv, block_size):
        name = "cublas"  # large-M GEMMs: cuBLAS's block-wise kernel (see _fp8.fp8_gemm)
        out = _fp8.cublas_gemm(x, weight, weight_scale_inv, out_dtype)
    else:
        w8a8 = _fp8.fp8_gemm_ref if name == "torch" else _fp8.triton_fp8_gemm
        out = w8a8(x, weight, weight_scale_inv, out_dtype, block_size)
    _REGISTRY.last["fp8_gemm"] = name
    return out


def _flashinfer_mla(q: torch.Tensor, layer_cache: torch.Tensor, block_tables: torch.Tensor,
                    seq_lens: torch.Tensor, qo_indptr: torch.Tensor, causal: bool, scale: float,
                    kv_lora_rank: int, q_pe: torch.Tensor | None = None) -> torch.Tensor:
    """FlashInfer's BatchMLAPagedAttentionWrapper, planned per call.

    plan() reads the indptrs on the host, so this path syncs and cannot be captured in a CUDA
    graph; an engine using it should plan once per step and reuse the wrapper across layers.
    """
    flashinfer = _REGISTRY.library("flashinfer")
    assert flashinfer is not None
    block_size = layer_cache.shape[1]
    pages = (seq_lens.long() + block_size - 1) // block_size
    used = torch.arange(block_tables.shape[1], device=q.device)[None, :] < pages[:, None]
    kv_indices = block_tables[used].to(torch.int32)
    kv_indptr = torch.zeros(seq_lens.shape[0] + 1, dtype=torch.int32, device=q.device)
    kv_indptr[1:] = pages.cumsum(0)
    workspace = _REGISTRY.workspaces.get(q.device)
    if workspace is None:
        workspace = torch.empty(128 << 20, dtype=torch.int8, device=q.device)
        _REGISTRY.workspaces[q.device] = workspace
    wrapper = flashinfer.mla.BatchMLAPagedAttentionWrapper(workspace)
    if q_pe is None:
        q, q_pe = q[..., :kv_lora_rank], q[..., kv_lora_rank:]
    rope = q_pe.shape[-1]
    wrapper.plan(qo_indptr, kv_indptr, kv_indices, seq_lens.to(torch.int32), q.shape[1],
                 kv_lora_rank, rope, block_size, causal, scale, q.dtype, layer_cache.dtype)
    return wrapper.run(q, q_pe, layer_cache[..., :kv_lora_rank],
                       layer_cache[..., kv_lora_rank:])


def _deep_gemm_fp8(x: torch.Tensor, weight: torch.Tensor, weight_scale_inv: torch.Tensor,
                   out_dtype: torch.dtype, block_size: tuple[int, int]) -> torch.Tensor:
    """DeepGEMM's 1x128-by-128x128 fp8 GEMM (bf16 out only), activations quantized by Triton."""
    deep_gemm = _REGISTRY.library("deep_gemm")
    assert deep_gemm is not None
    if out_dtype != torch.bfloat16 or tuple(block_size) != (128, 128):
        raise ValueError("DeepGEMM takes 128x128 weight blocks and bf16 output only")
    a_q, a_s = _fp8.per_token_group_quant(x, 128)
    out = torch.empty(x.shape[0], weight.shape[0], dtype=torch.bfloat16, device=x.device)
    if hasattr(deep_gemm, "fp8_gemm_nt"):  # DeepGEMM >= 2.0 lays out the scales itself
        deep_gemm.fp8_gemm_nt((a_q, a_s), (weight, weight_scale_inv), out)
    else:  # 1.x wants activation scales column-major and TMA-aligned
        a_s = deep_gemm.get_col_major_tma_aligned_tensor(a_s)
        deep_gemm.gemm_fp8_fp8_bf16_nt((a_q, a_s), (weight, weight_scale_inv), out)
    return out
