"""Pieces the absorbed MLA kernels (`mla_decode`, `mla_prefill`) share: reading one tile of
keys from the paged latent cache and the online-softmax update over it.

Both walk a sequence's latents tile by tile (keys: the whole latent [c_kv, k_pe]; values: c_kv)
and keep a running max, sum and accumulator in base 2; they differ only in which queries a
program holds and which keys each may see.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["LOG2E", "load_latent_tile", "online_softmax_step", "split_query"]

LOG2E = 1.4426950408889634  # scores are scaled by scale * LOG2E and exponentiated with exp2


@triton.jit
def load_latent_tile(cache_ptr, block_table_row, offs_n, n_ok, block_size, stride_cb, stride_ct,
                     offs_r, r_ok, offs_pe, pe_ok, KV_LORA: tl.constexpr):
    """(c_kv [BLOCK_N, BLOCK_R], k_pe [BLOCK_N, BLOCK_PE]) of keys ``offs_n`` of one sequence,
    whose block-table row starts at ``block_table_row``. A tile may straddle pages, so every
    key looks its page up (cheap: the table row is in L1)."""
    page = tl.load(block_table_row + offs_n // block_size, mask=n_ok, other=0)
    rows = cache_ptr + page.to(tl.int64) * stride_cb + (offs_n % block_size) * stride_ct
    kv = tl.load(rows[:, None] + offs_r[None, :], mask=n_ok[:, None] & r_ok[None, :], other=0.0)
    k_pe = tl.load(rows[:, None] + KV_LORA + offs_pe[None, :],
                   mask=n_ok[:, None] & pe_ok[None, :], other=0.0)
    return kv, k_pe


@triton.jit
def online_softmax_step(s, m_i, l_i, acc, kv):
    """Fold one tile of base-2 scores ``s`` [rows, BLOCK_N] (-inf where a key is not seen) and
    its values ``kv`` into the running max ``m_i``, sum ``l_i`` and accumulator ``acc``."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(kv.dtype), kv)
    return m_new, l_i, acc


def split_query(q: torch.Tensor, q_pe: torch.Tensor | None, layer_cache: torch.Tensor,
                block_tables: torch.Tensor, kv_lora_rank: int,
                rows: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(latent query [N, H, kv_lora_rank], q_pe [N, H, rope]) of an MLA kernel's arguments: the
    joint query split, or the two given apart; ValueError naming what does not fit the cache.
    ``rows`` names the first dim in messages (S sequences, T tokens)."""
    if q_pe is None:
        q, q_pe = q[..., :kv_lora_rank], q[..., kv_lora_rank:]
    elif q_pe.shape[:2] != q.shape[:2] or q.shape[2] != kv_lora_rank:
        raise ValueError(f"q {tuple(q.shape)} / q_pe {tuple(q_pe.shape)} must be [{rows}, H, "
                         f"{kv_lora_rank}] / [{rows}, H, rope]")
    kv_dim = q.shape[2] + q_pe.shape[2]
    if layer_cache.dim() != 3 or layer_cache.shape[2] != kv_dim or kv_dim <= kv_lora_rank:
        raise ValueError(f"q {tuple(q.shape)} and cache {tuple(layer_cache.shape)} disagree "
                         f"with kv_lora_rank={kv_lora_rank}")
    if (q.stride(-1) != 1 or q_pe.stride(-1) != 1 or layer_cache.stride(-1) != 1
            or block_tables.stride(-1) != 1):
        raise ValueError("q, q_pe, layer_cache and block_tables need a contiguous last dim")
    if not q.dtype == q_pe.dtype == layer_cache.dtype:
        raise ValueError(f"q is {q.dtype} but the cache is {layer_cache.dtype}")
    return q, q_pe
