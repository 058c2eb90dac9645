"""Fused MoE: token copies sorted into per-expert blocks, two grouped GEMMs, weighted combine.

Three launches and no host synchronisation (so a decode step can be captured in a CUDA graph):
1. `moe_align_block_size` (one single-program Triton launch) lays the T*k token copies out
   expert by expert, each expert's run padded to a multiple of BLOCK_M, and names the expert
   of every BLOCK_M block; buffers are sized for the worst case instead of reading the counts
   back. (The same in torch ops, `moe_align_block_size_ref`, is a dozen launches and a radix
   sort: 50-70 us of a decode step's MoE layer on the H100.)
2. `fused_moe_kernel` with SILU_MUL: h = silu(x W_gate^T) * (x W_up^T) for each copy, gate and
   up tiles of w13 multiplied in the same program so h is written once, never [T*k, 2I].
3. `fused_moe_kernel` again: y = h W_down^T; then `moe_combine_kernel` sums each token's k
   copies with their routing weights in float32, skipping experts held elsewhere (id -1).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from moeserve.kernels.fp8_gemm import FP8_MAX, per_token_group_quant, per_token_group_quant_ref

__all__ = [
    "fused_moe", "fused_moe_ref", "fused_moe_kernel", "moe_combine_kernel",
    "moe_align_block_size", "moe_align_block_size_chunked", "moe_align_block_size_ref",
    "moe_align_kernel", "MoeConfig",
    "moe_config", "fit_shared_memory", "fused_moe_fp8_kernel", "moe_config_fp8",
    "dequantize_block_fp8",
]


@dataclass(frozen=True)
class MoeConfig:
    """Tile sizes of one grouped GEMM launch (BLOCK_N is per projection: gate and up each)."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    # N tile of the gated (gate + up) launch; None: block_n // 2 (two accumulators)
    gate_block_n: int | None = None

    def gate_n(self) -> int:
        return self.gate_block_n or max(32, self.block_n // 2)


def moe_config(num_copies: int, num_experts: int) -> MoeConfig:
    """Tiles for H100 (benchmarks/tune_fused_moe.py, V2-Lite sizes, replayed from graphs).

    Decode is weight-bandwidth bound: what matters is that each expert's weights are read
    once, i.e. that one BLOCK_M covers the tokens an expert gets. Routing is often skewed (the
    random V2-Lite checkpoint sends batch 128 to 14 of 64 experts, ~55 tokens each), so from a
    few hundred copies on 64-row tiles are used: 0.116 ms at batch 128 with skewed routing
    against 0.164 ms for 16-row tiles, and within 2% of the best with uniform routing. Large M
    (prefill) is compute bound: 128-wide tiles for tensor-core reuse.
    """
    rows = num_copies / max(num_experts, 1)
    if num_copies < 384:
        return MoeConfig(16, 64, 128, 4, 4)
    if rows <= 64:
        return MoeConfig(64, 128, 128, 4, 4)
    # 1k tokens 0.62 ms with these against 0.65 with 64-row tiles; 8k tokens 2.08 ms (409
    # TFLOP/s) against 2.53.
    if rows <= 256:
        return MoeConfig(128, 128, 64, 8, 3)
    return MoeConfig(128, 256, 64, 8, 4)



def moe_config_fp8(num_copies: int, num_experts: int, block_k: int = 128) -> MoeConfig:
    """Tiles of the fp8 path (H200, V3 sizes, benchmarks/tune_fused_moe.py --fp8).

    BLOCK_K is the checkpoint's K block (one scale per step). A gated N tile equal to the
    activation group lets the first GEMM quantize h in its epilogue; below a few hundred
    copies a 64-wide one (more programs for 9 experts' weights, h quantized by a separate
    launch) is faster: batch 1 0.129 ms against 0.142 (floor 0.095). Batch 64 / 256: 2.48 /
    3.09 ms, 1.04x / 1.14x the fp8 weight-read floor. The gated launch keeps four [BLOCK_M,
    N] float32 tiles live (two accumulators, two scaled dot results), so 128 x 128 tiles
    spill at 8 warps: 8k tokens take 34 ms with them, 14.8 ms with 64 x 256 (437 TFLOP/s).
    """
    rows = num_copies / max(num_experts, 1)
    if rows <= 32:
        gate_n = 64 if num_copies < 384 else block_k
        return MoeConfig(16, 64, block_k, 4, 4, gate_block_n=gate_n)
    return MoeConfig(64, 256, block_k, 8, 3, gate_block_n=block_k)


# Hopper has 227 KiB of shared memory a block; Triton's pipeline needs a little beside the tiles.
SHARED_MEMORY_BUDGET = 200 * 1024


def fit_shared_memory(cfg: MoeConfig, elem_size: int,
                      budget: int = SHARED_MEMORY_BUDGET) -> MoeConfig:
    """The tiles (tuned for bf16) shrunk until a launch's pipelined tiles fit ``budget``.

    Each stage holds an activation tile [BLOCK_M, BLOCK_K] and weight tiles [BLOCK_K, BLOCK_N]
    (the gated launch splits BLOCK_N between gate and up). float32 weights (the parity tests,
    CPU-made checkpoints) need twice the bytes: fewer stages first, then a shorter BLOCK_K.
    """

    def need(c: MoeConfig) -> int:
        return (c.block_m * c.block_k + c.block_k * c.block_n) * elem_size * c.num_stages

    while need(cfg) > budget and cfg.num_stages > 2:
        cfg = dataclasses.replace(cfg, num_stages=cfg.num_stages - 1)
    while need(cfg) > budget and cfg.block_k > 32:
        cfg = dataclasses.replace(cfg, block_k=cfg.block_k // 2)
    return cfg


def padded_rows(num_copies: int, num_experts: int, block_m: int) -> int:
    """Rows of the aligned layout: every expert's run padded to BLOCK_M, the most any routing
    can need (sized without reading the counts back, so it is graph-safe).

    An expert with c copies takes c // BLOCK_M full blocks plus at most one partial one, and
    at most min(E, copies) experts get copies: a bound far below E * BLOCK_M rows for a small
    batch (batch 1, 8 copies, 16-row blocks: 8 blocks instead of 63, so the GEMM launches do
    not start 55 blocks' worth of programs that find no expert and exit).
    """
    loose = triton.cdiv(num_copies + num_experts * (block_m - 1), block_m)
    tight = num_copies // block_m + min(num_experts, num_copies)
    return min(loose, tight) * block_m


def moe_align_block_size_ref(
    topk_ids: torch.Tensor, block_m: int, num_experts: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sort token copies by expert into BLOCK_M-padded runs (torch ops; reference).

    topk_ids: [T, k] int, local expert slot per copy, -1 where the expert is not on this rank.
    Returns (sorted_ids [P] int32: copy index t*k+j per row, T*k for padding rows;
    block_expert [P // block_m] int32: expert of each block, -1 for unused blocks), with
    P = T*k + E*(block_m - 1) rounded up to block_m, the most any routing can need.
    """
    num_copies = topk_ids.numel()
    device = topk_ids.device
    flat = topk_ids.flatten().long()
    key = torch.where(flat >= 0, flat, num_experts)  # copies held elsewhere sort last
    counts = torch.zeros(num_experts + 1, dtype=torch.int64, device=device)
    counts.scatter_add_(0, key, torch.ones_like(key))
    padded = (counts + block_m - 1) // block_m * block_m
    # Slice fills, not `t[i] = v`: an indexed store copies a CPU scalar, which CUDA-graph
    # capture rejects.
    padded[num_experts:].zero_()
    padded_end = padded.cumsum(0)
    total = padded_rows(num_copies, num_experts, block_m)
    # Copies of key E go to rows >= total, then get cut off.
    padded_start = torch.cat([padded_end.new_zeros(1), padded_end[:-1]])
    padded_start[num_experts:].fill_(total)
    start = counts.cumsum(0) - counts
    order = torch.argsort(key, stable=True)
    sorted_key = key[order]
    dest = padded_start[sorted_key] + torch.arange(num_copies, device=device) - start[sorted_key]
    sorted_ids = torch.full((total + num_copies,), num_copies, dtype=torch.int32, device=device)
    sorted_ids[dest] = order.to(torch.int32)
    block_starts = torch.arange(0, total, block_m, device=device)
    block_expert = torch.searchsorted(padded_end[:num_experts], block_starts, right=True)
    block_expert = torch.where(block_expert < num_experts, block_expert, -1).to(torch.int32)
    return sorted_ids[:total], block_expert


@triton.jit
def moe_align_kernel(
    ids_ptr, sorted_ids_ptr, block_expert_ptr, num_copies, num_experts, total,
    BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr, CHUNK: tl.constexpr, TOP_K: tl.constexpr,
    NUM_SHARED: tl.constexpr,
):
    """One program: count copies per expert, lay out padded runs, place copies in copy order.

    Within a chunk a copy's rank among its expert's copies is an exclusive cumsum over a
    [CHUNK, BLOCK_E] one-hot, so the layout is deterministic (stable by copy index) and needs
    no atomics. Copies held on other ranks (id -1) match no column and are dropped. The last
    NUM_SHARED of each token's TOP_K copies are its shared experts (the last NUM_SHARED ids,
    every token): their runs are laid out in closed form after the routed ones, outside the
    one-hot, whose width is then the routed experts' alone.
    """
    routed = num_experts - NUM_SHARED
    offs_e = tl.arange(0, BLOCK_E)
    local = offs_e < routed
    counts = tl.zeros([BLOCK_E], tl.int32)
    for start in range(0, num_copies, CHUNK):
        offs = start + tl.arange(0, CHUNK)
        ok = (offs < num_copies) & (offs % TOP_K < TOP_K - NUM_SHARED)
        ids = tl.load(ids_ptr + offs, mask=ok, other=-1).to(tl.int32)
        counts += tl.sum((ids[:, None] == offs_e[None, :]).to(tl.int32), axis=0)
    padded = tl.where(local, (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M, 0)
    padded_end = tl.cumsum(padded, axis=0)
    padded_start = padded_end - padded
    routed_rows = tl.sum(padded, axis=0)
    num_tokens = num_copies // TOP_K
    shared_rows = (num_tokens + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    num_blocks = total // BLOCK_M
    for b0 in range(0, num_blocks, CHUNK):
        blocks = b0 + tl.arange(0, CHUNK)
        row = blocks * BLOCK_M
        ended = (padded_end[None, :] <= row[:, None]) & local[None, :]
        expert = tl.sum(ended.to(tl.int32), axis=1)
        if NUM_SHARED > 0:
            shared = (row - routed_rows) // tl.maximum(shared_rows, 1)
            expert = tl.where(row < routed_rows, expert, routed + shared)
        tl.store(block_expert_ptr + blocks, tl.where(expert < num_experts, expert, -1),
                 mask=blocks < num_blocks)
    for r0 in range(0, total, CHUNK):
        rows = r0 + tl.arange(0, CHUNK)
        tl.store(sorted_ids_ptr + rows, tl.zeros([CHUNK], tl.int32) + num_copies,
                 mask=rows < total)
    tl.debug_barrier()  # the padding fill above lands before the placements below
    placed = tl.zeros([BLOCK_E], tl.int32)
    for start in range(0, num_copies, CHUNK):
        offs = start + tl.arange(0, CHUNK)
        ok = (offs < num_copies) & (offs % TOP_K < TOP_K - NUM_SHARED)
        ids = tl.load(ids_ptr + offs, mask=ok, other=-1).to(tl.int32)
        onehot = (ids[:, None] == offs_e[None, :]).to(tl.int32)
        rank = tl.cumsum(onehot, axis=0) - onehot
        dest = tl.sum((padded_start + placed)[None, :] * onehot + rank * onehot, axis=1)
        tl.store(sorted_ids_ptr + dest, offs, mask=ok & (ids >= 0) & (ids < routed))
        placed += tl.sum(onehot, axis=0)
    for s in tl.static_range(NUM_SHARED):
        for t0 in range(0, num_tokens, CHUNK):
            tok = t0 + tl.arange(0, CHUNK)
            tl.store(sorted_ids_ptr + routed_rows + s * shared_rows + tok,
                     tok * TOP_K + (TOP_K - NUM_SHARED + s), mask=tok < num_tokens)


# One program walks all copies: right for a decode step (4-56 us on the H100 up to 3k copies,
# where the torch ops take 57-95 us), far too slow for a prefill (8k tokens x 6 copies: 1.2
# ms), where the three-launch layout below takes over.
ALIGN_KERNEL_MAX_COPIES = 4096


@triton.jit
def moe_align_count_kernel(ids_ptr, chunk_counts_ptr, sorted_ids_ptr, num_copies, num_experts,
                           total, BLOCK_E: tl.constexpr, CHUNK: tl.constexpr):
    """Program p: copies per expert in chunk p (a [CHUNK, BLOCK_E] one-hot), and the padding
    fill of its share of the layout's rows."""
    p = tl.program_id(0)
    offs_e = tl.arange(0, BLOCK_E)
    offs = p * CHUNK + tl.arange(0, CHUNK)
    ids = tl.load(ids_ptr + offs, mask=offs < num_copies, other=-1).to(tl.int32)
    counts = tl.sum((ids[:, None] == offs_e[None, :]).to(tl.int32), axis=0)
    tl.store(chunk_counts_ptr + p * BLOCK_E + offs_e, counts)
    rows_per = tl.cdiv(total, tl.num_programs(0))
    for r0 in range(p * rows_per, tl.minimum((p + 1) * rows_per, total), CHUNK):
        rows = r0 + tl.arange(0, CHUNK)
        tl.store(sorted_ids_ptr + rows, tl.zeros([CHUNK], tl.int32) + num_copies,
                 mask=(rows < total) & (rows < (p + 1) * rows_per))


@triton.jit
def moe_align_offsets_kernel(chunk_counts_ptr, block_expert_ptr, num_chunks, num_experts, total,
                             BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr,
                             BLOCK_P: tl.constexpr):
    """One program: turn the per-chunk counts into each chunk's first row per expert (the
    expert's padded start plus the copies of earlier chunks: a column-wise exclusive scan, in
    place) and label every block with its expert."""
    offs_e = tl.arange(0, BLOCK_E)
    local = offs_e < num_experts
    counts = tl.zeros([BLOCK_E], tl.int32)
    for p0 in range(0, num_chunks, BLOCK_P):
        offs_p = p0 + tl.arange(0, BLOCK_P)
        c = tl.load(chunk_counts_ptr + offs_p[:, None] * BLOCK_E + offs_e[None, :],
                    mask=(offs_p < num_chunks)[:, None], other=0)
        counts += tl.sum(c, axis=0)
    padded = tl.where(local, (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M, 0)
    padded_end = tl.cumsum(padded, axis=0)
    run = padded_end - padded  # the next row of each expert's run
    for p0 in range(0, num_chunks, BLOCK_P):
        offs_p = p0 + tl.arange(0, BLOCK_P)
        ptrs = chunk_counts_ptr + offs_p[:, None] * BLOCK_E + offs_e[None, :]
        c = tl.load(ptrs, mask=(offs_p < num_chunks)[:, None], other=0)
        tl.store(ptrs, run[None, :] + tl.cumsum(c, axis=0) - c,
                 mask=(offs_p < num_chunks)[:, None])
        run += tl.sum(c, axis=0)
    for b0 in range(0, total // BLOCK_M, BLOCK_P):
        blocks = b0 + tl.arange(0, BLOCK_P)
        ended = (padded_end[None, :] <= (blocks * BLOCK_M)[:, None]) & local[None, :]
        expert = tl.sum(ended.to(tl.int32), axis=1)
        tl.store(block_expert_ptr + blocks, tl.where(expert < num_experts, expert, -1),
                 mask=blocks < total // BLOCK_M)


@triton.jit
def moe_align_place_kernel(ids_ptr, chunk_start_ptr, sorted_ids_ptr, num_copies, num_experts,
                           BLOCK_E: tl.constexpr, CHUNK: tl.constexpr):
    """Program p: each copy of chunk p goes to its chunk's next row of its expert's run (its
    rank among the chunk's copies of that expert: an exclusive scan of the one-hot)."""
    p = tl.program_id(0)
    offs_e = tl.arange(0, BLOCK_E)
    offs = p * CHUNK + tl.arange(0, CHUNK)
    ok = offs < num_copies
    ids = tl.load(ids_ptr + offs, mask=ok, other=-1).to(tl.int32)
    onehot = (ids[:, None] == offs_e[None, :]).to(tl.int32)
    rank = tl.cumsum(onehot, axis=0) - onehot
    start = tl.load(chunk_start_ptr + p * BLOCK_E + offs_e)
    dest = tl.sum((start[None, :] + rank) * onehot, axis=1)
    tl.store(sorted_ids_ptr + dest, offs, mask=ok & (ids >= 0) & (ids < num_experts))


def moe_align_block_size_chunked(
    topk_ids: torch.Tensor, block_m: int, num_experts: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """`moe_align_block_size_ref`'s layout (bit for bit) in three launches over chunks of
    copies (count, scan, place), for prefill-sized copy counts: the reference's dozen torch
    launches and radix sort cost more host time than the prefill's GPU time at 1k tokens."""
    num_copies = topk_ids.numel()
    device = topk_ids.device
    total = padded_rows(num_copies, num_experts, block_m)
    block_e = triton.next_power_of_2(num_experts)
    chunk = max(16, min(256, 16384 // block_e))
    num_chunks = triton.cdiv(num_copies, chunk)
    sorted_ids = torch.empty(total, dtype=torch.int32, device=device)
    block_expert = torch.empty(total // block_m, dtype=torch.int32, device=device)
    chunk_counts = torch.empty(num_chunks, block_e, dtype=torch.int32, device=device)
    flat = topk_ids.reshape(-1)
    moe_align_count_kernel[(num_chunks,)](flat, chunk_counts, sorted_ids, num_copies,
                                          num_experts, total, BLOCK_E=block_e, CHUNK=chunk)
    moe_align_offsets_kernel[(1,)](chunk_counts, block_expert, num_chunks, num_experts, total,
                                   BLOCK_M=block_m, BLOCK_E=block_e,
                                   BLOCK_P=max(16, 4096 // block_e), num_warps=8)
    moe_align_place_kernel[(num_chunks,)](flat, chunk_counts, sorted_ids, num_copies,
                                          num_experts, BLOCK_E=block_e, CHUNK=chunk)
    return sorted_ids, block_expert


def moe_align_block_size(
    topk_ids: torch.Tensor, block_m: int, num_experts: int, chunk: int | None = None,
    num_warps: int = 4, num_shared: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`moe_align_block_size_ref`'s layout (bit for bit): one Triton launch for up to
    ALIGN_KERNEL_MAX_COPIES copies, `moe_align_block_size_chunked` above that. ``chunk`` /
    ``num_warps`` override the measured tile choice (benchmarks/align_sweep.py).
    ``num_shared``: the last num_shared columns of topk_ids hold the last num_shared expert
    ids in order, for every token (shared experts stacked after the routed ones); they are
    laid out without sorting.
    """
    num_copies = topk_ids.numel()
    if num_copies > ALIGN_KERNEL_MAX_COPIES:
        return moe_align_block_size_chunked(topk_ids, block_m, num_experts)
    total = padded_rows(num_copies, num_experts, block_m)
    sorted_ids = torch.empty(total, dtype=torch.int32, device=topk_ids.device)
    block_expert = torch.empty(total // block_m, dtype=torch.int32, device=topk_ids.device)
    block_e = triton.next_power_of_2(num_experts - num_shared)
    if chunk is None:  # benchmarks/align_sweep.py, H100, 64 experts: 4 / 17 / 29 / 56 us at
        # 6 / 768 / 1536 / 3072 copies, against 57-95 us for the torch ops
        chunk, num_warps = (64, 8) if num_copies <= 192 else (128, 4) if num_copies <= 768 \
            else (256, 8)
        chunk = max(16, min(chunk, 16384 // block_e))
    moe_align_kernel[(1,)](
        topk_ids.reshape(-1), sorted_ids, block_expert, num_copies, num_experts, total,
        BLOCK_M=block_m, BLOCK_E=block_e, CHUNK=chunk, TOP_K=topk_ids.shape[-1],
        NUM_SHARED=num_shared, num_warps=num_warps,
    )
    return sorted_ids, block_expert


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


@triton.jit
def moe_combine_kernel(
    y_ptr, weights_ptr, ids_ptr, out_ptr, hidden, top_k,
    stride_ym, stride_wt, stride_it, stride_ot,
    BLOCK_TOPK: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """out[t] = sum_j weights[t, j] * y[t*k + j] over the copies whose expert is here."""
    token = tl.program_id(0)
    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_j = tl.arange(0, BLOCK_TOPK)
    j_ok = offs_j < top_k
    ids = tl.load(ids_ptr + token * stride_it + offs_j, mask=j_ok, other=-1)
    w = tl.load(weights_ptr + token * stride_wt + offs_j, mask=j_ok, other=0.0).to(tl.float32)
    here = ids >= 0
    rows = (token * top_k + offs_j).to(tl.int64) * stride_ym
    y = tl.load(y_ptr + rows[:, None] + offs_h[None, :],
                mask=here[:, None] & (offs_h < hidden)[None, :], other=0.0)
    out = tl.sum(y.to(tl.float32) * tl.where(here, w, 0.0)[:, None], 0)
    tl.store(out_ptr + token * stride_ot + offs_h, out.to(out_ptr.dtype.element_ty),
             mask=offs_h < hidden)


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
        return _fused_moe_fp8(x, w13, w2, topk_weights, topk_ids, config, num_shared,
                              w13_scale, w2_scale, block_shape)
    num_tokens, hidden = x.shape
    num_experts, two_inter, w13_hidden = w13.shape
    inter = two_inter // 2
    if w13_hidden != hidden or two_inter % 2 or w2.shape != (num_experts, hidden, inter):
        raise ValueError(f"x {tuple(x.shape)}, w13 {tuple(w13.shape)}, w2 {tuple(w2.shape)} "
                         "do not fit [T, H], [E, 2I, H], [E, H, I]")
    if topk_ids.shape != topk_weights.shape or topk_ids.shape[0] != num_tokens:
        raise ValueError(f"topk_ids {tuple(topk_ids.shape)} / topk_weights "
                         f"{tuple(topk_weights.shape)} must both be [{num_tokens}, k]")
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
    return _combine(y, topk_weights, topk_ids, torch.empty_like(x))


def _combine(y: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
             out: torch.Tensor) -> torch.Tensor:
    num_tokens, hidden = out.shape
    top_k = topk_ids.shape[1]
    block_h = min(1024, triton.next_power_of_2(hidden))
    moe_combine_kernel[(num_tokens, triton.cdiv(hidden, block_h))](
        y, topk_weights, topk_ids, out, hidden, top_k,
        y.stride(0), topk_weights.stride(0), topk_ids.stride(0), out.stride(0),
        BLOCK_TOPK=triton.next_power_of_2(top_k), BLOCK_H=block_h, num_warps=4,
    )
    return out


def check_fp8_moe_args(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
                       topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                       w13_scale: torch.Tensor, w2_scale: torch.Tensor,
                       block_shape: tuple[int, int]) -> None:
    """ValueError naming what does not fit the fp8 fused MoE's shapes and dtypes."""
    if x.dim() != 2 or w13.dim() != 3 or w2.dim() != 3:
        raise ValueError(f"x {tuple(x.shape)}, w13 {tuple(w13.shape)}, w2 {tuple(w2.shape)} "
                         "must be [T, H], [E, 2I, H], [E, H, I]")
    num_tokens, hidden = x.shape
    num_experts, two_inter, w13_hidden = w13.shape
    inter = two_inter // 2
    if w13_hidden != hidden or two_inter % 2 or w2.shape != (num_experts, hidden, inter):
        raise ValueError(f"x {tuple(x.shape)}, w13 {tuple(w13.shape)}, w2 {tuple(w2.shape)} "
                         "do not fit [T, H], [E, 2I, H], [E, H, I]")
    if topk_ids.shape != topk_weights.shape or topk_ids.shape[0] != num_tokens:
        raise ValueError(f"topk_ids {tuple(topk_ids.shape)} / topk_weights "
                         f"{tuple(topk_weights.shape)} must both be [{num_tokens}, k]")
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


def _fused_moe_fp8(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
                   topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                   config: MoeConfig | None, num_shared: int, w13_scale: torch.Tensor,
                   w2_scale: torch.Tensor, block_shape: tuple[int, int]) -> torch.Tensor:
    """`fused_moe` with fp8 weights and activations (W8A8, block scales); same launches
    plus one activation quantization, still no host synchronisation."""
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
        _EPS, x_q.stride(0), x_s.stride(0), w13.stride(0), w13.stride(1), w13_scale.stride(0),
        w13_scale.stride(1), h.stride(0), h_s.stride(0),
        A_ROWS_PER_COPY_DIV=top_k, SILU_MUL=True, QUANT_OUT=quant_out, BLOCK_N=gate_n, **launch,
    )
    if not quant_out:
        h, h_s = per_token_group_quant(h, bk, _EPS)
    y = x.new_empty(num_copies, hidden)
    fused_moe_fp8_kernel[(num_m_blocks, triton.cdiv(hidden, cfg.block_n))](
        h, h_s, w2, w2_scale, y, y, sorted_ids, block_expert, num_copies, hidden, inter,
        _EPS, h.stride(0), h_s.stride(0), w2.stride(0), w2.stride(1), w2_scale.stride(0),
        w2_scale.stride(1), y.stride(0), 0,
        A_ROWS_PER_COPY_DIV=1, SILU_MUL=False, QUANT_OUT=False, BLOCK_N=cfg.block_n, **launch,
    )
    return _combine(y, topk_weights, topk_ids, torch.empty_like(x))


# per_token_group_quant's floor on a group's scale: all-zero groups do not divide by zero.
_EPS = 1e-10


def dequantize_block_fp8(w: torch.Tensor, scale: torch.Tensor,
                         block_shape: tuple[int, int] = (128, 128)) -> torch.Tensor:
    """[..., N, K] e4m3 times its [..., ceil(N / bn), ceil(K / bk)] block scales, float32."""
    bn, bk = block_shape
    n, k = w.shape[-2:]
    s = scale.float().repeat_interleave(bn, -2)[..., :n, :]
    return w.float() * s.repeat_interleave(bk, -1)[..., :k]


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
        x_q, x_s = per_token_group_quant_ref(x, bk, _EPS)
        xf = _group_dequant(x_q, x_s, bk)
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
            h = _group_dequant(*per_token_group_quant_ref(h, bk, _EPS), bk)
        y = h @ w_down.T
        out.index_add_(0, token, y * topk_weights[token, slot, None].float())
    return out.to(x.dtype)


def _group_dequant(q: torch.Tensor, scales: torch.Tensor, group: int) -> torch.Tensor:
    return q.float() * scales.repeat_interleave(group, 1)[:, :q.shape[1]]
