"""Fused MoE: token copies sorted into per-expert blocks, two grouped GEMMs, weighted combine.

Three launches and no host synchronisation (so a decode step can be captured in a CUDA graph):
1. `moe_align.moe_align_block_size` lays the T*k token copies out expert by expert, each
   expert's run padded to a multiple of BLOCK_M, and names the expert of every BLOCK_M block.
2. `fused_moe_kernel` with SILU_MUL: h = silu(x W_gate^T) * (x W_up^T) for each copy, gate and
   up tiles of w13 multiplied in the same program so h is written once, never [T*k, 2I].
3. `fused_moe_kernel` again: y = h W_down^T; then `moe_align.moe_combine` sums each token's k
   copies with their routing weights in float32, skipping experts held elsewhere (id -1).
Tiles are chosen in `moe_config`; fp8 weights (W8A8) run `fused_moe_fp8`'s kernel instead.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from moeserve.kernels.fp8_gemm import per_token_group_quant_ref
from moeserve.kernels.fused_moe_fp8 import (
    EPS,
    check_fp8_moe_args,
    dequantize_block_fp8,
    fused_moe_fp8,
    group_dequant,
)
from moeserve.kernels.moe_align import moe_align_block_size, moe_combine
from moeserve.kernels.moe_config import MoeConfig, check_moe_shapes, fit_shared_memory, moe_config

__all__ = ["fused_moe", "fused_moe_ref", "fused_moe_kernel"]


@triton.jit
def fused_moe_kernel(
    a_ptr, w_ptr, out_ptr, sorted_ids_ptr, block_expert_ptr,
    num_copies, n_out, k_in,
    stride_am, stride_we, stride_wn, stride_wk, stride_om,
    A_ROWS_PER_COPY_DIV: tl.constexpr, SILU_MUL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """out[copy, n] = a[copy // DIV] . w[e, n] (SILU_MUL: silu(.w[e, n]) * (.w[e, n_out + n]))."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    expert = tl.load(block_expert_ptr + pid_m)
    if expert < 0:
        return
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    copy = tl.load(sorted_ids_ptr + offs_m)
    row_ok = copy < num_copies
    a_rows = a_ptr + (copy // A_ROWS_PER_COPY_DIV).to(tl.int64) * stride_am
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < n_out
    offs_k = tl.arange(0, BLOCK_K)
    w_base = w_ptr + expert.to(tl.int64) * stride_we
    w_cols = w_base + offs_n[None, :] * stride_wn
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    acc_up = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, k_in, BLOCK_K):
        k_ok = (k0 + offs_k) < k_in
        a = tl.load(a_rows[:, None] + (k0 + offs_k)[None, :],
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w_k = (k0 + offs_k)[:, None] * stride_wk
        w_mask = k_ok[:, None] & n_ok[None, :]
        acc += tl.dot(a, tl.load(w_cols + w_k, mask=w_mask, other=0.0))
        if SILU_MUL:
            up = tl.load(w_cols + n_out * stride_wn + w_k, mask=w_mask, other=0.0)
            acc_up += tl.dot(a, up)
    if SILU_MUL:
        acc = acc * tl.sigmoid(acc) * acc_up
    out = out_ptr + copy.to(tl.int64)[:, None] * stride_om + offs_n[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & n_ok[None, :])


def fused_moe(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    config: MoeConfig | None = None,
    num_shared: int = 0,
    w13_scale: torch.Tensor | None = None,
    w2_scale: torch.Tensor | None = None,
    block_shape: tuple[int, int] = (128, 128),
) -> torch.Tensor:
    """Experts of a DeepSeek MoE layer: routed ones, and shared ones stacked after them.

    x: [T, H] bf16/fp16/fp32. w13: [E, 2I, H] (gate rows, then up rows), x's dtype.
    w2: [E, H, I], x's dtype. topk_weights: [T, k] float32 (or any float).
    topk_ids: [T, k] int32/int64 local expert slots, -1 = expert not on this rank (skipped).
    config: tiles; default `moe_config` by rows per expert. num_shared: the last num_shared
    columns of topk_ids are the shared experts, the last num_shared slots, for every token
    (`moe.append_shared`), which the alignment lays out without sorting.
    w13_scale / w2_scale (fp8 path, W8A8): w13 and w2 are float8_e4m3fn and carry float32
    block scales [E, ceil(2I / bn), ceil(H / bk)] / [E, ceil(H / bn), ceil(I / bk)],
    (bn, bk) = block_shape, dequantized w[e, n, k] = w_fp8[e, n, k] * scale[e, n // bn,
    k // bk]; activations are quantized per token and group of bk channels (x once per token,
    h per copy), as DeepSeek's inference does. The config's block_k must be bk there.
    Returns [T, H] in x's dtype.
    """
    if (w13_scale is None) != (w2_scale is None):
        raise ValueError("fp8 fused_moe needs both w13_scale and w2_scale (or neither)")
    if w13_scale is not None:
        assert w2_scale is not None
        return fused_moe_fp8(x, w13, w2, topk_weights, topk_ids, config, num_shared,
                             w13_scale, w2_scale, block_shape)
    num_tokens, inter = check_moe_shapes(x, w13, w2, topk_weights, topk_ids)
    hidden, num_experts = x.shape[1], w13.shape[0]
    if not (x.dtype == w13.dtype == w2.dtype):
        raise ValueError(f"dtypes differ: x {x.dtype}, w13 {w13.dtype}, w2 {w2.dtype}")
    if x.stride(-1) != 1 or w13.stride(-1) != 1 or w2.stride(-1) != 1:
        raise ValueError("x, w13 and w2 need a contiguous last dim")
    top_k = topk_ids.shape[1]
    num_copies = num_tokens * top_k
    cfg = config or fit_shared_memory(moe_config(num_copies, num_experts), x.element_size())
    sorted_ids, block_expert = moe_align_block_size(topk_ids, cfg.block_m, num_experts,
                                                    num_shared=num_shared)
    num_m_blocks = block_expert.shape[0]
    launch = {"BLOCK_M": cfg.block_m, "BLOCK_K": cfg.block_k, "num_warps": cfg.num_warps,
              "num_stages": cfg.num_stages}
    # The gated launch holds two accumulators (gate and up): half-width N keeps registers even.
    gate_n = cfg.gate_n()
    h = x.new_empty(num_copies, inter)
    fused_moe_kernel[(num_m_blocks, triton.cdiv(inter, gate_n))](
        x, w13, h, sorted_ids, block_expert, num_copies, inter, hidden,
        x.stride(0), w13.stride(0), w13.stride(1), w13.stride(2), h.stride(0),
        A_ROWS_PER_COPY_DIV=top_k, SILU_MUL=True, BLOCK_N=gate_n, **launch,
    )
    y = x.new_empty(num_copies, hidden)
    fused_moe_kernel[(num_m_blocks, triton.cdiv(hidden, cfg.block_n))](
        h, w2, y, sorted_ids, block_expert, num_copies, hidden, inter,
        h.stride(0), w2.stride(0), w2.stride(1), w2.stride(2), y.stride(0),
        A_ROWS_PER_COPY_DIV=1, SILU_MUL=False, BLOCK_N=cfg.block_n, **launch,
    )
    return moe_combine(y, topk_weights, topk_ids, torch.empty_like(x))


def fused_moe_ref(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    num_shared: int = 0,
    w13_scale: torch.Tensor | None = None,
    w2_scale: torch.Tensor | None = None,
    block_shape: tuple[int, int] = (128, 128),
) -> torch.Tensor:
    """Plain-torch `fused_moe` (same arguments), expert by expert in float32.

    With scales (W8A8): x quantized-dequantized per token and bk group, each expert's weights
    dequantized by their blocks, h = silu(gate) * up in float32 quantized-dequantized per copy
    the same way before the down projection. num_shared changes only the kernel's layout.
    """
    del num_shared
    fp8 = w13_scale is not None or w2_scale is not None
    if fp8:
        if w13_scale is None or w2_scale is None:
            raise ValueError("fp8 fused_moe needs both w13_scale and w2_scale (or neither)")
        check_fp8_moe_args(x, w13, w2, topk_weights, topk_ids, w13_scale, w2_scale,
                           block_shape)
    bk = block_shape[1]
    inter = w13.shape[1] // 2
    xf = x.float()
    if fp8:
        x_q, x_s = per_token_group_quant_ref(x, bk, EPS)
        xf = group_dequant(x_q, x_s, bk)
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for e in range(w13.shape[0]):
        token, slot = (topk_ids == e).nonzero(as_tuple=True)
        if token.numel() == 0:
            continue
        if fp8:
            assert w13_scale is not None and w2_scale is not None
            w_up = dequantize_block_fp8(w13[e], w13_scale[e], block_shape)
            w_down = dequantize_block_fp8(w2[e], w2_scale[e], block_shape)
        else:
            w_up, w_down = w13[e].float(), w2[e].float()
        h = xf[token] @ w_up.T
        h = F.silu(h[:, :inter]) * h[:, inter:]
        if fp8:
            h = group_dequant(*per_token_group_quant_ref(h, bk, EPS), bk)
        y = h @ w_down.T
        out.index_add_(0, token, y * topk_weights[token, slot, None].float())
    return out.to(x.dtype)

