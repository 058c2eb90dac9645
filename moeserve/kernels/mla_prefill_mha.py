"""MLA prefill in the MHA form: expand K/V from the cached latents, then flash attention.

The absorbed form (`mla_prefill`) scores 576-wide latents and accumulates 512-wide values per
head, which suits decode (one query, read the cache once) but costs (576 + 512) / (192 + 128) =
3.4x the attention FLOPs of expanding K and V per head with kv_b_proj first. For a long run of
new tokens the expansion (2 x L x kv_lora_rank x H x (nope + v) FLOPs) is cheap next to that,
and the attention itself becomes ordinary causal MHA that torch's SDPA runs on its flash /
memory-efficient kernels (FlashAttention-2 class on Hopper). DeepSeek's and vLLM's MLA
backends make the same split: MHA for prefill, absorbed for decode.

Queries may follow a cached prefix, so the causal mask is aligned to the bottom right (query i
of Q new tokens after P cached ones sees keys 0..P + i).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["gather_latents", "mla_prefill_mha", "mha_worth_it", "expand_kv", "causal_mha"]


def mha_worth_it(
    query_len: int, seq_len: int, num_heads: int, head_bytes: int, max_expanded_bytes: int = 1 << 30
) -> bool:
    """Whether a sequence's new tokens should take the MHA form.

    Expanding K/V reads every cached token once per step; that pays when the step has many new
    tokens (prefill, long chunks) and the expansion fits ``max_expanded_bytes``.
    """
    return query_len >= 16 and seq_len * num_heads * head_bytes <= max_expanded_bytes


def gather_latents(
    layer_cache: torch.Tensor, block_row: torch.Tensor, seq_len: int
) -> torch.Tensor:
    """[seq_len, kv_dim] latents of one sequence from its block-table row."""
    block_size = layer_cache.shape[1]
    pages = block_row[: -(-seq_len // block_size)]
    return layer_cache[pages].flatten(0, 1)[:seq_len]


def mla_prefill_mha(
    query: torch.Tensor,
    latents: torch.Tensor,
    kv_b_weight: torch.Tensor,
    scale: float,
    kv_lora_rank: int,
    v_head_dim: int,
) -> torch.Tensor:
    """Causal attention of Q new tokens over one sequence's L cached latents (theirs last).

    query: [Q, H, nope + rope], rope part already rotated, any strides with a contiguous last
    dim (the model passes its projection output as is). latents: [L, kv_lora_rank + rope]
    (normalised c_kv, rotated k_pe) as in the cache. kv_b_weight: [H * (nope + v),
    kv_lora_rank]. Returns [Q, H, v_head_dim] in query's dtype.
    """
    num_q, num_heads, head_dim = query.shape
    seq_len, rope = latents.shape[0], latents.shape[1] - kv_lora_rank
    if num_q > seq_len:
        raise ValueError(f"{num_q} queries but only {seq_len} cached tokens")
    key, value = expand_kv(latents.to(query.dtype), kv_b_weight, num_heads, head_dim - rope,
                           kv_lora_rank, v_head_dim)
    return causal_mha(query, key, value, scale)


def expand_kv(latents: torch.Tensor, kv_b_weight: torch.Tensor, num_heads: int, nope: int,
              kv_lora_rank: int, v_head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(key [L, H, nope + rope], value [L, H, v]) of L latents [L, kv_lora_rank + rope]: one
    GEMM through kv_b_proj, the shared rotated k_pe broadcast to every head."""
    seq_len = latents.shape[0]
    c_kv, k_pe = latents[:, :kv_lora_rank], latents[:, kv_lora_rank:]
    kv = F.linear(c_kv, kv_b_weight).view(seq_len, num_heads, nope + v_head_dim)
    k_nope, value = kv.split([nope, v_head_dim], dim=-1)
    key = torch.cat([k_nope, k_pe[:, None, :].expand(-1, num_heads, -1)], dim=-1)
    return key, value


def causal_mha(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               scale: float) -> torch.Tensor:
    """[Q, H, v]: Q queries, the last Q of the L keys' positions (causal, bottom right)."""
    num_q, seq_len = query.shape[0], key.shape[0]
    # [1, H, Q|L, D] views; SDPA takes any strides with a contiguous last dim.
    query, key, value = (t.transpose(0, 1).unsqueeze(0) for t in (query, key, value))
    if num_q == seq_len:
        out = F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scale)
    else:
        from torch.nn.attention.bias import causal_lower_right

        mask = causal_lower_right(num_q, seq_len)
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scale)
    return out[0].transpose(0, 1)


def mla_prefill_mha_packed(
    query: torch.Tensor,
    latents: torch.Tensor,
    kv_b_weight: torch.Tensor,
    scale: float,
    kv_lora_rank: int,
    v_head_dim: int,
    bounds: list[tuple[int, int]],
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """`mla_prefill_mha` of several whole new prompts packed back to back: query [N, H, D]
    and latents [N, kv_dim] hold them in the same order, bounds are each prompt's [start,
    end) within the N. K/V are expanded for all N in one GEMM; each prompt then attends to
    itself (causal). Writes into ``out`` [N, H, v] when given; returns it."""
    num_heads, head_dim = query.shape[1:]
    rope = latents.shape[1] - kv_lora_rank
    key, value = expand_kv(latents.to(query.dtype), kv_b_weight, num_heads, head_dim - rope,
                           kv_lora_rank, v_head_dim)
    if out is None:
        out = query.new_empty(query.shape[0], num_heads, v_head_dim)
    for a, b in bounds:
        out[a:b] = causal_mha(query[a:b], key[a:b], value[a:b], scale)
    return out
