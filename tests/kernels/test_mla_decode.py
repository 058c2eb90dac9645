"""mla_decode (Triton, split-KV) against mla_decode_ref on ragged paged batches."""

from __future__ import annotations

import pytest
import torch

from moeserve.kernels.mla_decode import mla_decode, mla_decode_ref
from tests.kernels.helpers import TF32_TOL, paged_cache, rel_err, tolerance

# (seq_lens, block_size, heads, kv_lora_rank, rope, num_splits, dtype, seed)
CASES = [
    ([1, 17, 40], 16, 3, 20, 6, 4, torch.float32, 0),
    ([70, 5, 33, 64], 16, 16, 32, 16, None, torch.bfloat16, 1),
    ([130, 3], 64, 5, 24, 8, 3, torch.bfloat16, 2),
    ([65, 1, 128], 64, 17, 16, 16, 2, torch.float16, 3),
    ([9], 16, 2, 20, 6, 8, torch.bfloat16, 4),  # more splits than key tiles: empty splits
    # a value width over 128: the merge runs in 128-wide chunks, the last one ragged
    ([33, 2], 16, 2, 160, 16, 3, torch.bfloat16, 6),
]


# 64..127 sequences take 64-key tiles over 8 warps and two splits by default (default_tiles).
CASES.append(([(7 * i) % 150 + 1 for i in range(70)], 16, 2, 16, 8, None, torch.bfloat16, 5))
# From 128 sequences: two splits of 32-key tiles; the merge takes 32 of the 40 heads a program
# (a ragged second head block).
CASES.append(([(5 * i) % 90 + 1 for i in range(130)], 16, 40, 16, 8, None, torch.bfloat16, 8))
# V3-like head counts from batch 32 on: 64 heads a program (default_block_h), one head block and
# a ragged second (70 heads).
CASES.append(([(11 * i) % 20 + 1 for i in range(32)], 16, 70, 16, 8, 1, torch.bfloat16, 7))


@pytest.mark.parametrize("seq_lens,block_size,heads,rank,rope,splits,dtype,seed", CASES)
def test_mla_decode_matches_ref(seq_lens, block_size, heads, rank, rope, splits, dtype, seed,
                                device):
    gen = torch.Generator().manual_seed(seed)
    kv_dim = rank + rope
    cache, tables, lens = paged_cache(seq_lens, block_size, kv_dim, dtype, device, gen)
    layer_cache = cache[:, 1]  # strided view, as the model passes it
    q = torch.randn(len(seq_lens), heads, kv_dim, generator=gen).to(dtype).to(device)
    scale = kv_dim ** -0.5
    out = mla_decode(q, layer_cache, tables, lens, scale, rank, num_splits=splits)
    ref = mla_decode_ref(q, layer_cache, tables, lens, scale, rank)
    assert out.shape == (len(seq_lens), heads, rank) and out.dtype == dtype
    assert rel_err(out, ref) < tolerance(dtype)


def test_mla_decode_int64_tables_and_shape_errors(device):
    gen = torch.Generator().manual_seed(5)
    cache, tables, lens = paged_cache([20, 3], 16, 24, torch.float32, device, gen)
    q = torch.randn(2, 4, 24, generator=gen).to(device)
    out = mla_decode(q, cache[:, 0], tables.long(), lens.long(), 0.2, 16)
    ref = mla_decode_ref(q, cache[:, 0], tables, lens, 0.2, 16)
    assert rel_err(out, ref) < TF32_TOL
    with pytest.raises(ValueError):
        mla_decode(q, cache[:, 0], tables, lens, 0.2, 24)
    with pytest.raises(ValueError):
        mla_decode(q.bfloat16(), cache[:, 0], tables, lens, 0.2, 16)


@pytest.mark.parametrize("splits", [1, 3])
def test_mla_decode_separate_rope_query(splits, device):
    """The model's decode path passes the latent query and the rope part as two strided
    views (no concatenation); one split skips the merge and writes the output directly."""
    gen = torch.Generator().manual_seed(6)
    rank, rope, heads = 24, 8, 5
    cache, tables, lens = paged_cache([40, 7, 19], 16, rank + rope, torch.bfloat16, device, gen)
    # [H, S, R] as a batched matmul over heads leaves it, viewed as [S, H, R]
    q_nope = torch.randn(heads, 3, rank, generator=gen).bfloat16().to(device).transpose(0, 1)
    # the rope part of a [S, H, nope + rope] projection output
    q_pe = torch.randn(3, heads, 11 + rope, generator=gen).bfloat16().to(device)[..., 11:]
    out = mla_decode(q_nope, cache[:, 0], tables, lens, 0.2, rank, num_splits=splits,
                     q_pe=q_pe)
    ref = mla_decode_ref(torch.cat([q_nope, q_pe], -1), cache[:, 0], tables, lens, 0.2, rank)
    assert rel_err(out, ref) < tolerance(torch.bfloat16)
    with pytest.raises(ValueError, match="q_pe"):
        mla_decode(q_nope, cache[:, 0], tables, lens, 0.2, rank, q_pe=q_pe[:2])
