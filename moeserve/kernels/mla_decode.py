"""MLA decode attention over the paged latent cache (absorbed form, split-KV).

One query token per sequence. Every head attends over the same latents (MQA in latent space):
keys are the whole latent [c_kv, k_pe] (kv_dim = kv_lora_rank + rope), values are c_kv.
Flash-decoding: each sequence's keys are cut into `num_splits` ranges; stage 1 computes a
partial softmax-weighted sum and log-sum-exp per (sequence, head, split), stage 2 merges them.
Splitting keeps the GPU busy at small batch, where one program per sequence would leave most
SMs idle while it walks a long context.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moeserve.common.batch_class import batch_class
from moeserve.kernels.mla_common import (
    LOG2E,
    load_latent_tile,
    online_softmax_step,
    split_query,
)
from moeserve.kernels.mla_prefill_mha import gather_latents

__all__ = ["mla_decode", "mla_decode_ref", "mla_decode_kernel", "mla_decode_reduce_kernel",
           "default_block_h", "default_num_splits", "default_tiles"]

@triton.jit
def _split_len(seq_len, NUM_SPLITS: tl.constexpr, BLOCK_N: tl.constexpr):
    """Keys per split: whole BLOCK_N tiles, so only the sequence's last tile is ragged. A
    short sequence uses only its first cdiv(seq_len, split_len) splits."""
    return tl.cdiv(tl.cdiv(seq_len, NUM_SPLITS), BLOCK_N) * BLOCK_N


# The block table's row stride is its width, which follows the step's longest sequence outside
# CUDA graphs: specializing on it (divisible by 16, or 1) compiled new variants mid-serving.
@triton.jit(do_not_specialize=["stride_bts"])
def mla_decode_kernel(
    q_ptr, q_pe_ptr, cache_ptr, block_tables_ptr, seq_lens_ptr, o_ptr, lse_ptr,
    num_heads, block_size, scale_log2,
    stride_qs, stride_qh, stride_pes, stride_peh, stride_cb, stride_ct, stride_bts,
    stride_os, stride_oh, stride_osp,
    stride_ls, stride_lh,
    KV_LORA: tl.constexpr, ROPE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_PE: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, NUM_SPLITS: tl.constexpr,
):
    seq = tl.program_id(0)
    head_block = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + seq).to(tl.int32)
    split_len = _split_len(seq_len, NUM_SPLITS, BLOCK_N)
    start = split * split_len
    end = tl.minimum(start + split_len, seq_len)

    heads = head_block * BLOCK_H + tl.arange(0, BLOCK_H)
    head_ok = heads < num_heads
    offs_r = tl.arange(0, BLOCK_R)
    offs_pe = tl.arange(0, BLOCK_PE)
    r_ok = offs_r < KV_LORA
    pe_ok = offs_pe < ROPE
    q_rows = q_ptr + seq * stride_qs + heads[:, None] * stride_qh
    q_nope = tl.load(q_rows + offs_r[None, :], mask=head_ok[:, None] & r_ok[None, :], other=0.0)
    q_pe_rows = q_pe_ptr + seq * stride_pes + heads[:, None] * stride_peh
    q_pe = tl.load(q_pe_rows + offs_pe[None, :], mask=head_ok[:, None] & pe_ok[None, :],
                   other=0.0)

    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_R], tl.float32)
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < end
        kv, k_pe = load_latent_tile(cache_ptr, block_tables_ptr + seq * stride_bts, offs_n, n_ok,
                                    block_size, stride_cb, stride_ct, offs_r, r_ok, offs_pe,
                                    pe_ok, KV_LORA)
        s = tl.dot(q_nope, tl.trans(kv)) + tl.dot(q_pe, tl.trans(k_pe))
        s = tl.where(n_ok[None, :], s * scale_log2, float("-inf"))
        m_i, l_i, acc = online_softmax_step(s, m_i, l_i, acc, kv)

    # Splits past a short sequence's end store nothing: the merge reads only the splits a
    # sequence of this length uses (from `_split_len`), so their partials are never read.
    out = acc / l_i[:, None]
    lse = m_i + tl.log2(l_i)
    used = head_ok & (start < seq_len + tl.zeros([BLOCK_H], tl.int32))
    o_ptrs = (o_ptr + seq * stride_os + heads[:, None] * stride_oh + split * stride_osp
              + offs_r[None, :])
    tl.store(o_ptrs, out.to(o_ptr.dtype.element_ty),
             mask=used[:, None] & r_ok[None, :])
    tl.store(lse_ptr + seq * stride_ls + heads * stride_lh + split, lse, mask=used)


@triton.jit
def mla_decode_reduce_kernel(
    o_part_ptr, lse_ptr, out_ptr, seq_lens_ptr, num_heads,
    stride_ps, stride_ph, stride_psp, stride_ls, stride_lh, stride_os, stride_oh,
    KV_LORA: tl.constexpr, BLOCK_R: tl.constexpr, NUM_SPLITS: tl.constexpr,
    BLOCK_SPLITS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_HEADS: tl.constexpr,
):
    """Merge the splits of BLOCK_HEADS heads of one sequence over a BLOCK_R slice of the value
    width: a program a head was tens of thousands of tiny programs at V3's 128 heads."""
    seq = tl.program_id(0)
    heads = tl.program_id(1) * BLOCK_HEADS + tl.arange(0, BLOCK_HEADS)
    seq_len = tl.load(seq_lens_ptr + seq).to(tl.int32)
    offs_sp = tl.arange(0, BLOCK_SPLITS)
    # Only the splits a sequence of this length used (stage 1 stored nothing for the rest).
    sp_ok = offs_sp < tl.cdiv(seq_len, _split_len(seq_len, NUM_SPLITS, BLOCK_N))
    h_ok = heads < num_heads
    # A third grid axis cuts the value width: at batch 1 one program per head would pull
    # [splits, 512] float32 partials alone (16 programs on 132 SMs).
    offs_r = tl.program_id(2) * BLOCK_R + tl.arange(0, BLOCK_R)
    hs_ok = h_ok[:, None] & sp_ok[None, :]
    lse = tl.load(lse_ptr + seq * stride_ls + heads[:, None] * stride_lh + offs_sp[None, :],
                  mask=hs_ok, other=float("-inf"))
    m = tl.max(lse, 1)
    w = tl.where(hs_ok, tl.exp2(lse - tl.where(h_ok, m, 0.0)[:, None]), 0.0)
    w = w / tl.maximum(tl.sum(w, 1), 1e-30)[:, None]
    parts = tl.load(o_part_ptr + seq * stride_ps + heads[:, None, None] * stride_ph
                    + offs_sp[None, :, None] * stride_psp + offs_r[None, None, :],
                    mask=hs_ok[:, :, None] & (offs_r < KV_LORA)[None, None, :], other=0.0)
    out = tl.sum(parts * w[:, :, None], 1)
    tl.store(out_ptr + seq * stride_os + heads[:, None] * stride_oh + offs_r[None, :],
             out.to(out_ptr.dtype.element_ty), mask=h_ok[:, None] & (offs_r < KV_LORA)[None, :])


def default_num_splits(num_seqs: int, num_heads: int, block_h: int = 16,
                       num_sms: int = 132) -> int:
    """Splits per sequence so that stage 1 has about two waves of programs (H100: 132 SMs).

    Depends only on the batch shape, never on sequence lengths, so a CUDA graph captured for a
    batch size stays valid whatever the context lengths are at replay.
    """
    if num_seqs >= 64:  # enough sequences to fill the GPU: few splits, less merging. With
        # 16 heads a program two beat one at 128 / 256 too (tune_mla_decode.py, H200: batch
        # 128 at 1k 68.8 against 73.6 us, at 4k 216.6 against 269.2; batch 256 at 4k 421.5
        # against 493.5); 64 heads a program (V3) at batch 256 took 470 us a layer with two
        # and its merge against 431 with one (profile_decode.py --preset v3 --fp8).
        return 2 if num_seqs < 128 or block_h < 64 else 1
    programs = num_seqs * triton.cdiv(num_heads, block_h)
    # Batch 1-2: 128 splits of one 32-key tile per 4k of context (`tune_mla_decode.py`, H100,
    # graphs: batch 1 at 4k 9.9 us against 11.8 with 64 and ~15 with 32; at 1k 8.6 / 9.4 /
    # 9.1: short contexts leave most splits empty, which store nothing and are not merged).
    return max(1, min(128 if num_seqs <= 2 else 32, triton.cdiv(2 * num_sms, programs)))


def default_block_h(num_heads: int, num_seqs: int = 1) -> int:
    """Heads per program: each program reads its sequence's latents once for all its heads,
    and tl.dot needs M >= 16 (V2-Lite's 16 heads fill one block). V3's 128 heads at batch
    >= 32 take 64 a program (benchmarks/tune_mla_decode.py --heads 128, H200: batch 64 at 1k
    137 us against 287 with 16, at 4k 397 against 997; batch 256 at 1k 391 against 991);
    at batch 1 16 stay best (13.4 against 13.8 us at 1k)."""
    return 64 if num_heads >= 64 and num_seqs >= 32 else 16


def default_tiles(num_seqs: int, block_h: int = 16) -> tuple[int, int]:
    """(BLOCK_N, num_warps). From benchmarks/tune_mla_decode.py on the H100, V2-Lite, graphs
    replayed: batch 64 at 4k context 146 us with 2 splits of 64-key tiles over 8 warps against
    176 us for 5 splits of 32-key tiles; batch 128 at 1k 81 against 88 us; batch 1 at 4k 14.5
    against 23.5 us with 32 splits instead of 16; batch 256 keeps 32-key tiles (127 vs 135 us
    at 1k with one split). 64 heads a program take 64-key tiles over 8 warps at every batch
    (V3, H200: batch 256 at 1k 391 us against 499 with 32-key tiles)."""
    if block_h >= 64:
        return 64, 8
    # H200, two splits from batch 128: 32-key tiles over 4 warps (the timings above)
    return (64, 8) if 64 <= num_seqs < 128 else (32, 4)


def mla_decode(
    q: torch.Tensor,
    layer_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    kv_lora_rank: int,
    num_splits: int | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
    num_stages: int = 2,
    q_pe: torch.Tensor | None = None,
    block_h: int | None = None,
) -> torch.Tensor:
    """Absorbed MLA decode attention, one query token per sequence.

    q: [S, H, kv_dim] (latent query then rotated q_pe), bf16/fp16/fp32, last dim contiguous;
        or, with ``q_pe`` [S, H, rope] given apart, q is the latent query [S, H, R] alone (any
        strides with a contiguous last dim: the model passes views, no concatenation).
    layer_cache: [num_blocks, block_size, kv_dim], same dtype, any strides with a contiguous
        last dim (e.g. `kv_cache[:, layer]`).
    block_tables: [S, max_blocks] int32/int64, page ids; entries past seq_lens are not read.
    seq_lens: [S] int32/int64, tokens in cache per sequence (>= 1), the query's own included.
    scale: softmax scale. kv_lora_rank: R, the value width (first R dims of a latent).
    num_splits: KV splits per sequence; default from the batch shape (`default_num_splits`).
    block_n / num_warps / num_stages / block_h (heads per program): tiles
    (benchmarks/tune_mla_decode.py sweeps them).
    Returns [S, H, R] in q's dtype.
    """
    q, q_pe = _split_query(q, q_pe, layer_cache, block_tables, seq_lens, kv_lora_rank)
    num_seqs, num_heads = q.shape[:2]
    block_size = layer_cache.shape[1]
    rope = q_pe.shape[2]
    # Tiles and splits by batch class, not batch: an eager step (a mixed step's decode rows)
    # of any size then reuses a variant the decode graphs' ladder compiled.
    size = batch_class(num_seqs)
    block_h = block_h or default_block_h(num_heads, size)
    splits = num_splits or default_num_splits(size, num_heads, block_h)
    tiles = default_tiles(size, block_h)
    block_n, num_warps = block_n or tiles[0], num_warps or tiles[1]
    block_r = triton.next_power_of_2(kv_lora_rank)
    out = q.new_empty(num_seqs, num_heads, kv_lora_rank)
    # One split is already the answer: stage 1 writes it, no merge launch.
    o_part = out.unsqueeze(2) if splits == 1 else q.new_empty(
        num_seqs, num_heads, splits, kv_lora_rank, dtype=torch.float32)
    lse = q.new_empty(num_seqs, num_heads, splits, dtype=torch.float32)
    grid = (num_seqs, triton.cdiv(num_heads, block_h), splits)
    # Two stages of [64, 576] bf16 key tiles are 144 KiB: within Hopper's shared memory, with
    # the [16, 512] float32 accumulator in registers.
    mla_decode_kernel[grid](
        q, q_pe, layer_cache, block_tables, seq_lens, o_part, lse,
        num_heads, block_size, scale * LOG2E,
        q.stride(0), q.stride(1), q_pe.stride(0), q_pe.stride(1), layer_cache.stride(0),
        layer_cache.stride(1),
        block_tables.stride(0), o_part.stride(0), o_part.stride(1), o_part.stride(2),
        lse.stride(0), lse.stride(1),
        KV_LORA=kv_lora_rank, ROPE=rope, BLOCK_R=block_r,
        BLOCK_PE=max(16, triton.next_power_of_2(rope)), BLOCK_H=block_h, BLOCK_N=block_n,
        NUM_SPLITS=splits, num_warps=num_warps, num_stages=num_stages,
    )
    if splits == 1:
        return out
    r_chunk = min(block_r, 128)
    block_splits = triton.next_power_of_2(splits)
    # Heads a merge program takes: an [heads, splits, 128] float32 tile of at most 8k values.
    merge_h = min(triton.next_power_of_2(num_heads), max(1, 8192 // (block_splits * r_chunk)))
    mla_decode_reduce_kernel[(num_seqs, triton.cdiv(num_heads, merge_h),
                              triton.cdiv(kv_lora_rank, r_chunk))](
        o_part, lse, out, seq_lens, num_heads,
        o_part.stride(0), o_part.stride(1), o_part.stride(2), lse.stride(0), lse.stride(1),
        out.stride(0), out.stride(1),
        KV_LORA=kv_lora_rank, BLOCK_R=r_chunk, NUM_SPLITS=splits,
        BLOCK_SPLITS=block_splits, BLOCK_N=block_n, BLOCK_HEADS=merge_h, num_warps=4,
    )
    return out


def _split_query(q: torch.Tensor, q_pe: torch.Tensor | None, layer_cache: torch.Tensor,
                 block_tables: torch.Tensor, seq_lens: torch.Tensor,
                 kv_lora_rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(latent query, q_pe) of `mla_decode`'s arguments; ValueError naming what does not fit."""
    q, q_pe = split_query(q, q_pe, layer_cache, block_tables, kv_lora_rank, "S")
    num_seqs = q.shape[0]
    if block_tables.shape[0] != num_seqs or seq_lens.shape != (num_seqs,):
        raise ValueError(f"block_tables {tuple(block_tables.shape)} / seq_lens "
                         f"{tuple(seq_lens.shape)} do not match {num_seqs} sequences")
    return q, q_pe


def mla_decode_ref(
    q: torch.Tensor,
    layer_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    kv_lora_rank: int,
) -> torch.Tensor:
    """Plain-torch `mla_decode` (same arguments, float32 math): one sequence at a time."""
    out = q.new_empty(q.shape[0], q.shape[1], kv_lora_rank)
    for s in range(q.shape[0]):
        n = int(seq_lens[s])
        keys = gather_latents(layer_cache, block_tables[s].long(), n).float()  # [n, kv_dim]
        probs = (q[s].float() @ keys.T * scale).softmax(dim=-1)  # [H, n]
        out[s] = (probs @ keys[:, :kv_lora_rank]).to(q.dtype)
    return out
