"""The fused MoE with fp8 weights and activations (W8A8, DeepSeek's block scales): the
grouped GEMM kernel, its launches, the argument check and the dequantization its reference
uses. `fused_moe.fused_moe` comes here when given scales."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moeserve.kernels.fp8_gemm import FP8_MAX, per_token_group_quant
from moeserve.kernels.moe_align import moe_align_block_size, moe_combine
from moeserve.kernels.moe_config import MoeConfig, check_moe_shapes, moe_config_fp8

__all__ = ["fused_moe_fp8", "fused_moe_fp8_kernel", "check_fp8_moe_args",
           "dequantize_block_fp8", "group_dequant", "EPS"]

# per_token_group_quant's floor on a group's scale: all-zero groups do not divide by zero.
EPS = 1e-10


@triton.jit
def fused_moe_fp8_kernel(
    a_ptr, a_s_ptr, w_ptr, w_s_ptr, out_ptr, out_s_ptr, sorted_ids_ptr, block_expert_ptr,
    num_copies, n_out, k_in, eps,
    stride_am, stride_asm, stride_we, stride_wn, stride_wse, stride_wsn, stride_om, stride_osm,
    A_ROWS_PER_COPY_DIV: tl.constexpr, SILU_MUL: tl.constexpr, QUANT_OUT: tl.constexpr,
    W_BLOCK_N: tl.constexpr, FP8_MAX_C: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """`fused_moe_kernel` on fp8 operands: a [rows, K] e4m3 with a_s [rows, K / BLOCK_K]
    (per row and K group), w [E, N, K] e4m3 with w_s [E, N / W_BLOCK_N, K / BLOCK_K].

    Each K step is one fp8 tensor-core dot rescaled by a_s[row, kb] * w_s[e, n // bn, kb]
    (per column: the up rows start at n_out, which need not be a multiple of bn).
    QUANT_OUT (BLOCK_N is the activation group): the tile of each row is one group, so the
    epilogue quantizes it to e4m3 and writes its scale to out_s[copy, pid_n], sparing the next
    GEMM a separate quantization launch and h a round trip in 16 bits.
    """
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    expert = tl.load(block_expert_ptr + pid_m)
    if expert < 0:
        return
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    copy = tl.load(sorted_ids_ptr + offs_m)
    row_ok = copy < num_copies
    a_row = copy // A_ROWS_PER_COPY_DIV
    a_rows = a_ptr + a_row.to(tl.int64) * stride_am
    a_s_rows = a_s_ptr + a_row.to(tl.int64) * stride_asm
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < n_out
    offs_k = tl.arange(0, BLOCK_K)
    w_cols = w_ptr + expert.to(tl.int64) * stride_we + offs_n[None, :] * stride_wn
    w_s_base = w_s_ptr + expert.to(tl.int64) * stride_wse
    w_s_gate = w_s_base + (offs_n // W_BLOCK_N) * stride_wsn
    w_s_up = w_s_base + ((offs_n + n_out) // W_BLOCK_N) * stride_wsn
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    acc_up = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, k_in, BLOCK_K):
        kb = k0 // BLOCK_K
        k_ok = (k0 + offs_k) < k_in
        a = tl.load(a_rows[:, None] + (k0 + offs_k)[None, :],
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        a_s = tl.load(a_s_rows + kb, mask=row_ok, other=0.0)
        w_k = (k0 + offs_k)[:, None]
        w_mask = k_ok[:, None] & n_ok[None, :]
        w_s = tl.load(w_s_gate + kb, mask=n_ok, other=0.0)
        acc += tl.dot(a, tl.load(w_cols + w_k, mask=w_mask, other=0.0)) \
            * (a_s[:, None] * w_s[None, :])
        if SILU_MUL:
            up = tl.load(w_cols + n_out * stride_wn + w_k, mask=w_mask, other=0.0)
            up_s = tl.load(w_s_up + kb, mask=n_ok, other=0.0)
            acc_up += tl.dot(a, up) * (a_s[:, None] * up_s[None, :])
    if SILU_MUL:
        acc = acc * tl.sigmoid(acc) * acc_up
    out = out_ptr + copy.to(tl.int64)[:, None] * stride_om + offs_n[None, :]
    if QUANT_OUT:
        # Columns past n_out hold exact zeros (masked weights), so they leave the max alone.
        scale = tl.maximum(tl.max(tl.abs(acc), 1), eps) / FP8_MAX_C
        q = tl.clamp(acc / scale[:, None], -FP8_MAX_C, FP8_MAX_C)
        tl.store(out, q.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & n_ok[None, :])
        tl.store(out_s_ptr + copy.to(tl.int64) * stride_osm + pid_n, scale, mask=row_ok)
    else:
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & n_ok[None, :])


def check_fp8_moe_args(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
                       topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                       w13_scale: torch.Tensor, w2_scale: torch.Tensor,
                       block_shape: tuple[int, int]) -> None:
    """ValueError naming what does not fit the fp8 fused MoE's shapes and dtypes."""
    check_moe_shapes(x, w13, w2, topk_weights, topk_ids)
    hidden = x.shape[1]
    num_experts, two_inter, _ = w13.shape
    inter = two_inter // 2
    if w13.dtype != torch.float8_e4m3fn or w2.dtype != torch.float8_e4m3fn:
        raise ValueError(f"fp8 fused_moe takes float8_e4m3fn weights, got w13 {w13.dtype}, "
                         f"w2 {w2.dtype}")
    if not x.dtype.is_floating_point or x.element_size() < 2:
        raise ValueError(f"x must be bf16/fp16/fp32, got {x.dtype}")
    bn, bk = block_shape
    if bn <= 0 or bk <= 0 or bk & (bk - 1):
        raise ValueError(f"block_shape {tuple(block_shape)}: the K block must be a power of two")
    for name, scale, n, k in (("w13_scale", w13_scale, two_inter, hidden),
                              ("w2_scale", w2_scale, hidden, inter)):
        want = (num_experts, triton.cdiv(n, bn), triton.cdiv(k, bk))
        if tuple(scale.shape) != want or scale.dtype != torch.float32:
            raise ValueError(f"{name} is {tuple(scale.shape)} {scale.dtype}; blocks "
                             f"{tuple(block_shape)} of [{num_experts}, {n}, {k}] need {want} "
                             "float32")
        if scale.stride(-1) != 1:
            raise ValueError(f"{name} needs a contiguous last dim")
    if x.stride(-1) != 1 or w13.stride(-1) != 1 or w2.stride(-1) != 1:
        raise ValueError("x, w13 and w2 need a contiguous last dim")


def fused_moe_fp8(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
                  topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                  config: MoeConfig | None, num_shared: int, w13_scale: torch.Tensor,
                  w2_scale: torch.Tensor, block_shape: tuple[int, int]) -> torch.Tensor:
    """`fused_moe.fused_moe` with fp8 weights and activations (W8A8, block scales); same
    launches plus one activation quantization, still no host synchronisation."""
    check_fp8_moe_args(x, w13, w2, topk_weights, topk_ids, w13_scale, w2_scale, block_shape)
    num_tokens, hidden = x.shape
    num_experts, two_inter, _ = w13.shape
    inter = two_inter // 2
    bn, bk = block_shape
    top_k = topk_ids.shape[1]
    num_copies = num_tokens * top_k
    cfg = config or moe_config_fp8(num_copies, num_experts, bk)
    if cfg.block_k != bk:
        raise ValueError(f"fp8 tiles need BLOCK_K = the K block {bk}, got {cfg.block_k}")
    sorted_ids, block_expert = moe_align_block_size(topk_ids, cfg.block_m, num_experts,
                                                    num_shared=num_shared)
    num_m_blocks = block_expert.shape[0]
    x_q, x_s = per_token_group_quant(x, bk)  # once per token, read by all its copies
    gate_n = cfg.gate_n()
    quant_out = gate_n == bk
    launch = {"BLOCK_M": cfg.block_m, "BLOCK_K": bk, "W_BLOCK_N": bn, "FP8_MAX_C": FP8_MAX,
              "num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
    groups = triton.cdiv(inter, bk)
    if quant_out:
        h = torch.empty(num_copies, inter, dtype=torch.float8_e4m3fn, device=x.device)
        h_s = torch.empty(num_copies, groups, dtype=torch.float32, device=x.device)
    else:  # float32 h, quantized by a separate launch (the same numbers as the fused epilogue)
        h = torch.empty(num_copies, inter, dtype=torch.float32, device=x.device)
        h_s = h
    fused_moe_fp8_kernel[(num_m_blocks, triton.cdiv(inter, gate_n))](
        x_q, x_s, w13, w13_scale, h, h_s, sorted_ids, block_expert, num_copies, inter, hidden,
        EPS, x_q.stride(0), x_s.stride(0), w13.stride(0), w13.stride(1), w13_scale.stride(0),
        w13_scale.stride(1), h.stride(0), h_s.stride(0),
        A_ROWS_PER_COPY_DIV=top_k, SILU_MUL=True, QUANT_OUT=quant_out, BLOCK_N=gate_n, **launch,
    )
    if not quant_out:
        h, h_s = per_token_group_quant(h, bk, EPS)
    y = x.new_empty(num_copies, hidden)
    fused_moe_fp8_kernel[(num_m_blocks, triton.cdiv(hidden, cfg.block_n))](
        h, h_s, w2, w2_scale, y, y, sorted_ids, block_expert, num_copies, hidden, inter,
        EPS, h.stride(0), h_s.stride(0), w2.stride(0), w2.stride(1), w2_scale.stride(0),
        w2_scale.stride(1), y.stride(0), 0,
        A_ROWS_PER_COPY_DIV=1, SILU_MUL=False, QUANT_OUT=False, BLOCK_N=cfg.block_n, **launch,
    )
    return moe_combine(y, topk_weights, topk_ids, torch.empty_like(x))


def dequantize_block_fp8(w: torch.Tensor, scale: torch.Tensor,
                         block_shape: tuple[int, int] = (128, 128)) -> torch.Tensor:
    """[..., N, K] e4m3 times its [..., ceil(N / bn), ceil(K / bk)] block scales, float32."""
    bn, bk = block_shape
    n, k = w.shape[-2:]
    s = scale.float().repeat_interleave(bn, -2)[..., :n, :]
    return w.float() * s.repeat_interleave(bk, -1)[..., :k]


def group_dequant(q: torch.Tensor, scales: torch.Tensor, group: int) -> torch.Tensor:
    """[rows, K] quantized values times their [rows, ceil(K / group)] scales, float32."""
    return q.float() * scales.repeat_interleave(group, 1)[:, :q.shape[1]]
