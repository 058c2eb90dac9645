"""The fused MoE's layout of token copies: into expert blocks (`moe_align_block_size`) and
back to tokens (`moe_combine`).

`moe_align_block_size` lays the T*k token copies out expert by expert, each expert's run
padded to a multiple of BLOCK_M, and names the expert of every BLOCK_M block, in one Triton
launch for a handful of copies, three over chunks of copies above that; buffers are sized for
the worst case instead of reading the counts back, so a decode step stays capturable in a CUDA
graph. (The same in torch
ops, `moe_align_block_size_ref`, is a dozen launches and a radix sort: 50-70 us of a decode
step's MoE layer on the H100.) `moe_combine` sums each token's k copies with their routing
weights in float32, skipping experts held elsewhere (id -1).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = [
    "padded_rows", "moe_align_block_size", "moe_align_block_size_chunked",
    "moe_align_block_size_ref", "moe_align_kernel", "SINGLE_PROGRAM_MAX_ONEHOT",
    "moe_combine_kernel", "moe_combine",
]


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


@triton.jit(do_not_specialize=["num_copies", "num_experts", "total"])
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


# One program walks all copies (a [CHUNK, experts] one-hot per chunk, serially): the fastest
# layout for a handful of copies, and its time grows with copies x experts. The chunked layout
# (three launches) takes over above this one-hot size. benchmarks/align_sweep.py, H200, graphs:
# V2-Lite (64 experts + 2 shared) batch 1 4.4 us against 6.3, batch 64 13.6 against 8.9, batch
# 256 39.3 against 9.2; V3 (256 + 1) batch 1 8.5 / 7.0, batch 64 53.8 / 21.1, batch 256 199.6 /
# 25.0.
SINGLE_PROGRAM_MAX_ONEHOT = 8192


# Integer arguments are loop bounds and counts that follow the step's token count: specializing
# on them (== 1, divisible by 16) compiled variants mid-serving that no warm-up step had made.
@triton.jit(do_not_specialize=["num_copies", "num_experts", "total"])
def moe_align_count_kernel(ids_ptr, chunk_counts_ptr, sorted_ids_ptr, num_copies, num_experts,
                           total, BLOCK_E: tl.constexpr, CHUNK: tl.constexpr,
                           TOP_K: tl.constexpr, NUM_SHARED: tl.constexpr):
    """Program p: copies per routed expert in chunk p (a [CHUNK, BLOCK_E] one-hot; the last
    NUM_SHARED columns of every token are left out), and the padding fill of its share of the
    layout's rows (the next launch overwrites the rows that hold copies)."""
    p = tl.program_id(0)
    offs_e = tl.arange(0, BLOCK_E)
    offs = p * CHUNK + tl.arange(0, CHUNK)
    ok = (offs < num_copies) & (offs % TOP_K < TOP_K - NUM_SHARED)
    ids = tl.load(ids_ptr + offs, mask=ok, other=-1).to(tl.int32)
    counts = tl.sum((ids[:, None] == offs_e[None, :]).to(tl.int32), axis=0)
    tl.store(chunk_counts_ptr + p * BLOCK_E + offs_e, counts)
    rows_per = tl.cdiv(total, tl.num_programs(0))
    for r0 in range(p * rows_per, tl.minimum((p + 1) * rows_per, total), CHUNK):
        rows = r0 + tl.arange(0, CHUNK)
        tl.store(sorted_ids_ptr + rows, tl.zeros([CHUNK], tl.int32) + num_copies,
                 mask=(rows < total) & (rows < (p + 1) * rows_per))


@triton.jit(do_not_specialize=["num_chunks", "num_experts", "total", "num_tokens"])
def moe_align_offsets_kernel(chunk_counts_ptr, block_expert_ptr, routed_rows_ptr, num_chunks,
                             num_experts, total, num_tokens,
                             BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr,
                             BLOCK_P: tl.constexpr, NUM_SHARED: tl.constexpr):
    """One program: turn the per-chunk counts into each chunk's first row per expert (the
    expert's padded start plus the copies of earlier chunks: a column-wise exclusive scan, in
    place) and label every block with its expert. The shared experts' runs follow the routed
    ones, one padded run of every token each (their rows in closed form)."""
    routed = num_experts - NUM_SHARED
    offs_e = tl.arange(0, BLOCK_E)
    local = offs_e < routed
    counts = tl.zeros([BLOCK_E], tl.int32)
    for p0 in range(0, num_chunks, BLOCK_P):
        offs_p = p0 + tl.arange(0, BLOCK_P)
        c = tl.load(chunk_counts_ptr + offs_p[:, None] * BLOCK_E + offs_e[None, :],
                    mask=(offs_p < num_chunks)[:, None], other=0)
        counts += tl.sum(c, axis=0)
    padded = tl.where(local, (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M, 0)
    padded_end = tl.cumsum(padded, axis=0)
    routed_rows = tl.sum(padded, axis=0)
    tl.store(routed_rows_ptr, routed_rows)
    run = padded_end - padded  # the next row of each expert's run
    for p0 in range(0, num_chunks, BLOCK_P):
        offs_p = p0 + tl.arange(0, BLOCK_P)
        ptrs = chunk_counts_ptr + offs_p[:, None] * BLOCK_E + offs_e[None, :]
        c = tl.load(ptrs, mask=(offs_p < num_chunks)[:, None], other=0)
        tl.store(ptrs, run[None, :] + tl.cumsum(c, axis=0) - c,
                 mask=(offs_p < num_chunks)[:, None])
        run += tl.sum(c, axis=0)
    shared_rows = (num_tokens + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    for b0 in range(0, total // BLOCK_M, BLOCK_P):
        blocks = b0 + tl.arange(0, BLOCK_P)
        row = blocks * BLOCK_M
        ended = (padded_end[None, :] <= row[:, None]) & local[None, :]
        expert = tl.sum(ended.to(tl.int32), axis=1)
        if NUM_SHARED > 0:
            shared = (row - routed_rows) // tl.maximum(shared_rows, 1)
            expert = tl.where(row < routed_rows, expert, routed + shared)
        tl.store(block_expert_ptr + blocks, tl.where(expert < num_experts, expert, -1),
                 mask=blocks < total // BLOCK_M)


@triton.jit(do_not_specialize=["num_copies", "num_experts"])
def moe_align_place_kernel(ids_ptr, chunk_start_ptr, routed_rows_ptr, sorted_ids_ptr,
                           num_copies, num_experts,
                           BLOCK_E: tl.constexpr, CHUNK: tl.constexpr, TOP_K: tl.constexpr,
                           NUM_SHARED: tl.constexpr, BLOCK_M: tl.constexpr):
    """Program p: each routed copy of chunk p goes to its chunk's next row of its expert's run
    (its rank among the chunk's copies of that expert: an exclusive scan of the one-hot); a
    shared copy to row (its shared expert's run start + its token)."""
    p = tl.program_id(0)
    routed = num_experts - NUM_SHARED
    offs_e = tl.arange(0, BLOCK_E)
    offs = p * CHUNK + tl.arange(0, CHUNK)
    col = offs % TOP_K
    ok = (offs < num_copies) & (col < TOP_K - NUM_SHARED)
    ids = tl.load(ids_ptr + offs, mask=ok, other=-1).to(tl.int32)
    onehot = (ids[:, None] == offs_e[None, :]).to(tl.int32)
    rank = tl.cumsum(onehot, axis=0) - onehot
    start = tl.load(chunk_start_ptr + p * BLOCK_E + offs_e)
    dest = tl.sum((start[None, :] + rank) * onehot, axis=1)
    tl.store(sorted_ids_ptr + dest, offs, mask=ok & (ids >= 0) & (ids < routed))
    if NUM_SHARED > 0:
        num_tokens = num_copies // TOP_K
        shared_rows = (num_tokens + BLOCK_M - 1) // BLOCK_M * BLOCK_M
        s = col - (TOP_K - NUM_SHARED)
        dest = tl.load(routed_rows_ptr) + s * shared_rows + offs // TOP_K
        tl.store(sorted_ids_ptr + dest, offs, mask=(offs < num_copies) & (s >= 0))


def align_chunk(num_copies: int, block_e: int) -> int:
    """Copies a program of the chunked layout takes: about 4k per-chunk counts for the scan
    program to read (more, smaller chunks at decode sizes), at least 32 copies and at most a
    32k-value one-hot or 256 copies a program (align_sweep.py, H200: V2-Lite 32-copy chunks
    best up to 2k copies, 64 at 4k; V3 64 at 576 copies, 128 from 1152)."""
    want = triton.next_power_of_2(triton.cdiv(num_copies * block_e, 4096))
    return max(32, min(want, 256, 32768 // block_e))


def moe_align_block_size_chunked(
    topk_ids: torch.Tensor, block_m: int, num_experts: int, num_shared: int = 0,
    chunk: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`moe_align_block_size_ref`'s layout (bit for bit) in three launches over chunks of
    copies (count, scan, place), for all but the smallest batches: the single program's
    serial walk grows with copies x experts; the reference's dozen torch launches and radix sort
    cost more host time than the prefill's GPU time at 1k tokens. ``num_shared``: as in
    `moe_align_block_size`. ``chunk``: copies a program (default `align_chunk`)."""
    num_copies = topk_ids.numel()
    device = topk_ids.device
    total = padded_rows(num_copies, num_experts, block_m)
    block_e = triton.next_power_of_2(max(num_experts - num_shared, 1))
    chunk = chunk or align_chunk(num_copies, block_e)
    num_chunks = triton.cdiv(num_copies, chunk)
    top_k = topk_ids.shape[-1] if topk_ids.dim() > 1 else 1
    sorted_ids = torch.empty(total, dtype=torch.int32, device=device)
    block_expert = torch.empty(total // block_m, dtype=torch.int32, device=device)
    chunk_counts = torch.empty(num_chunks, block_e, dtype=torch.int32, device=device)
    routed_rows = torch.empty(1, dtype=torch.int32, device=device)
    flat = topk_ids.reshape(-1)
    moe_align_count_kernel[(num_chunks,)](flat, chunk_counts, sorted_ids, num_copies,
                                          num_experts, total, BLOCK_E=block_e, CHUNK=chunk,
                                          TOP_K=top_k, NUM_SHARED=num_shared)
    moe_align_offsets_kernel[(1,)](chunk_counts, block_expert, routed_rows, num_chunks,
                                   num_experts, total, num_copies // top_k,
                                   BLOCK_M=block_m, BLOCK_E=block_e,
                                   BLOCK_P=max(16, 4096 // block_e), NUM_SHARED=num_shared,
                                   num_warps=8)
    moe_align_place_kernel[(num_chunks,)](flat, chunk_counts, routed_rows, sorted_ids,
                                          num_copies, num_experts, BLOCK_E=block_e,
                                          CHUNK=chunk, TOP_K=top_k, NUM_SHARED=num_shared,
                                          BLOCK_M=block_m)
    return sorted_ids, block_expert


def moe_align_block_size(
    topk_ids: torch.Tensor, block_m: int, num_experts: int, chunk: int | None = None,
    num_warps: int = 4, num_shared: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`moe_align_block_size_ref`'s layout (bit for bit): one Triton launch while the
    copies x experts one-hot is at most SINGLE_PROGRAM_MAX_ONEHOT, `moe_align_block_size_chunked`
    above that. ``chunk`` /
    ``num_warps`` override the measured tile choice (benchmarks/align_sweep.py).
    ``num_shared``: the last num_shared columns of topk_ids hold the last num_shared expert
    ids in order, for every token (shared experts stacked after the routed ones); they are
    laid out without sorting.
    """
    num_copies = topk_ids.numel()
    block_e = triton.next_power_of_2(max(num_experts - num_shared, 1))
    if num_copies * block_e > SINGLE_PROGRAM_MAX_ONEHOT:
        return moe_align_block_size_chunked(topk_ids, block_m, num_experts, num_shared)
    total = padded_rows(num_copies, num_experts, block_m)
    sorted_ids = torch.empty(total, dtype=torch.int32, device=topk_ids.device)
    block_expert = torch.empty(total // block_m, dtype=torch.int32, device=topk_ids.device)
    if chunk is None:  # H100, 64 experts: 4 us at 6 copies, against ~55 for the torch ops
        chunk, num_warps = max(16, min(64, 16384 // block_e)), 8
    moe_align_kernel[(1,)](
        topk_ids.reshape(-1), sorted_ids, block_expert, num_copies, num_experts, total,
        BLOCK_M=block_m, BLOCK_E=block_e, CHUNK=chunk, TOP_K=topk_ids.shape[-1],
        NUM_SHARED=num_shared, num_warps=num_warps,
    )
    return sorted_ids, block_expert


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


def moe_combine(y: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
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
