"""MLA prefill / extend attention over the paged latent cache (absorbed form, causal).

The queries are each sequence's new tokens (a cached prefix may precede them); the keys are all
of the sequence's latents in the cache, the new tokens' included (they are written first).
Query i of a sequence with L cached tokens after the write and Q new ones sits at position
L - Q + i and sees keys 0..L - Q + i. The math is `MLAttention._absorbed` in
moeserve/worker/model/mla.py: keys are whole latents, values their first kv_lora_rank dims.

All heads share one key stream, so a program takes BLOCK_M (token, head) rows of one sequence,
heads fastest: each key tile read from the cache serves every head of several tokens.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from moeserve.kernels.mla_common import (
    LOG2E,
    load_latent_tile,
    online_softmax_step,
    split_query,
)
from moeserve.kernels.mla_prefill_mha import gather_latents

__all__ = ["mla_prefill", "mla_prefill_ref", "mla_prefill_kernel", "PrefillConfig",
           "default_prefill_config"]

@dataclass(frozen=True)
class PrefillConfig:
    """Tiles of `mla_prefill_kernel`. The default keeps the [64, 512] float32 accumulator at
    128 registers a thread over 8 warps and double-buffers [64, 576] bf16 key tiles (2 x 72
    KiB of shared memory, within Hopper's 227). H200, 16 heads, 1000 new tokens after 1000
    cached (`benchmarks/tune_fused_moe.py --prefill-tiles 1000`): 0.327 ms against 0.498 for
    [32, 576] single-buffered tiles (160 against 105 TFLOP/s)."""

    block_m: int = 64
    block_n: int = 64
    num_warps: int = 8
    num_stages: int = 2


@functools.lru_cache(maxsize=64)  # called per layer and step: shapes repeat
def default_prefill_config(block_r: int, block_pe: int, elem_size: int,
                           shared_memory: int) -> PrefillConfig:
    """The tuned tiles, shrunk (stages first, then keys) until the query tile and the buffered
    key tiles fit ``shared_memory`` bytes less a little for Triton: float32 caches (parity
    tests on a GPU) and GPUs with less shared memory than Hopper's 227 KiB get smaller ones."""
    cfg = PrefillConfig()
    width = (block_r + block_pe) * elem_size
    budget = shared_memory - 4 * 1024

    def need(c: PrefillConfig) -> int:
        return (c.block_m + c.num_stages * c.block_n) * width

    while need(cfg) > budget:
        if cfg.num_stages > 1:
            cfg = dataclasses.replace(cfg, num_stages=cfg.num_stages - 1)
        elif cfg.block_n > 16:
            cfg = dataclasses.replace(cfg, block_n=cfg.block_n // 2)
        elif cfg.block_m > 16:
            cfg = dataclasses.replace(cfg, block_m=cfg.block_m // 2)
        else:
            break
    return cfg


def _shared_memory(device: torch.device) -> int:
    if device.type != "cuda":
        return 227 * 1024  # the interpreter: no limit; Hopper's, so the CPU runs the GPU tiles
    return _cuda_shared_memory(device.index if device.index is not None else
                               torch.cuda.current_device())


@functools.lru_cache(maxsize=16)
def _cuda_shared_memory(index: int) -> int:
    props = torch.cuda.get_device_properties(index)
    return int(getattr(props, "shared_memory_per_block_optin", 227 * 1024))


# Not specialized on the block table's stride (its width: the step's longest sequence).
@triton.jit(do_not_specialize=["stride_bts"])
def mla_prefill_kernel(
    q_ptr, q_pe_ptr, cache_ptr, block_tables_ptr, seq_lens_ptr, query_start_ptr, o_ptr,
    num_heads, block_size, scale_log2,
    stride_qt, stride_qh, stride_pet, stride_peh, stride_cb, stride_ct, stride_bts, stride_ot,
    stride_oh,
    KV_LORA: tl.constexpr, ROPE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_PE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    seq = tl.program_id(0)
    q_start = tl.load(query_start_ptr + seq).to(tl.int32)
    q_len = tl.load(query_start_ptr + seq + 1).to(tl.int32) - q_start
    num_rows = q_len * num_heads
    if tl.program_id(1) * BLOCK_M >= num_rows:
        return
    seq_len = tl.load(seq_lens_ptr + seq).to(tl.int32)
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < num_rows
    token = rows // num_heads
    head = rows % num_heads
    # Padding rows pretend to sit at position 0 so they see key 0 and their softmax stays
    # finite; they are never stored.
    pos = tl.where(row_ok, seq_len - q_len + token, 0)
    kv_end = tl.minimum(tl.max(pos, 0) + 1, seq_len)

    offs_r = tl.arange(0, BLOCK_R)
    offs_pe = tl.arange(0, BLOCK_PE)
    r_ok = offs_r < KV_LORA
    pe_ok = offs_pe < ROPE
    q_rows = q_ptr + (q_start + token).to(tl.int64) * stride_qt + head * stride_qh
    q_nope = tl.load(q_rows[:, None] + offs_r[None, :], mask=row_ok[:, None] & r_ok[None, :],
                     other=0.0)
    q_pe_rows = q_pe_ptr + (q_start + token).to(tl.int64) * stride_pet + head * stride_peh
    q_pe = tl.load(q_pe_rows[:, None] + offs_pe[None, :],
                   mask=row_ok[:, None] & pe_ok[None, :], other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_R], tl.float32)
    for n0 in range(0, kv_end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < kv_end
        kv, k_pe = load_latent_tile(cache_ptr, block_tables_ptr + seq * stride_bts, offs_n, n_ok,
                                    block_size, stride_cb, stride_ct, offs_r, r_ok, offs_pe,
                                    pe_ok, KV_LORA)
        s = tl.dot(q_nope, tl.trans(kv)) + tl.dot(q_pe, tl.trans(k_pe))
        visible = (offs_n[None, :] <= pos[:, None]) & n_ok[None, :]
        s = tl.where(visible, s * scale_log2, float("-inf"))
        # Every row saw key 0 in the first tile, so the running max is finite from then on.
        m_i, l_i, acc = online_softmax_step(s, m_i, l_i, acc, kv)

    out = acc / l_i[:, None]
    o_ptrs = (o_ptr + (q_start + token).to(tl.int64)[:, None] * stride_ot
              + head[:, None] * stride_oh + offs_r[None, :])
    tl.store(o_ptrs, out.to(o_ptr.dtype.element_ty), mask=row_ok[:, None] & r_ok[None, :])


def mla_prefill(
    q: torch.Tensor,
    layer_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    max_query_len: int,
    scale: float,
    kv_lora_rank: int,
    config: PrefillConfig | None = None,
    q_pe: torch.Tensor | None = None,
) -> torch.Tensor:
    """Absorbed causal MLA attention of a ragged batch of new tokens over the paged cache.

    q: [T, H, kv_dim] new tokens' queries (latent then rotated q_pe), sequence after sequence;
        bf16/fp16/fp32, last dim contiguous. Or, with ``q_pe`` [T, H, rope] given apart, the
        latent query [T, H, kv_lora_rank] alone (any strides but the last: no concatenated
        copy of the two is made).
    layer_cache: [num_blocks, block_size, kv_dim], q's dtype, strided (e.g. `kv_cache[:, l]`),
        already holding the new tokens' latents.
    block_tables: [S, max_blocks] int32/int64. seq_lens: [S] int32/int64, cached tokens after
        the write. query_start_loc: [S + 1] int32/int64, offsets of each sequence's new tokens.
    max_query_len: the largest new-token count (sizes the grid without reading the device).
    Returns [T, H, kv_lora_rank] in q's dtype.
    """
    q, q_pe = split_query(q, q_pe, layer_cache, block_tables, kv_lora_rank, "T")
    num_tokens, num_heads = q.shape[:2]
    rope = q_pe.shape[2]
    num_seqs = seq_lens.shape[0]
    if block_tables.shape[0] != num_seqs or query_start_loc.shape != (num_seqs + 1,):
        raise ValueError(f"block_tables {tuple(block_tables.shape)}, query_start_loc "
                         f"{tuple(query_start_loc.shape)} do not match {num_seqs} sequences")
    block_r, block_pe = triton.next_power_of_2(kv_lora_rank), max(16, triton.next_power_of_2(rope))
    cfg = config or default_prefill_config(block_r, block_pe, q.element_size(),
                                           _shared_memory(q.device))
    out = q.new_empty(num_tokens, num_heads, kv_lora_rank)
    if num_tokens == 0:
        return out
    grid = (num_seqs, triton.cdiv(max_query_len * num_heads, cfg.block_m))
    mla_prefill_kernel[grid](
        q, q_pe, layer_cache, block_tables, seq_lens, query_start_loc, out,
        num_heads, layer_cache.shape[1], scale * LOG2E,
        q.stride(0), q.stride(1), q_pe.stride(0), q_pe.stride(1), layer_cache.stride(0),
        layer_cache.stride(1),
        block_tables.stride(0), out.stride(0), out.stride(1),
        KV_LORA=kv_lora_rank, ROPE=rope, BLOCK_R=block_r, BLOCK_PE=block_pe, BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return out


def mla_prefill_ref(
    q: torch.Tensor,
    layer_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    max_query_len: int,
    scale: float,
    kv_lora_rank: int,
) -> torch.Tensor:
    """Plain-torch `mla_prefill` (same arguments), one sequence at a time in float32."""
    out = q.new_empty(q.shape[0], q.shape[1], kv_lora_rank)
    for s in range(seq_lens.shape[0]):
        n = int(seq_lens[s])
        start, end = int(query_start_loc[s]), int(query_start_loc[s + 1])
        if end == start:
            continue
        keys = gather_latents(layer_cache, block_tables[s].long(), n).float()  # [n, kv_dim]
        pos = torch.arange(n - (end - start), n, device=q.device)
        visible = torch.arange(n, device=q.device)[None, :] <= pos[:, None]  # [Q, n]
        scores = torch.einsum("qhd,kd->hqk", q[start:end].float(), keys) * scale
        probs = scores.masked_fill(~visible, float("-inf")).softmax(dim=-1)
        out[start:end] = torch.einsum("hqk,kr->qhr", probs, keys[:, :kv_lora_rank]).to(q.dtype)
    return out
