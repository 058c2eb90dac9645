"""Write a step's new latents into the paged MLA cache in one kernel.

Per new token: optionally RMS-normalise c_kv (kv_a_layernorm), rotate the shared key k_pe by
its position, and store [c_kv, k_pe] at its slot; optionally also rotate the token's query
rope parts (every head) in place. Unfused this is a norm, two rotaries (~6 launches each), a
concat and an indexed copy per layer per step.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moeserve.kernels.rmsnorm import rmsnorm_ref
from moeserve.ops import rotate

__all__ = ["rope_cache_write", "rope_cache_write_ref", "rope_cache_write_kernel"]


@triton.jit
def rope_cache_write_kernel(
    c_kv_ptr, k_pe_ptr, positions_ptr, cos_ptr, sin_ptr, slots_ptr, norm_w_ptr, cache_ptr,
    q_pe_ptr, block_size, eps, num_heads,
    stride_c, stride_p, stride_cos, stride_cb, stride_ct, stride_qt, stride_qh,
    KV_LORA: tl.constexpr, ROPE: tl.constexpr, BLOCK_R: tl.constexpr,
    HALF_BLOCK: tl.constexpr, HAS_NORM: tl.constexpr, INTERLEAVE: tl.constexpr,
    HAS_Q: tl.constexpr, BLOCK_H: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    offs_i = tl.arange(0, HALF_BLOCK)
    i_ok = offs_i < ROPE // 2
    pos = tl.load(positions_ptr + token)
    cos = tl.load(cos_ptr + pos * stride_cos + offs_i, mask=i_ok, other=0.0)
    sin = tl.load(sin_ptr + pos * stride_cos + offs_i, mask=i_ok, other=0.0)
    if INTERLEAVE:  # DeepSeek: pairs (x[2i], x[2i+1])
        first = 2 * offs_i
        second = 2 * offs_i + 1
    else:  # NeoX: halves (x[i], x[i + ROPE/2])
        first = offs_i
        second = offs_i + ROPE // 2
    if HAS_Q:  # every token, padding included: its query is computed (and discarded) anyway
        heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
        q_mask = (heads < num_heads)[:, None] & i_ok[None, :]
        q_rows = q_pe_ptr + token * stride_qt + heads[:, None] * stride_qh
        q1 = tl.load(q_rows + first[None, :], mask=q_mask, other=0.0).to(tl.float32)
        q2 = tl.load(q_rows + second[None, :], mask=q_mask, other=0.0).to(tl.float32)
        tl.store(q_rows + first[None, :], (q1 * cos[None, :] - q2 * sin[None, :]).to(
            q_pe_ptr.dtype.element_ty), mask=q_mask)
        tl.store(q_rows + second[None, :], (q2 * cos[None, :] + q1 * sin[None, :]).to(
            q_pe_ptr.dtype.element_ty), mask=q_mask)
    # The query's heads are spread over programs (grid axis 1; V3's 128 heads in one program
    # took 19 us a layer at batch 64); the first of a token's programs writes its latent.
    slot = tl.load(slots_ptr + token)
    if slot < 0 or tl.program_id(1) > 0:  # padding tokens of a CUDA-graph batch have no slot
        return
    dst = cache_ptr + (slot // block_size) * stride_cb + (slot % block_size) * stride_ct
    offs_r = tl.arange(0, BLOCK_R)
    r_ok = offs_r < KV_LORA
    c = tl.load(c_kv_ptr + token * stride_c + offs_r, mask=r_ok, other=0.0)
    if HAS_NORM:
        cf = c.to(tl.float32)
        inv_rms = tl.rsqrt(tl.sum(cf * cf, 0) / KV_LORA + eps)
        normed = (cf * inv_rms).to(c_kv_ptr.dtype.element_ty).to(tl.float32)
        w = tl.load(norm_w_ptr + offs_r, mask=r_ok, other=0.0).to(tl.float32)
        c = (normed * w).to(c_kv_ptr.dtype.element_ty)
    tl.store(dst + offs_r, c.to(cache_ptr.dtype.element_ty), mask=r_ok)

    x1 = tl.load(k_pe_ptr + token * stride_p + first, mask=i_ok, other=0.0).to(tl.float32)
    x2 = tl.load(k_pe_ptr + token * stride_p + second, mask=i_ok, other=0.0).to(tl.float32)
    # Rounded to k_pe's dtype first, as the unfused rotary's output would be.
    out1 = (x1 * cos - x2 * sin).to(k_pe_ptr.dtype.element_ty)
    out2 = (x2 * cos + x1 * sin).to(k_pe_ptr.dtype.element_ty)
    tl.store(dst + KV_LORA + first, out1.to(cache_ptr.dtype.element_ty), mask=i_ok)
    tl.store(dst + KV_LORA + second, out2.to(cache_ptr.dtype.element_ty), mask=i_ok)


def rope_cache_write(
    c_kv: torch.Tensor,
    k_pe: torch.Tensor,
    positions: torch.Tensor,
    cos_cache: torch.Tensor,
    sin_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    layer_cache: torch.Tensor,
    norm_weight: torch.Tensor | None = None,
    eps: float = 1e-6,
    interleave: bool = True,
    q_pe: torch.Tensor | None = None,
) -> None:
    """Store [rmsnorm(c_kv), rotary(k_pe)] of each new token at its cache slot, in place.

    c_kv: [T, R] and k_pe: [T, P], bf16/fp16/fp32, rows may be strided (e.g. the two halves
    of kv_a_proj_with_mqa's output), last dim contiguous. positions: [T] int64.
    cos_cache / sin_cache: [max_positions, P/2] float32 (RotaryEmbedding's buffers, YaRN
    attention factor included). slot_mapping: [T] int64, block * block_size + offset; < 0
    skips the token. layer_cache: [num_blocks, block_size, R + P], strided, written in place.
    norm_weight: [R] kv_a_layernorm weight, or None when c_kv is already normalised.
    interleave: rotate adjacent pairs (DeepSeek) rather than halves (NeoX).
    q_pe: [T, heads, P] query rope parts (a strided view of the query projection), rotated in
    place, padding tokens included; None leaves queries alone.
    """
    tokens, rank = c_kv.shape
    rope = k_pe.shape[1]
    if k_pe.shape[0] != tokens or layer_cache.dim() != 3 or layer_cache.shape[2] != rank + rope:
        raise ValueError(f"c_kv {tuple(c_kv.shape)}, k_pe {tuple(k_pe.shape)} do not fill a "
                         f"cache of {tuple(layer_cache.shape)}")
    if positions.shape != (tokens,) or slot_mapping.shape != (tokens,) or rope % 2:
        raise ValueError(f"positions {tuple(positions.shape)} / slot_mapping "
                         f"{tuple(slot_mapping.shape)} must be [{tokens}] and P even")
    if cos_cache.shape[1] != rope // 2 or sin_cache.shape != cos_cache.shape:
        raise ValueError(f"cos/sin caches {tuple(cos_cache.shape)} must be [max_pos, {rope // 2}]")
    if norm_weight is not None and norm_weight.shape != (rank,):
        raise ValueError(f"norm_weight {tuple(norm_weight.shape)} must be [{rank}]")
    if q_pe is not None and (q_pe.dim() != 3 or q_pe.shape[0] != tokens
                             or q_pe.shape[2] != rope):
        raise ValueError(f"q_pe {tuple(q_pe.shape)} must be [{tokens}, heads, {rope}]")
    for name, t in (("c_kv", c_kv), ("k_pe", k_pe), ("layer_cache", layer_cache),
                    ("cos_cache", cos_cache), ("sin_cache", sin_cache), ("q_pe", q_pe)):
        if t is not None and t.stride(-1) != 1:
            raise ValueError(f"{name} needs a contiguous last dim")
    if tokens == 0:
        return
    q = q_pe if q_pe is not None else k_pe
    heads = q_pe.shape[1] if q_pe is not None else 1
    block_h = min(triton.next_power_of_2(heads), 16)
    rope_cache_write_kernel[(tokens, triton.cdiv(heads, block_h))](
        c_kv, k_pe, positions, cos_cache, sin_cache, slot_mapping,
        norm_weight if norm_weight is not None else c_kv, layer_cache, q,
        layer_cache.shape[1], eps, heads,
        c_kv.stride(0), k_pe.stride(0), cos_cache.stride(0), layer_cache.stride(0),
        layer_cache.stride(1), q.stride(0), q.stride(1) if q_pe is not None else 0,
        KV_LORA=rank, ROPE=rope, BLOCK_R=triton.next_power_of_2(rank),
        HALF_BLOCK=max(2, triton.next_power_of_2(rope // 2)), HAS_NORM=norm_weight is not None,
        INTERLEAVE=interleave, HAS_Q=q_pe is not None,
        BLOCK_H=block_h, num_warps=4,
    )


def rope_cache_write_ref(
    c_kv: torch.Tensor,
    k_pe: torch.Tensor,
    positions: torch.Tensor,
    cos_cache: torch.Tensor,
    sin_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    layer_cache: torch.Tensor,
    norm_weight: torch.Tensor | None = None,
    eps: float = 1e-6,
    interleave: bool = True,
    q_pe: torch.Tensor | None = None,
) -> None:
    """Plain-torch `rope_cache_write` (same arguments), mla.py's norm/rotary/write_latents."""
    if norm_weight is not None:
        c_kv = rmsnorm_ref(c_kv, norm_weight, eps)
    cos, sin = cos_cache[positions], sin_cache[positions]
    if q_pe is not None:
        q_pe.copy_(rotate(q_pe, cos, sin, interleave))
    rot = rotate(k_pe, cos, sin, interleave)
    latents = torch.cat([c_kv, rot], dim=-1).to(layer_cache.dtype)
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    block_size = layer_cache.shape[1]
    layer_cache[slots // block_size, slots % block_size] = latents[keep]
