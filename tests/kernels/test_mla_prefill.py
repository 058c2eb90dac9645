"""mla_prefill (Triton) against mla_prefill_ref and against the model's own absorbed path."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moeserve.kernels.mla_prefill import (
    PrefillConfig,
    default_prefill_config,
    mla_prefill,
    mla_prefill_ref,
)
from moeserve.worker.model.attention_metadata import AttentionMetadata
from moeserve.worker.model.mla import causal_mask, gather_context, pad_queries
from tests.kernels.helpers import TF32_TOL, paged_cache, rel_err, tolerance

# (context_lens, query_lens, block_size, heads, rank, rope, dtype, config, seed)
CASES = [
    ([0, 5, 30], [7, 1, 12], 16, 3, 20, 6, torch.float32, PrefillConfig(16, 16, 4, 1), 0),
    ([40, 0], [9, 33], 16, 4, 32, 16, torch.bfloat16, PrefillConfig(32, 16, 4, 1), 1),
    ([70, 2, 0], [3, 20, 1], 64, 2, 16, 8, torch.bfloat16, None, 2),
    ([100], [29], 64, 5, 24, 8, torch.float16, PrefillConfig(16, 32, 4, 2), 3),
]


def _inputs(context_lens, query_lens, block_size, heads, rank, rope, dtype, device, seed):
    gen = torch.Generator().manual_seed(seed)
    seq_lens = [c + q for c, q in zip(context_lens, query_lens, strict=True)]
    cache, tables, lens = paged_cache(seq_lens, block_size, rank + rope, dtype, device, gen)
    starts = torch.zeros(len(query_lens) + 1, dtype=torch.int32)
    starts[1:] = torch.tensor(query_lens).cumsum(0)
    q = torch.randn(int(starts[-1]), heads, rank + rope, generator=gen).to(dtype).to(device)
    return q, cache[:, 2], tables, lens, starts.to(device)


@pytest.mark.parametrize("context_lens,query_lens,block_size,heads,rank,rope,dtype,config,seed",
                         CASES)
def test_mla_prefill_matches_ref(context_lens, query_lens, block_size, heads, rank, rope, dtype,
                                 config, seed, device):
    q, layer_cache, tables, lens, starts = _inputs(context_lens, query_lens, block_size, heads,
                                                   rank, rope, dtype, device, seed)
    scale = 0.3
    args = (q, layer_cache, tables, lens, starts, max(query_lens), scale, rank)
    out = mla_prefill(*args, config=config)
    ref = mla_prefill_ref(*args)
    assert out.shape == (q.shape[0], heads, rank) and out.dtype == dtype
    assert rel_err(out, ref) < tolerance(dtype)


def test_query_parts_given_apart(device):
    """The latent query as the model makes it (a [T, H, R] view of an [H, T, R] batched GEMM
    result) and q_pe apart give the joint query's output: no concatenated copy needed."""
    q, layer_cache, tables, lens, starts = _inputs([40, 0], [9, 33], 16, 4, 32, 16,
                                                   torch.bfloat16, device, 4)
    latent = q[..., :32].transpose(0, 1).contiguous().transpose(0, 1)
    assert not latent.is_contiguous()
    args = (layer_cache, tables, lens, starts, 33, 0.3, 32)
    want = mla_prefill(q, *args)
    got = mla_prefill(latent, *args, q_pe=q[..., 32:].contiguous())
    assert torch.equal(got, want)
    with pytest.raises(ValueError, match="q_pe"):
        mla_prefill(q, *args, q_pe=q[..., 32:])


def test_mla_prefill_matches_model_absorbed_attention(device):
    """The model's SDPA over gathered latents (mla.py) is the same math as the kernel."""
    context_lens, query_lens, block_size, heads, rank, rope = [6, 0, 17], [5, 8, 2], 16, 3, 20, 6
    q, layer_cache, tables, lens, starts = _inputs(context_lens, query_lens, block_size, heads,
                                                   rank, rope, torch.float32, device, 7)
    block_lists = [[int(b) for b in row if b] for row in tables.cpu()]
    meta, _ = AttentionMetadata.build(block_lists, context_lens, query_lens, block_size, device)
    ctx = gather_context(layer_cache, meta)
    key = ctx.unsqueeze(1).expand(-1, heads, -1, -1)
    o = F.scaled_dot_product_attention(pad_queries(q, meta).transpose(1, 2), key,
                                       key[..., :rank], attn_mask=causal_mask(meta, ctx.shape[1]),
                                       scale=0.25)
    expected = o.transpose(1, 2)[meta.token_seq_idx, meta.token_query_idx]
    out = mla_prefill(q, layer_cache, tables, lens, starts, max(query_lens), 0.25, rank,
                      config=PrefillConfig(16, 16, 4, 1))
    assert rel_err(out, expected) < TF32_TOL


def test_default_tiles_fit_the_gpu_shared_memory():
    """The tuned tiles (64 keys, double-buffered) where they fit a Hopper block's 227 KiB in
    bf16; float32 caches and smaller GPUs get tiles that fit instead of a launch failure."""
    kib = 1024
    assert default_prefill_config(512, 64, 2, 227 * kib) == PrefillConfig(64, 64, 8, 2)
    assert default_prefill_config(512, 64, 4, 227 * kib) == PrefillConfig(64, 32, 8, 1)
    for elem in (1, 2, 4):
        for smem in (99 * kib, 164 * kib, 227 * kib):
            c = default_prefill_config(512, 64, elem, smem)
            assert (c.block_m + c.num_stages * c.block_n) * 576 * elem <= smem - 4 * kib
