"""The fp8 fused MoE on DeepGEMM's grouped GEMMs (used by `dispatch.fused_moe` when installed).

DeepGEMM multiplies fp8 rows grouped by expert against [E, N, K] e4m3 weights with 128x128
block scales, bf16 out. Two layouts:
- contiguous (prefill): the copies sorted by expert into runs padded to 128 rows (our own
  alignment with BLOCK_M = 128), `m_indices` naming each row's expert (-1: padding);
- masked (decode): [E, m_max, K] per-expert slabs with `masked_m[e]` rows in use; m_max is the
  token count (the most one expert can get), so no count is read back and a decode step stays
  capturable in a CUDA graph.
Between the GEMMs silu(gate) * up is quantized per copy and 128-channel group with our Triton
kernel, and the weighted combine is ours too. Both the 2.x names (m_grouped_fp8_gemm_nt_*) and
the 1.x ones (m_grouped_gemm_fp8_fp8_bf16_nt_*) are accepted.
"""

from __future__ import annotations

from types import ModuleType

import torch
import torch.nn.functional as F
import triton

from moeserve.kernels.fp8_gemm import per_token_group_quant
from moeserve.kernels.fused_moe_fp8 import check_fp8_moe_args
from moeserve.kernels.moe_align import moe_align_block_size, moe_combine

__all__ = ["deep_gemm_fused_moe", "MASKED_MAX_TOKENS"]

# Decode batches up to here take the masked layout: its slabs hold E * T rows per GEMM.
MASKED_MAX_TOKENS = 256


def _grouped_gemms(deep_gemm: ModuleType):
    """(contiguous, masked, is_v1) entry points of the installed DeepGEMM."""
    if hasattr(deep_gemm, "m_grouped_fp8_gemm_nt_contiguous"):
        return (deep_gemm.m_grouped_fp8_gemm_nt_contiguous,
                deep_gemm.m_grouped_fp8_gemm_nt_masked, False)
    if hasattr(deep_gemm, "m_grouped_gemm_fp8_fp8_bf16_nt_contiguous"):
        return (deep_gemm.m_grouped_gemm_fp8_fp8_bf16_nt_contiguous,
                deep_gemm.m_grouped_gemm_fp8_fp8_bf16_nt_masked, True)
    raise RuntimeError(f"deep_gemm {getattr(deep_gemm, '__version__', '?')} has no m-grouped "
                       "fp8 GEMM")


def _silu_mul_quant(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    inter = h.shape[-1] // 2
    act = F.silu(h[:, :inter].float()) * h[:, inter:].float()
    return per_token_group_quant(act, 128)


def deep_gemm_fused_moe(deep_gemm: ModuleType, x: torch.Tensor, w13: torch.Tensor,
                        w2: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                        num_shared: int, w13_scale: torch.Tensor, w2_scale: torch.Tensor,
                        block_shape: tuple[int, int]) -> torch.Tensor:
    """`fused_moe.fused_moe`'s fp8 path (same arguments) on DeepGEMM; raises where DeepGEMM
    cannot take the inputs (the dispatcher then runs Triton)."""
    if tuple(block_shape) != (128, 128):
        raise ValueError("DeepGEMM takes 128x128 weight blocks only")
    check_fp8_moe_args(x, w13, w2, topk_weights, topk_ids, w13_scale, w2_scale, block_shape)
    contiguous, masked, is_v1 = _grouped_gemms(deep_gemm)
    x_q, x_s = per_token_group_quant(x.contiguous(), 128)
    if x.shape[0] <= MASKED_MAX_TOKENS:
        y = _masked(masked, x_q, x_s, w13, w2, topk_ids, w13_scale, w2_scale)
    else:
        y = _contiguous(deep_gemm, contiguous, is_v1, x_q, x_s, w13, w2, topk_ids, num_shared,
                        w13_scale, w2_scale)
    return moe_combine(y, topk_weights, topk_ids, torch.empty_like(x))


def _contiguous(deep_gemm: ModuleType, gemm, is_v1: bool, x_q: torch.Tensor,
                x_s: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
                topk_ids: torch.Tensor, num_shared: int, w13_scale: torch.Tensor,
                w2_scale: torch.Tensor) -> torch.Tensor:
    """Copies sorted into 128-row expert runs; returns y [copies, H] bf16 in copy order."""
    num_experts, hidden = w13.shape[0], w13.shape[2]
    num_copies = topk_ids.numel()
    align = int(getattr(deep_gemm, "get_m_alignment_for_contiguous_layout", lambda: 128)())
    sorted_ids, block_expert = moe_align_block_size(topk_ids, align, num_experts,
                                                    num_shared=num_shared)
    m_indices = block_expert.repeat_interleave(align)
    if is_v1:  # 1.x has no "skip" group: unused blocks multiply expert 0's weights, unread
        m_indices = m_indices.clamp_min(0)
    used = sorted_ids < num_copies
    token = torch.where(used, sorted_ids // topk_ids.shape[1], 0)
    a = x_q.view(torch.uint8)[token].view(torch.float8_e4m3fn)
    h = torch.empty(token.shape[0], w13.shape[1], dtype=torch.bfloat16, device=x_q.device)
    gemm((a, x_s[token]), (w13, w13_scale), h, m_indices)
    h_q, h_s = _silu_mul_quant(h)
    y_sorted = torch.empty(token.shape[0], hidden, dtype=torch.bfloat16, device=x_q.device)
    gemm((h_q, h_s), (w2, w2_scale), y_sorted, m_indices)
    # Padding rows all land on one spare row past the copies.
    y = torch.empty(num_copies + 1, hidden, dtype=torch.bfloat16, device=x_q.device)
    y[torch.where(used, sorted_ids, num_copies).long()] = y_sorted
    return y[:num_copies]


def _masked(gemm, x_q: torch.Tensor, x_s: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
            topk_ids: torch.Tensor, w13_scale: torch.Tensor, w2_scale: torch.Tensor
            ) -> torch.Tensor:  # fmt: skip
    """Copies placed in per-expert slabs [E, m_max, K]; returns y [copies, H] bf16 in copy
    order (rows of remote copies are garbage: the combine skips id -1)."""
    num_experts, two_inter, hidden = w13.shape
    num_tokens, top_k = topk_ids.shape
    num_copies = num_tokens * top_k
    device = x_q.device
    # DeepGEMM wants m_max a multiple of its BLOCK_M once it exceeds one block.
    m_max = triton.cdiv(num_tokens, 64) * 64 if num_tokens <= 64 else \
        triton.cdiv(num_tokens, 128) * 128
    flat = topk_ids.reshape(-1).long()
    onehot = (flat[:, None] == torch.arange(num_experts, device=device)).to(torch.int32)
    rank = (onehot.cumsum(0) - onehot).gather(1, flat.clamp_min(0)[:, None])[:, 0]
    masked_m = onehot.sum(0, dtype=torch.int32)
    slots = num_experts * m_max
    dest = torch.where(flat >= 0, flat * m_max + rank, slots)  # remote copies: a spare row
    expected_m = max(1, triton.cdiv(num_copies, num_experts))

    def scatter(q: torch.Tensor, s: torch.Tensor, rows: torch.Tensor | None):
        a = torch.zeros(slots + 1, q.shape[1], dtype=torch.uint8, device=device)
        a_s = torch.ones(slots + 1, s.shape[1], dtype=torch.float32, device=device)
        src = q.view(torch.uint8) if rows is None else q.view(torch.uint8)[rows]
        a[dest] = src
        a_s[dest] = s if rows is None else s[rows]
        return (a[:slots].view(torch.float8_e4m3fn).view(num_experts, m_max, -1),
                a_s[:slots].view(num_experts, m_max, -1))

    h = torch.empty(num_experts, m_max, two_inter, dtype=torch.bfloat16, device=device)
    gemm(scatter(x_q, x_s, torch.arange(num_copies, device=device) // top_k),
         (w13, w13_scale), h, masked_m, expected_m)
    gathered = dest.clamp_max(slots - 1)
    h_q, h_s = _silu_mul_quant(h.view(slots, two_inter)[gathered])
    y = torch.empty(num_experts, m_max, hidden, dtype=torch.bfloat16, device=device)
    gemm(scatter(h_q, h_s, None), (w2, w2_scale), y, masked_m, expected_m)
    return y.view(slots, hidden)[gathered]
