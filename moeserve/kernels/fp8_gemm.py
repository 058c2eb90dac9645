"""Block-quantized fp8 GEMM as DeepSeek's fp8 checkpoints need it.

Weights are float8_e4m3fn [N, K] with one float32 `weight_scale_inv` per 128x128 block
(dequantized w = w_fp8 * scale). Activations are quantized on the fly per token and group of
128 channels (`per_token_group_quant`), so every BLOCK_K = 128 step of the GEMM multiplies two
fp8 tiles on the tensor cores and rescales the float32 partial sum by a_scale[m] * w_scale[n].
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = [
    "CUBLAS_MIN_ROWS", "cublas_blockwise", "cublas_gemm", "fp8_gemm", "triton_fp8_gemm",
    "fp8_gemm_ref", "w8a8_block_fp8_matmul", "w8a8_block_fp8_matmul_kernel",
    "per_token_group_quant", "per_token_group_quant_kernel", "per_token_group_quant_ref",
]

FP8_MAX = 448.0  # largest finite float8_e4m3fn


@triton.jit
def per_token_group_quant_kernel(
    x_ptr, q_ptr, s_ptr, k_in, groups_per_row, eps,
    stride_xm, stride_qm, stride_sm, stride_sg,
    GROUP: tl.constexpr, FP8_MAX_C: tl.constexpr, GROUPS_PER_PROGRAM: tl.constexpr,
):
    """One row's GROUPS_PER_PROGRAM consecutive groups per program: a program per group moved
    128 values each and left the launch grid, not the bandwidth, the limit at prefill sizes."""
    row = tl.program_id(0).to(tl.int64)
    groups = tl.program_id(1) * GROUPS_PER_PROGRAM + tl.arange(0, GROUPS_PER_PROGRAM)
    offs = groups[:, None] * GROUP + tl.arange(0, GROUP)[None, :]
    ok = (offs < k_in) & (groups < groups_per_row)[:, None]
    x = tl.load(x_ptr + row * stride_xm + offs, mask=ok, other=0.0).to(tl.float32)
    # eps keeps all-zero groups from dividing by zero.
    scale = tl.maximum(tl.max(tl.abs(x), 1), eps) / FP8_MAX_C
    q = tl.clamp(x / scale[:, None], -FP8_MAX_C, FP8_MAX_C)
    tl.store(q_ptr + row * stride_qm + offs, q.to(q_ptr.dtype.element_ty), mask=ok)
    tl.store(s_ptr + row * stride_sm + groups * stride_sg, scale, mask=groups < groups_per_row)


def per_token_group_quant(
    x: torch.Tensor, group_size: int = 128, eps: float = 1e-10, mn_major: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """x: [M, K] bf16/fp16/fp32 (last dim contiguous) -> (x_q [M, K] float8_e4m3fn,
    scales [M, ceil(K / group_size)] float32) with x ~= x_q * scales per group.
    mn_major: the scales laid out column by column (strides (1, M)), as cuBLAS's block-wise
    scaling reads them."""
    if x.dim() != 2 or x.stride(-1) != 1:
        raise ValueError(f"x must be [M, K] with a contiguous last dim, got {tuple(x.shape)}")
    if group_size & (group_size - 1):
        raise ValueError(f"group_size must be a power of two, got {group_size}")
    m, k = x.shape
    groups = triton.cdiv(k, group_size)
    x_q = torch.empty(m, k, dtype=torch.float8_e4m3fn, device=x.device)
    if mn_major:
        scales = torch.empty(groups, m, dtype=torch.float32, device=x.device).t()
    else:
        scales = torch.empty(m, groups, dtype=torch.float32, device=x.device)
    if m:
        per_program = max(1, min(triton.next_power_of_2(groups), 2048 // group_size))
        per_token_group_quant_kernel[(m, triton.cdiv(groups, per_program))](
            x, x_q, scales, k, groups, eps, x.stride(0), x_q.stride(0), scales.stride(0),
            scales.stride(1), GROUP=group_size, FP8_MAX_C=FP8_MAX, GROUPS_PER_PROGRAM=per_program,
            num_warps=4,
        )
    return x_q, scales


def per_token_group_quant_ref(
    x: torch.Tensor, group_size: int = 128, eps: float = 1e-10
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain-torch `per_token_group_quant`."""
    m, k = x.shape
    groups = -(-k // group_size)
    pad = torch.zeros(m, groups * group_size, dtype=torch.float32, device=x.device)
    pad[:, :k] = x.float()
    tiles = pad.view(m, groups, group_size)
    scales = tiles.abs().amax(-1).clamp_min(eps) / FP8_MAX
    q = (tiles / scales[..., None]).clamp(-FP8_MAX, FP8_MAX).view(m, -1)[:, :k]
    return q.to(torch.float8_e4m3fn), scales


@triton.jit
def w8a8_block_fp8_matmul_kernel(
    a_ptr, a_s_ptr, w_ptr, w_s_ptr, c_ptr, m_rows, n_out, k_in,
    stride_am, stride_asm, stride_wn, stride_wsn, stride_cm, k_per_split, stride_split,
    W_BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr = 1, EVEN_K: tl.constexpr = False,
    WARP_SPEC: tl.constexpr = False,
):
    """c[m, n] = sum_k a[m, k] a_s[m, k // BK] w[n, k] w_s[n // W_BLOCK_N, k // BK].

    Split K (the grid's second axis): program z sums K in [z * k_per_split, (z + 1) *
    k_per_split) into c + z * stride_split (float32 partials the caller adds up). The first
    axis numbers the output tiles; GROUP_M > 1 orders them in bands of GROUP_M row tiles so a
    wave of programs re-reads A and W from L2 rather than HBM (at prefill sizes A alone outgrows
    L2). EVEN_K: every split's K is a whole number of BLOCK_K steps (no K masks)."""
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    tiles_m = tl.cdiv(m_rows, BLOCK_M)
    tiles_n = tl.cdiv(n_out, BLOCK_N)
    if GROUP_M > 1:
        band = GROUP_M * tiles_n
        first_m = (pid // band) * GROUP_M
        rows_in_band = tl.minimum(tiles_m - first_m, GROUP_M)
        pid_m = first_m + (pid % band) % rows_in_band
        pid_n = (pid % band) // rows_in_band
    else:
        pid_m = pid % tiles_m
        pid_n = pid // tiles_m
    c_ptr += pid_k.to(tl.int64) * stride_split
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_ok = offs_m < m_rows
    n_ok = offs_n < n_out
    a_rows = a_ptr + offs_m.to(tl.int64)[:, None] * stride_am
    w_cols = w_ptr + offs_n.to(tl.int64)[None, :] * stride_wn
    a_s_rows = a_s_ptr + offs_m * stride_asm
    w_s_rows = w_s_ptr + (offs_n // W_BLOCK_N) * stride_wsn
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    k_end = tl.minimum(k_in, (pid_k + 1) * k_per_split)
    for k0 in tl.range(pid_k * k_per_split, k_end, BLOCK_K, warp_specialize=WARP_SPEC):
        if EVEN_K:
            a = tl.load(a_rows + (k0 + offs_k)[None, :], mask=m_ok[:, None], other=0.0)
            w = tl.load(w_cols + (k0 + offs_k)[:, None], mask=n_ok[None, :], other=0.0)
        else:
            k_ok = (k0 + offs_k) < k_end
            a = tl.load(a_rows + (k0 + offs_k)[None, :], mask=m_ok[:, None] & k_ok[None, :],
                        other=0.0)
            w = tl.load(w_cols + (k0 + offs_k)[:, None], mask=k_ok[:, None] & n_ok[None, :],
                        other=0.0)
        a_s = tl.load(a_s_rows + k0 // BLOCK_K, mask=m_ok, other=0.0)
        w_s = tl.load(w_s_rows + k0 // BLOCK_K, mask=n_ok, other=0.0)
        acc += tl.dot(a, w) * a_s[:, None] * w_s[None, :]
    c = c_ptr + offs_m.to(tl.int64)[:, None] * stride_cm + offs_n[None, :]
    tl.store(c, acc.to(c_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


def _tiles(m: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) for H100: decode-sized M is weight-bandwidth
    bound, so narrow N tiles spread the weight over more SMs; large M takes 128-wide tiles."""
    if m <= 16:
        return 16, 64, 4, 4
    if m <= 64:
        return 64, 64, 4, 4
    return 64, 128, 4, 3


def w8a8_block_fp8_matmul(
    a_q: torch.Tensor,
    a_scales: torch.Tensor,
    weight: torch.Tensor,
    weight_scale_inv: torch.Tensor,
    out_dtype: torch.dtype = torch.bfloat16,
    block_size: tuple[int, int] = (128, 128),
    tiles: tuple[int, int, int, int] | None = None,
    split_k: int | None = None,
    group_m: int = 1,
    warp_spec: bool = False,
) -> torch.Tensor:
    """a_q: [M, K] float8_e4m3fn; a_scales: [M, ceil(K / bk)] float32; weight: [N, K]
    float8_e4m3fn; weight_scale_inv: [ceil(N / bn), ceil(K / bk)] float32, with
    (bn, bk) = block_size (the checkpoint's `weight_block_size`; bk a power of two).
    tiles: (BLOCK_M, BLOCK_N, num_warps, num_stages) in place of `_tiles`; split_k: K splits
    in place of `_split_k` (benchmarks; 1 = none). Split launches add float32 partials.
    group_m: row tiles per band of the launch order; warp_spec: Triton's warp-specialized K
    loop (both for benchmarks: neither gained on the H200, see tune_fp8_gemm.py).
    Returns a @ weight^T, dequantized, [M, N] in out_dtype."""
    m, k = a_q.shape
    n, w_k = weight.shape
    block_n, block_k = block_size
    sn, sk = triton.cdiv(n, block_n), triton.cdiv(k, block_k)
    if w_k != k or a_scales.shape != (m, sk) or weight_scale_inv.shape != (sn, sk):
        raise ValueError(f"a_q {tuple(a_q.shape)}, a_scales {tuple(a_scales.shape)}, weight "
                         f"{tuple(weight.shape)}, scales {tuple(weight_scale_inv.shape)} do not "
                         f"fit blocks {block_size}")
    if block_k & (block_k - 1):
        raise ValueError(f"the K block must be a power of two, got {block_k}")
    if a_q.stride(-1) != 1 or weight.stride(-1) != 1 or weight_scale_inv.stride(-1) != 1:
        raise ValueError("a_q, weight and weight_scale_inv need a contiguous last dim")
    bm, bn, warps, stages = tiles or _tiles(m)
    programs = triton.cdiv(m, bm) * triton.cdiv(n, bn)
    if split_k is None:  # measured a gain at M <= 16 only (64 rows: q_a + kv_a 40 -> 62 us)
        split_k = _split_k(programs, sk) if m <= 16 else 1
    splits = split_k
    k_per_split = triton.cdiv(sk, splits) * block_k
    splits = triton.cdiv(k, k_per_split)
    if splits > 1:
        out = torch.empty(splits, m, n, dtype=torch.float32, device=a_q.device)
    else:
        out = torch.empty(m, n, dtype=out_dtype, device=a_q.device)
    w8a8_block_fp8_matmul_kernel[(programs, splits)](
        a_q, a_scales, weight, weight_scale_inv, out, m, n, k,
        a_q.stride(0), a_scales.stride(0), weight.stride(0), weight_scale_inv.stride(0),
        out.stride(-2), k_per_split, out.stride(0) if splits > 1 else 0,
        W_BLOCK_N=block_n, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=block_k,
        GROUP_M=group_m, EVEN_K=k % block_k == 0,
        WARP_SPEC=warp_spec, num_warps=warps, num_stages=stages,
    )
    return out.sum(0).to(out_dtype) if splits > 1 else out


# Programs below which a GEMM's K is split: two waves of the H200's 132 SMs. Decode-sized GEMMs
# with few output tiles (V3's q_a + kv_a_proj_with_mqa at batch 1: 33 programs of 56 K steps)
# otherwise stream their weight through a quarter of the SMs (benchmarks/fp8_roofline.py
# --gemm-sweep, H200, batch 1: q_a + kv_a 40 -> 28 us, o_proj 64 -> 49, V3's dense 74 -> 48).
SPLIT_K_MIN_PROGRAMS = 264


def _split_k(programs: int, k_blocks: int) -> int:
    """K splits for a launch of `programs` output tiles over `k_blocks` K steps: enough for
    SPLIT_K_MIN_PROGRAMS programs, each keeping at least 4 K steps."""
    if programs >= SPLIT_K_MIN_PROGRAMS:
        return 1
    return max(1, min(triton.cdiv(SPLIT_K_MIN_PROGRAMS, programs), k_blocks // 4, 16))


# Rows from which cuBLAS's block-wise fp8 GEMM (torch._scaled_mm with 1x128 / 128x128 scales)
# takes over from the Triton kernel. H200, V3's shapes (benchmarks/tune_fp8_gemm.py): at 8192
# rows 1.1-1.3k TFLOP/s against 0.6k, at 256 rows ~1.0k against 0.57k; at 64 rows within
# +-15% either way; cuBLAS refuses a single row.
CUBLAS_MIN_ROWS = 128
_cublas_ok: dict[int, bool] = {}


def cublas_blockwise(x: torch.Tensor, weight: torch.Tensor, weight_scale_inv: torch.Tensor,
                     block_size: tuple[int, int]) -> bool:
    """True when `fp8_gemm` runs this GEMM through cuBLAS's block-wise scaled matmul: a CUDA
    device where torch has it (probed once, never inside a graph capture), 128x128 blocks, K a
    whole number of blocks, at least CUBLAS_MIN_ROWS rows, and weight scales whose rows start
    16-byte aligned. With K = 384 (rows of 3 scales, 12 bytes) cuBLAS read the scales wrongly
    without an error (torch 2.11 + CUDA 13, H200); V3's K / 128 are 12, 56, 128 and 144."""
    if (not x.is_cuda or tuple(block_size) != (128, 128) or x.shape[0] < CUBLAS_MIN_ROWS
            or x.shape[1] % 128 or weight.shape[0] % 16 or weight_scale_inv.stride(1) != 1
            or weight_scale_inv.stride(0) % 4):
        return False
    device = x.device.index if x.device.index is not None else torch.cuda.current_device()
    if device not in _cublas_ok:
        if torch.cuda.is_current_stream_capturing():
            return False
        _cublas_ok[device] = _probe_cublas(x.device)
    return _cublas_ok[device]


def _probe_cublas(device: torch.device) -> bool:
    a = torch.ones(128, 256, device=device).to(torch.float8_e4m3fn)
    a_s = torch.ones(2, 128, device=device).t()
    w_s = torch.ones(1, 2, device=device)
    try:
        out = torch._scaled_mm(a, a.t(), scale_a=a_s, scale_b=w_s.t(), out_dtype=torch.bfloat16)
    except (RuntimeError, TypeError):  # torch or cuBLAS without block-wise scaling
        return False
    return bool((out.float() == 256).all())


def cublas_gemm(x: torch.Tensor, weight: torch.Tensor, weight_scale_inv: torch.Tensor,
                 out_dtype: torch.dtype) -> torch.Tensor:
    m = x.shape[0]
    pad = -m % 4  # the scales' column stride is M floats: TMA wants it 16-byte aligned
    if pad:
        x = torch.nn.functional.pad(x, (0, 0, 0, pad))
    a_q, a_s = per_token_group_quant(x, 128, mn_major=True)
    out = torch._scaled_mm(a_q, weight.t(), scale_a=a_s, scale_b=weight_scale_inv.t(),
                           out_dtype=out_dtype)
    return out[:m] if pad else out


def fp8_gemm(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale_inv: torch.Tensor,
    out_dtype: torch.dtype = torch.bfloat16,
    block_size: tuple[int, int] = (128, 128),
) -> torch.Tensor:
    """x [M, K] bf16/fp16/fp32 @ dequantized weight^T -> [M, N] in out_dtype.

    weight: [N, K] float8_e4m3fn; weight_scale_inv: [ceil(N / bn), ceil(K / bk)] float32 with
    (bn, bk) = block_size; activations are quantized per token and group of bk channels.
    cuBLAS's block-wise GEMM where `cublas_blockwise` allows, else the Triton kernel.
    """
    if cublas_blockwise(x, weight, weight_scale_inv, block_size):
        return cublas_gemm(x, weight, weight_scale_inv, out_dtype)
    return triton_fp8_gemm(x, weight, weight_scale_inv, out_dtype, block_size)


def triton_fp8_gemm(x: torch.Tensor, weight: torch.Tensor, weight_scale_inv: torch.Tensor,
                    out_dtype: torch.dtype = torch.bfloat16,
                    block_size: tuple[int, int] = (128, 128)) -> torch.Tensor:
    """`fp8_gemm` on the Triton kernel whatever the shape."""
    a_q, a_scales = per_token_group_quant(x, block_size[1])
    return w8a8_block_fp8_matmul(a_q, a_scales, weight, weight_scale_inv, out_dtype,
                                 block_size)


def fp8_gemm_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale_inv: torch.Tensor,
    out_dtype: torch.dtype = torch.bfloat16,
    block_size: tuple[int, int] = (128, 128),
) -> torch.Tensor:
    """Plain-torch `fp8_gemm`: quantize-dequantize x per group, dequantize the weight, matmul
    in float32. Same arguments and result."""
    n, k = weight.shape
    block_n, block_k = block_size
    x_q, x_s = per_token_group_quant_ref(x, block_k)
    x_deq = x_q.float() * x_s.repeat_interleave(block_k, 1)[:, :k]
    w_s = weight_scale_inv.float().repeat_interleave(block_n, 0)[:n]
    w_deq = weight.float() * w_s.repeat_interleave(block_k, 1)[:, :k]
    return (x_deq @ w_deq.T).to(out_dtype)
