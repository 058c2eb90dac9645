"""RMSNorm (+ residual) and the rope + cache-write fusion against their torch references."""

from __future__ import annotations

import pytest
import torch

from moeserve.common.model_config import RopeConfig
from moeserve.kernels.rmsnorm import rmsnorm, rmsnorm_ref
from moeserve.kernels.rope_cache import rope_cache_write, rope_cache_write_ref
from moeserve.worker.model.rotary import RotaryEmbedding
from tests.kernels.helpers import rel_err, tolerance


@pytest.mark.parametrize("tokens,dim,dtype,residual,seed", [
    (5, 72, torch.bfloat16, False, 0),
    (9, 128, torch.float32, True, 1),
    (3, 200, torch.float16, True, 2),
])
def test_rmsnorm_matches_ref(tokens, dim, dtype, residual, seed, device):
    gen = torch.Generator().manual_seed(seed)
    # Every other row of a wider buffer: a strided input, as a split projection gives.
    x = torch.randn(tokens, 2 * dim, generator=gen).to(dtype).to(device)[:, :dim]
    w = (torch.rand(dim, generator=gen) + 0.5).to(dtype).to(device)
    res = torch.randn(tokens, dim, generator=gen).to(dtype).to(device) if residual else None
    out = rmsnorm(x, w, 1e-6, res)
    ref = rmsnorm_ref(x, w, 1e-6, res)
    if residual:
        assert torch.equal(out[1], ref[1])
        out, ref = out[0], ref[0]
    assert out.dtype == dtype and rel_err(out, ref) < tolerance(dtype) / 4


@pytest.mark.parametrize("block_size,rank,rope,dtype,norm,interleave,seed", [
    (16, 20, 6, torch.bfloat16, True, True, 0),
    (64, 32, 16, torch.float32, False, True, 1),
    (16, 24, 8, torch.float16, True, False, 2),
])
@pytest.mark.parametrize("heads", [3, 40])  # 40: three programs a token, the last ragged
def test_rope_cache_write_matches_ref(block_size, rank, rope, dtype, norm, interleave, seed,
                                      heads, device):
    gen = torch.Generator().manual_seed(seed)
    tokens, num_blocks = 11, 5
    rotary = RotaryEmbedding(rope, RopeConfig(), max_positions=300, interleave=interleave)
    kv = torch.randn(tokens, rank + rope, generator=gen).to(dtype).to(device)
    c_kv, k_pe = kv.split([rank, rope], dim=-1)  # strided halves of one projection output
    positions = torch.randint(0, 300, (tokens,), generator=gen).to(device)
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:tokens].to(device)
    slots[3] = -1  # a padding token
    weight = (torch.rand(rank, generator=gen) + 0.5).to(dtype).to(device) if norm else None
    cache = torch.randn(num_blocks, 2, block_size, rank + rope, generator=gen)
    cache = cache.to(dtype).to(device)
    expected = cache.clone()
    cos, sin = rotary.cos_cache.to(device), rotary.sin_cache.to(device)
    # Queries as the projection lays them out: [nope | rope] per head.
    q = torch.randn(tokens, heads, 5 + rope, generator=gen).to(dtype).to(device)
    q_expected = q.clone()
    rope_cache_write(c_kv, k_pe, positions, cos, sin, slots, cache[:, 1], weight, 1e-6,
                     interleave, q_pe=q[..., 5:])
    rope_cache_write_ref(c_kv, k_pe, positions, cos, sin, slots, expected[:, 1], weight, 1e-6,
                         interleave, q_pe=q_expected[..., 5:])
    assert torch.equal(cache[:, 0], expected[:, 0])  # the other layer is untouched
    assert rel_err(cache, expected) < tolerance(dtype) / 4
    assert torch.equal(q[..., :5], q_expected[..., :5])  # nope parts untouched
    assert rel_err(q, q_expected) < tolerance(dtype) / 4  # padding token 3's query included


def test_rope_cache_write_ref_matches_model_rotary(device):
    """The reference is the model's own RotaryEmbedding on the k_pe part."""
    rotary = RotaryEmbedding(8, RopeConfig(), max_positions=64)
    k_pe = torch.randn(4, 8)
    c_kv = torch.randn(4, 16)
    positions = torch.tensor([0, 5, 63, 7])
    cache = torch.zeros(1, 4, 24)
    q = torch.randn(4, 2, 8)
    q_rotated = q.clone()
    rope_cache_write_ref(c_kv, k_pe, positions, rotary.cos_cache, rotary.sin_cache,
                         torch.arange(4), cache, q_pe=q_rotated)
    torch.testing.assert_close(cache[0, :, 16:], rotary(k_pe, positions))
    torch.testing.assert_close(q_rotated, rotary(q, positions))
    torch.testing.assert_close(cache[0, :, :16], c_kv)
