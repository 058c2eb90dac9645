"""fused_moe (Triton grouped GEMMs) against fused_moe_ref, and the expert alignment."""

from __future__ import annotations

import pytest
import torch
import triton

from moeserve.kernels.fused_moe import fused_moe, fused_moe_ref
from moeserve.kernels.moe_align import (
    SINGLE_PROGRAM_MAX_ONEHOT,
    moe_align_block_size,
    moe_align_block_size_chunked,
    moe_align_block_size_ref,
)
from moeserve.kernels.moe_config import (
    SHARED_MEMORY_BUDGET,
    MoeConfig,
    fit_shared_memory,
    moe_config,
)
from tests.kernels.helpers import TF32_TOL, rel_err, tolerance


def _routing(tokens: int, experts: int, top_k: int, used: int, gen: torch.Generator):
    """Distinct experts per token drawn from the first `used` experts only (the rest get no
    tokens), with softmax-like positive weights."""
    scores = torch.rand(tokens, experts, generator=gen)
    scores[:, used:] = -1.0
    weights, ids = scores.topk(top_k, dim=-1)
    return weights / weights.sum(-1, keepdim=True), ids


# (tokens, hidden, inter, experts, used experts, top_k, dtype, config, seed)
CASES = [
    (1, 32, 16, 4, 4, 2, torch.float32, None, 0),
    (13, 48, 24, 8, 5, 3, torch.bfloat16, None, 1),
    (40, 64, 40, 6, 6, 2, torch.float16, MoeConfig(32, 64, 32, 4, 2), 2),
    (29, 40, 32, 12, 7, 6, torch.bfloat16, MoeConfig(16, 32, 16, 4, 2), 3),
    (70, 32, 16, 3, 3, 1, torch.float32, MoeConfig(64, 32, 32, 4, 2), 4),
]


@pytest.mark.parametrize("tokens,hidden,inter,experts,used,top_k,dtype,config,seed", CASES)
def test_fused_moe_matches_ref(tokens, hidden, inter, experts, used, top_k, dtype, config, seed,
                               device):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, hidden, generator=gen).to(dtype).to(device)
    w13 = (torch.randn(experts, 2 * inter, hidden, generator=gen) / hidden**0.5).to(dtype)
    w2 = (torch.randn(experts, hidden, inter, generator=gen) / inter**0.5).to(dtype)
    weights, ids = _routing(tokens, experts, top_k, used, gen)
    w13, w2, weights, ids = w13.to(device), w2.to(device), weights.to(device), ids.to(device)
    out = fused_moe(x, w13, w2, weights, ids, config)
    ref = fused_moe_ref(x, w13, w2, weights, ids)
    assert out.shape == x.shape and out.dtype == dtype
    assert rel_err(out, ref) < tolerance(dtype)


def test_fused_moe_skips_experts_on_other_ranks(device):
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(11, 32, generator=gen).to(device)
    w13 = torch.randn(4, 32, 32, generator=gen).to(device) / 6
    w2 = torch.randn(4, 32, 16, generator=gen).to(device) / 4
    weights, ids = _routing(11, 8, 3, 8, gen)
    ids = torch.where(ids < 4, ids, -1).to(device)  # experts 4..7 live on another rank
    weights = weights.to(device)
    ids[0] = -1  # a token with no local expert at all
    out = fused_moe(x, w13, w2, weights, ids)
    ref = fused_moe_ref(x, w13, w2, weights, ids)
    assert rel_err(out, ref) < TF32_TOL
    assert out[0].abs().max() == 0


def test_moe_align_block_size_layout(device):
    gen = torch.Generator().manual_seed(6)
    _, ids = _routing(23, 9, 3, 6, gen)
    ids[4, 1] = -1
    block_m = 4
    sorted_ids, block_expert = moe_align_block_size(ids.to(device), block_m, 9)
    sorted_ids, block_expert = sorted_ids.cpu(), block_expert.cpu()
    flat = ids.flatten()
    assert block_expert.numel() * block_m == sorted_ids.numel()
    seen = []
    for b, e in enumerate(block_expert.tolist()):
        rows = [r for r in sorted_ids[b * block_m : (b + 1) * block_m].tolist() if r < flat.numel()]
        if e < 0:
            assert rows == []
        assert all(int(flat[r]) == e for r in rows)
        seen += rows
    assert sorted(seen) == [i for i in range(flat.numel()) if flat[i] >= 0]
    assert set(block_expert.tolist()) - {-1} == set(flat[flat >= 0].tolist())


@pytest.mark.parametrize("tokens,experts,top_k,block_m", [(23, 9, 3, 4), (300, 64, 6, 16),
                                                         (5, 256, 8, 64), (1, 64, 6, 16)])
def test_moe_align_kernel_equals_torch_reference(tokens, experts, top_k, block_m, device):
    """The Triton layout is the stable-sort layout of the reference, bit for bit."""
    gen = torch.Generator().manual_seed(tokens)
    _, ids = _routing(tokens, experts, top_k, experts, gen)
    ids = torch.where(torch.rand(ids.shape, generator=gen) < 0.1, -1, ids)  # remote experts
    ids = ids.to(torch.int32).to(device)
    got = moe_align_block_size(ids, block_m, experts)
    want = moe_align_block_size_ref(ids, block_m, experts)
    assert torch.equal(got[0].cpu(), want[0].cpu())
    assert torch.equal(got[1].cpu(), want[1].cpu())


@pytest.mark.parametrize("tokens,experts,top_k,block_m", [(23, 9, 3, 4), (40, 64, 6, 16),
                                                         (700, 64, 6, 64), (520, 256, 8, 16),
                                                         (2, 64, 6, 16)])
def test_chunked_align_equals_torch_reference(tokens, experts, top_k, block_m, device):
    """The three-launch layout used above SINGLE_PROGRAM_MAX_ONEHOT (all but tiny batches) is the
    reference's stable-sort layout, bit for bit, across chunk boundaries and with remote ids."""
    gen = torch.Generator().manual_seed(tokens + experts)
    _, ids = _routing(tokens, experts, top_k, experts, gen)
    ids = torch.where(torch.rand(ids.shape, generator=gen) < 0.1, -1, ids)
    ids = ids.to(torch.int32).to(device)
    want = moe_align_block_size_ref(ids, block_m, experts)
    got = moe_align_block_size_chunked(ids, block_m, experts)
    assert torch.equal(got[0].cpu(), want[0].cpu())
    assert torch.equal(got[1].cpu(), want[1].cpu())
    if ids.numel() * triton.next_power_of_2(experts) > SINGLE_PROGRAM_MAX_ONEHOT:  # dispatched
        routed = moe_align_block_size(ids, block_m, experts)
        assert torch.equal(routed[0].cpu(), want[0].cpu())


@pytest.mark.parametrize("tokens,routed,top_k,shared,block_m", [(23, 9, 3, 2, 4),
                                                                (130, 64, 6, 2, 64),
                                                                (1, 64, 6, 2, 16),
                                                                (40, 256, 8, 1, 16)])
def test_moe_align_shared_columns_equal_torch_reference(tokens, routed, top_k, shared, block_m,
                                                        device):  # fmt: skip
    """Shared experts stacked after the routed ones (append_shared's columns) are laid out in
    closed form by the kernel: the same layout as sorting them like any expert."""
    from moeserve.worker.model.moe import append_shared

    gen = torch.Generator().manual_seed(tokens)
    weights, ids = _routing(tokens, routed, top_k, routed, gen)
    weights, ids = append_shared(weights, ids, routed, shared)
    ids = ids.to(device)
    want = moe_align_block_size_ref(ids, block_m, routed + shared)
    for got in (moe_align_block_size(ids, block_m, routed + shared, num_shared=shared),
                moe_align_block_size_chunked(ids, block_m, routed + shared, shared, chunk=16)):
        assert torch.equal(got[0].cpu(), want[0].cpu())
        assert torch.equal(got[1].cpu(), want[1].cpu())
    w13 = torch.randn(routed + shared, 16, 24, generator=gen).to(device) / 5
    w2 = torch.randn(routed + shared, 24, 8, generator=gen).to(device) / 3
    x = torch.randn(tokens, 24, generator=gen).to(device)
    out = fused_moe(x, w13, w2, weights.to(device), ids, num_shared=shared)
    assert rel_err(out, fused_moe_ref(x, w13, w2, weights.to(device), ids)) < TF32_TOL


@pytest.mark.parametrize("tokens,top_k,used,block_m", [(1, 8, 66, 16), (2, 6, 12, 16),
                                                       (3, 4, 64, 4), (40, 6, 6, 64),
                                                       (9, 2, 3, 16)])
def test_padded_rows_hold_every_copy(tokens, top_k, used, block_m, device):
    """The layout is sized without reading counts back; whatever the routing (spread over
    every expert or piled on a few), every copy must land in a row of its expert's blocks."""
    gen = torch.Generator().manual_seed(tokens * top_k)
    _, ids = _routing(tokens, 66, top_k, used, gen)
    ids = ids.to(device)
    for fn in (moe_align_block_size, moe_align_block_size_ref):
        sorted_ids, block_expert = fn(ids, block_m, 66)
        rows = sorted_ids.cpu().tolist()
        assert sorted(r for r in rows if r < ids.numel()) == list(range(ids.numel()))
        experts = block_expert.cpu().repeat_interleave(block_m).tolist()
        flat = ids.flatten().cpu().tolist()
        assert all(experts[i] == flat[r] for i, r in enumerate(rows) if r < ids.numel())


def test_fused_moe_shape_errors(device):
    x = torch.randn(3, 8, device=device)
    w13 = torch.randn(2, 8, 8, device=device)
    w2 = torch.randn(2, 8, 3, device=device)
    ids = torch.zeros(3, 1, dtype=torch.long, device=device)
    with pytest.raises(ValueError):
        fused_moe(x, w13, w2, torch.ones(3, 1, device=device), ids)
    with pytest.raises(ValueError):
        fused_moe(x, w13, w2[..., :4].contiguous(), torch.ones(3, 2, device=device), ids)


@pytest.mark.parametrize("copies", [6, 384, 3000, 6144, 49152])
def test_tiles_fit_shared_memory_for_every_dtype(copies):
    """The H100 tiles are tuned for bf16; float32 ones must still fit (the parity tests run
    float32 weights through the kernel path on the GPU)."""
    for elem in (2, 4):
        cfg = fit_shared_memory(moe_config(copies, 64), elem)
        need = (cfg.block_m * cfg.block_k + cfg.block_k * cfg.block_n) * elem * cfg.num_stages
        assert need <= SHARED_MEMORY_BUDGET
        if elem == 2:
            assert cfg == moe_config(copies, 64)  # bf16 keeps the measured tiles
