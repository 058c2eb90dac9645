"""MLA prefill in the MHA form (expanded K/V + SDPA) against the absorbed-form reference.

The two forms are different arithmetic for the same attention, so agreement checks the
expansion through kv_b_proj, the rope part of the keys and the bottom-right causal alignment
after a cached prefix. The model-level test runs `MLAttention._prefill_kernels` on a mixed
batch: long prompts take the MHA form, a decode token and a short chunk the absorbed kernel.
"""

from __future__ import annotations

import pytest
import torch

from moeserve.common.model_config import ModelConfig
from moeserve.kernels.mla_prefill import mla_prefill_ref
from moeserve.kernels.mla_prefill_mha import gather_latents, mha_worth_it, mla_prefill_mha
from moeserve.worker.model.attention_metadata import AttentionMetadata
from moeserve.worker.model.mla import MLAttention, causal_mask, gather_context
from tests.kernels.helpers import paged_cache, rel_err, tolerance


def _absorbed_ref(q_nope, q_pe, layer_cache, tables, lens, starts, w_kv_b, scale, rank, nope):
    """mla_prefill_ref with W_UK folded into the query and W_UV applied after."""
    heads = q_nope.shape[1]
    w = w_kv_b.view(heads, -1, rank).float()
    w_uk, w_uv = w[:, :nope], w[:, nope:]
    q = torch.cat([torch.einsum("thd,hdr->thr", q_nope.float(), w_uk), q_pe.float()], -1)
    max_q = int((starts[1:] - starts[:-1]).max())
    o = mla_prefill_ref(q, layer_cache.float(), tables, lens, starts, max_q, scale, rank)
    return torch.einsum("thr,hvr->thv", o, w_uv)


# (prefix, new tokens, block size, heads, rank, nope, rope, v, dtype, seed)
CASES = [
    (0, 40, 16, 3, 32, 16, 8, 12, torch.float32, 0),
    (37, 21, 16, 4, 32, 16, 8, 16, torch.float32, 1),
    (64, 64, 32, 2, 64, 32, 16, 32, torch.bfloat16, 2),
]


@pytest.mark.parametrize("prefix,new,block_size,heads,rank,nope,rope,v,dtype,seed", CASES)
def test_mha_form_matches_absorbed_reference(prefix, new, block_size, heads, rank, nope, rope,
                                              v, dtype, seed, device):  # fmt: skip
    gen = torch.Generator().manual_seed(seed)
    seq_len = prefix + new
    cache, tables, lens = paged_cache([seq_len], block_size, rank + rope, dtype, device, gen)
    layer_cache = cache[:, 1]
    # one projection output, nope and rope parts of each head side by side, as the model has it
    query = torch.randn(new, heads, nope + rope, generator=gen).to(dtype).to(device)
    q_nope, q_pe = query.split([nope, rope], -1)
    w_kv_b = (torch.randn(heads * (nope + v), rank, generator=gen) / rank**0.5).to(dtype)
    w_kv_b = w_kv_b.to(device)
    latents = gather_latents(layer_cache, tables[0].long(), seq_len)
    out = mla_prefill_mha(query, latents, w_kv_b, 0.2, rank, v)
    starts = torch.tensor([0, new], device=device)
    ref = _absorbed_ref(q_nope, q_pe, layer_cache, tables, lens, starts, w_kv_b, 0.2, rank, nope)
    assert out.shape == (new, heads, v) and out.dtype == dtype
    assert rel_err(out, ref) < tolerance(dtype)


def test_more_queries_than_keys_is_refused():
    latents = torch.zeros(4, 10)
    with pytest.raises(ValueError, match="5 queries but only 4 cached tokens"):
        mla_prefill_mha(torch.zeros(5, 2, 5), latents, torch.zeros(2 * 7, 8), 1.0, 8, 4)


def test_split_rule():
    assert mha_worth_it(512, 512, 16, 512)
    assert not mha_worth_it(1, 4096, 16, 512)  # a decode token: absorbed
    assert not mha_worth_it(8, 8, 16, 512)  # a short chunk: absorbed
    assert not mha_worth_it(4096, 200_000, 128, 512)  # expansion over 1 GiB: absorbed


def test_model_prefill_split_matches_model_reference(device):
    """Mixed batch through MLAttention._prefill_kernels == the model's torch absorbed path."""
    cfg = ModelConfig.from_dict({
        "architectures": ["DeepseekV3ForCausalLM"], "vocab_size": 64, "hidden_size": 32,
        "intermediate_size": 64,
        "moe_intermediate_size": 16, "num_hidden_layers": 1, "num_attention_heads": 4,
        "q_lora_rank": None, "kv_lora_rank": 32, "qk_nope_head_dim": 16,
        "qk_rope_head_dim": 8, "v_head_dim": 16, "n_routed_experts": None,
        "max_position_embeddings": 512, "rms_norm_eps": 1e-6,
    })  # fmt: skip
    torch.manual_seed(0)
    attn = MLAttention(cfg).to(device)
    context_lens, query_lens, block_size = [0, 30, 9, 50], [40, 1, 5, 20], 16
    seq_lens = [c + q for c, q in zip(context_lens, query_lens, strict=True)]
    gen = torch.Generator().manual_seed(3)
    cache, tables, _ = paged_cache(seq_lens, block_size, cfg.kv_dim, torch.float32, device, gen)
    layer_cache = cache[:, 0]
    block_lists = [[int(b) for b in row if b] for row in tables.cpu()]
    meta, _ = AttentionMetadata.build(block_lists, context_lens, query_lens, block_size, device)
    num_tokens = sum(query_lens)
    q_nope = torch.randn(num_tokens, 4, 16, device=device)
    q_pe = torch.randn(num_tokens, 4, 8, device=device)
    with torch.no_grad():
        out = attn._prefill_kernels(torch.cat([q_nope, q_pe], -1), layer_cache, meta)
        ctx = gather_context(layer_cache, meta)
        ref = attn._absorbed(q_nope, q_pe, ctx, causal_mask(meta, ctx.shape[1]), meta)
    assert out.shape == ref.shape
    assert rel_err(out, ref) < tolerance(torch.float32)
