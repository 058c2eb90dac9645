"""Multi-head Latent Attention over the paged latent KV cache.

The cache holds one vector per token: the normalised compressed KV (kv_lora_rank) followed by
the rotated shared key (qk_rope_head_dim). Two equivalent ways to attend over it:
- absorbed (serving path): W_UK is folded into the query and W_UV applied after attention, so
  attention runs in the latent space and K/V are never expanded;
- naive (test oracle): K and V are expanded per head from the latents with kv_b_proj.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moeserve.common.model_config import ModelConfig
from moeserve.worker.model.attention_metadata import AttentionMetadata
from moeserve.worker.model.attention_split import AttentionSplit, plan_split
from moeserve.worker.model.forward_context import kernels_on
from moeserve.worker.model.fp8_linear import Fp8Linear
from moeserve.worker.model.layers import RMSNorm, linear, make_linear
from moeserve.worker.model.rotary import RotaryEmbedding

__all__ = ["MLAttention", "write_latents", "gather_context", "pad_queries", "causal_mask"]


def write_latents(layer_cache: torch.Tensor, latents: torch.Tensor, meta: AttentionMetadata):
    """layer_cache: [num_blocks, block_size, kv_dim] (a strided view); latents: [T, kv_dim]."""
    blocks = meta.slot_mapping // meta.block_size
    offsets = meta.slot_mapping % meta.block_size
    layer_cache[blocks, offsets] = latents.to(layer_cache.dtype)


def gather_context(layer_cache: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
    """[S, K, kv_dim] latents of every sequence, K = max_seq_len rounded up to whole blocks."""
    num_blocks = -(-meta.max_seq_len // meta.block_size)
    ctx = layer_cache[meta.block_tables[:, :num_blocks]]
    return ctx.flatten(1, 2)


def pad_queries(x: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
    """[T, ...] flat new tokens -> [S, max_query_len, ...] zero-padded per sequence."""
    out = x.new_zeros(meta.num_seqs, meta.max_query_len, *x.shape[1:])
    out[meta.token_seq_idx, meta.token_query_idx] = x
    return out


def causal_mask(meta: AttentionMetadata, num_keys: int) -> torch.Tensor:
    """[S, 1, max_query_len, K] bool: query i of sequence s sees keys at positions <= its own."""
    query_lens = meta.query_start_loc[1:] - meta.query_start_loc[:-1]
    device = meta.seq_lens.device
    first_pos = (meta.seq_lens - query_lens)[:, None]
    pos = first_pos + torch.arange(meta.max_query_len, device=device)[None, :]
    keys = torch.arange(num_keys, device=device)
    return (keys[None, None, :] <= pos[:, :, None]).unsqueeze(1)


class MLAttention(nn.Module):
    """``fp8``: the projections keep the checkpoint's fp8 weights (Fp8Linear), except
    kv_b_proj, which the loader dequantizes: the absorbed path splits it per head into W_UK and
    W_UV for batched GEMMs over heads (and prefill expands K/V with it), and it is small (32
    MiB a V3 layer in bf16 against 16 MiB in fp8), as in DeepSeek's own inference code."""

    def __init__(self, config: ModelConfig, impl: str = "absorbed", fp8: bool = False):
        super().__init__()
        c = config
        self.num_heads = c.num_attention_heads
        self.q_lora_rank = c.q_lora_rank
        self.kv_lora_rank = c.kv_lora_rank
        self.qk_nope_head_dim = c.qk_nope_head_dim
        self.qk_rope_head_dim = c.qk_rope_head_dim
        self.v_head_dim = c.v_head_dim
        self.softmax_scale = c.softmax_scale
        self.impl = impl
        h, nh = c.hidden_size, c.num_attention_heads
        block = c.fp8_block_size if fp8 else None
        if c.q_lora_rank is None:
            self.q_proj = make_linear(h, nh * c.qk_head_dim, fp8_block=block)
        else:
            self.q_a_proj = make_linear(h, c.q_lora_rank, c.attention_bias, block)
            self.q_a_layernorm = RMSNorm(c.q_lora_rank, c.rms_norm_eps)
            self.q_b_proj = make_linear(c.q_lora_rank, nh * c.qk_head_dim, fp8_block=block)
        self.kv_a_proj_with_mqa = make_linear(h, c.kv_dim, c.attention_bias, block)
        self.kv_a_layernorm = RMSNorm(c.kv_lora_rank, c.rms_norm_eps)
        self.kv_b_proj = linear(c.kv_lora_rank, nh * (c.qk_nope_head_dim + c.v_head_dim))
        self.o_proj = make_linear(nh * c.v_head_dim, h, c.attention_bias, block)
        # (module computing both, rows of the first) once fuse_input_projections ran; kept in
        # a tuple so it is not registered (its parameters are the two projections' storage)
        self.fused_input: tuple[nn.Module, int] | None = None

    def fuse_input_projections(self) -> None:
        """Run the two projections of the layer input (q_proj or q_a_proj, and
        kv_a_proj_with_mqa) as one GEMM: one launch instead of two per layer and step. Their
        parameters become row views of the joint weight, so names and loading are unchanged."""
        first = self.q_proj if self.q_lora_rank is None else self.q_a_proj
        second = self.kv_a_proj_with_mqa
        if self.fused_input is not None or (first.bias is None) != (second.bias is None):
            return
        rows = first.weight.shape[0]
        if isinstance(first, Fp8Linear) or isinstance(second, Fp8Linear):
            # fp8: scales stack with the weights where q's rows end on a block boundary
            # (V3: 1536 of 128-row blocks); else two GEMMs as before
            both = (Fp8Linear.stacked(first, second)
                    if isinstance(first, Fp8Linear) and isinstance(second, Fp8Linear) else None)
            if both is not None:
                self.fused_input = (both, rows)
            return
        weight = torch.cat([first.weight.data, second.weight.data])
        bias = None if first.bias is None else torch.cat([first.bias.data, second.bias.data])
        for module, part in ((first, slice(0, rows)), (second, slice(rows, None))):
            module.weight = nn.Parameter(weight[part], requires_grad=False)
            if bias is not None:
                module.bias = nn.Parameter(bias[part], requires_grad=False)
        joint = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None,
                          device="meta")
        joint.weight = nn.Parameter(weight, requires_grad=False)
        if bias is not None:
            joint.bias = nn.Parameter(bias, requires_grad=False)
        self.fused_input = (joint, rows)

    def forward(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        rotary: RotaryEmbedding,
        layer_cache: torch.Tensor,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        """x: [T, hidden]; layer_cache: [num_blocks, block_size, kv_dim]. Returns [T, hidden]."""
        if kernels_on(x):  # the step's backend; the torch path is the reference
            return self.o_proj(self._kernel_path(x, positions, rotary, layer_cache, meta)
                               .flatten(1))
        num_tokens = x.shape[0]
        if self.q_lora_rank is None:
            q = self.q_proj(x)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q = q.view(num_tokens, self.num_heads, -1)
        q_nope, q_pe = q.split([self.qk_nope_head_dim, self.qk_rope_head_dim], dim=-1)
        q_pe = rotary(q_pe, positions)
        kv = self.kv_a_proj_with_mqa(x)
        c_kv, k_pe = kv.split([self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)
        latents = torch.cat([self.kv_a_layernorm(c_kv), rotary(k_pe, positions)], dim=-1)
        write_latents(layer_cache, latents, meta)
        ctx = gather_context(layer_cache, meta).to(x.dtype)
        mask = causal_mask(meta, ctx.shape[1])
        if self.impl == "naive":
            out = self._naive(q_nope, q_pe, ctx, mask, meta)
        else:
            out = self._absorbed(q_nope, q_pe, ctx, mask, meta)
        return self.o_proj(out.flatten(1))

    def _kernel_path(self, x, positions, rotary, layer_cache, meta) -> torch.Tensor:
        """Triton/FlashInfer, [T, H, v] before o_proj: one GEMM for both input projections,
        one kernel for kv norm + both rotaries + cache write, then paged latent attention
        straight from the block table (no gathered, padded or concatenated copies)."""
        from moeserve import kernels  # imports triton: only on the kernel path

        if self.fused_input is not None:
            joint, rows = self.fused_input
            both = joint(x)
            q, kv = both[:, :rows], both[:, rows:]
        else:
            q = self.q_proj(x) if self.q_lora_rank is None else self.q_a_proj(x)
            kv = self.kv_a_proj_with_mqa(x)
        if self.q_lora_rank is not None:
            q = self.q_b_proj(self.q_a_layernorm(q))
        q = q.view(x.shape[0], self.num_heads, -1)
        q_nope, q_pe = q.split([self.qk_nope_head_dim, self.qk_rope_head_dim], dim=-1)
        c_kv, k_pe = kv.split([self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)
        kernels.rope_cache_write(
            c_kv, k_pe, positions, rotary.cos_cache, rotary.sin_cache, meta.slot_mapping,
            layer_cache, norm_weight=self.kv_a_layernorm.weight, eps=self.kv_a_layernorm.eps,
            interleave=rotary.interleave, q_pe=q_pe,
        )
        if meta.max_query_len == 1:
            o = kernels.mla_decode(self._latent_query(q_nope), layer_cache, meta.block_tables,
                                   meta.seq_lens, self.softmax_scale, self.kv_lora_rank,
                                   q_pe=q_pe)
            return self._unabsorb(o)
        return self._prefill_kernels(q, layer_cache, meta)

    def _prefill_kernels(self, query, layer_cache, meta) -> torch.Tensor:
        """query: [T, H, nope + rope], rope part rotated. Sequences with many new tokens in the
        MHA form (kernels/mla_prefill_mha.py), the rest (decode tokens of a mixed batch, short
        chunks) absorbed over the paged cache; which is which is planned once a step
        (attention_split.py)."""
        from moeserve import kernels
        from moeserve.kernels.mla_prefill_mha import gather_latents

        q_nope, q_pe = query.split([self.qk_nope_head_dim, self.qk_rope_head_dim], dim=-1)
        if meta.split is None:
            meta.split = plan_split(meta, self._mha_worth_it)
        split: AttentionSplit = meta.split
        if not split.mha and split.prompts is None:
            return self._absorbed_kernel(q_nope, q_pe, layer_cache, meta.block_tables,
                                         meta.seq_lens, meta.query_start_loc, meta.max_query_len)
        out = q_nope.new_empty(q_nope.shape[0], self.num_heads, self.v_head_dim)
        w_kv_b = self.kv_b_proj.weight
        if split.fresh is not None:  # whole new prompts: their K/V expanded in one GEMM
            base = split.fresh.start
            kernels.mla_prefill_mha_packed(
                query[split.fresh], layer_cache[split.fresh_slots], w_kv_b, self.softmax_scale,
                self.kv_lora_rank, self.v_head_dim,
                [(a - base, b - base) for a, b, _ in split.mha[: split.num_packed]],
                out=out[split.fresh])
        for a, b, s in split.mha[split.num_packed:]:  # over a cached prefix: one by one
            latents = gather_latents(layer_cache, meta.block_tables[s], meta.seq_lens_host[s])
            out[a:b] = kernels.mla_prefill_mha(query[a:b], latents, w_kv_b, self.softmax_scale,
                                               self.kv_lora_rank, self.v_head_dim)
        if split.rest is not None:
            rest_nope, rest_pe = q_nope[split.rest], q_pe[split.rest]
            if split.rest_decode:  # a mixed step's decode rows: the decode kernel
                o = self._unabsorb(kernels.mla_decode(
                    self._latent_query(rest_nope), layer_cache, split.rest_tables,
                    split.rest_seq_lens, self.softmax_scale, self.kv_lora_rank, q_pe=rest_pe))
            else:
                o = self._absorbed_kernel(rest_nope, rest_pe, layer_cache, split.rest_tables,
                                          split.rest_seq_lens, split.rest_starts,
                                          split.rest_max_query_len)
            out[split.rest] = o
        if split.prompts is not None:  # a captured mixed step's prompts, absorbed
            region = split.prompts
            o = self._absorbed_kernel(q_nope[region.rows], q_pe[region.rows], layer_cache,
                                      region.tables, region.seq_lens, region.starts,
                                      region.max_query_len)
            # padding rows belong to no sequence: the kernel leaves them unwritten
            out[region.rows] = torch.where(region.valid[:, None, None], o, 0)
        return out

    def _mha_worth_it(self, query_len: int, seq_len: int) -> bool:
        from moeserve.kernels.mla_prefill_mha import mha_worth_it

        head_bytes = (self.qk_nope_head_dim + self.v_head_dim) * self.kv_b_proj.weight.itemsize
        return mha_worth_it(query_len, seq_len, self.num_heads, head_bytes)

    def _absorbed_kernel(self, q_nope, q_pe, layer_cache, block_tables, seq_lens,
                         query_start_loc, max_query_len) -> torch.Tensor:
        from moeserve import kernels

        o = kernels.mla_prefill(self._latent_query(q_nope), layer_cache, block_tables,
                                seq_lens, query_start_loc, max_query_len, self.softmax_scale,
                                self.kv_lora_rank, q_pe=q_pe)
        return self._unabsorb(o)

    def _unabsorb(self, o_latent: torch.Tensor) -> torch.Tensor:
        """[T, H, kv_lora_rank] attention output in latent space -> [T, H, v]: W_UV applied.
        One batched GEMM over heads written straight into [T, H, v] (o_proj's input layout)."""
        w_uv = self._kv_b_weights()[1]
        out = o_latent.new_empty(o_latent.shape[0], self.num_heads, self.v_head_dim)
        torch.bmm(o_latent.transpose(0, 1), w_uv.transpose(1, 2), out=out.transpose(0, 1))
        return out

    def _latent_query(self, q_nope: torch.Tensor) -> torch.Tensor:
        """[T, H, nope] -> [T, H, kv_lora_rank]: W_UK folded into the query (one batched GEMM
        over heads; the result is a [T, H, R] view of an [H, T, R] tensor)."""
        return torch.bmm(q_nope.transpose(0, 1), self._kv_b_weights()[0]).transpose(0, 1)

    def _absorb_query(self, q_nope: torch.Tensor, q_pe: torch.Tensor) -> torch.Tensor:
        """[T, H, kv_lora_rank + rope]: W_UK folded into the query, so it scores latents."""
        return torch.cat([self._latent_query(q_nope), q_pe], dim=-1)

    def _kv_b_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        w = self.kv_b_proj.weight.view(self.num_heads, -1, self.kv_lora_rank)
        return w[:, : self.qk_nope_head_dim], w[:, self.qk_nope_head_dim :]

    def _absorbed(self, q_nope, q_pe, ctx, mask, meta) -> torch.Tensor:
        query = pad_queries(self._absorb_query(q_nope, q_pe), meta).transpose(1, 2)
        key = ctx.unsqueeze(1).expand(-1, self.num_heads, -1, -1)
        value = key[..., : self.kv_lora_rank]
        o = F.scaled_dot_product_attention(query, key, value, attn_mask=mask,
                                           scale=self.softmax_scale)
        return self._unabsorb(o.transpose(1, 2)[meta.token_seq_idx, meta.token_query_idx])

    def _naive(self, q_nope, q_pe, ctx, mask, meta) -> torch.Tensor:
        s, k = ctx.shape[:2]
        c_kv, k_pe = ctx.split([self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)
        kv = self.kv_b_proj(c_kv).view(s, k, self.num_heads, -1)
        k_nope, v = kv.split([self.qk_nope_head_dim, self.v_head_dim], dim=-1)
        key = torch.cat([k_nope, k_pe.unsqueeze(2).expand(-1, -1, self.num_heads, -1)], -1)
        query = pad_queries(torch.cat([q_nope, q_pe], dim=-1), meta).transpose(1, 2)
        o = F.scaled_dot_product_attention(query, key.transpose(1, 2), v.transpose(1, 2),
                                           attn_mask=mask, scale=self.softmax_scale)
        return o.transpose(1, 2)[meta.token_seq_idx, meta.token_query_idx]
