"""route_topk (one Triton launch) against route_topk_ref (moe.route plus shared columns)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from moeserve.common.model_config import ModelConfig
from moeserve.kernels.moe_route import route_topk, route_topk_ref
from moeserve.worker.checkpoint import preset_config


def _config(preset: str, **overrides) -> ModelConfig:
    return ModelConfig.from_dict({**preset_config(preset), **overrides})


_V2_GROUPS = dict(topk_method="group_limited_greedy", scoring_func="softmax")
# name -> (config, whether to pass a random correction bias)
CONFIGS = {
    "v2-lite": (_config("v2-lite"), False),
    "v2-small-groups": (_config("v2-lite", n_routed_experts=12, num_experts_per_tok=3,
                                n_group=3, topk_group=2, **_V2_GROUPS), False),
    "v2-full-groups": (_config("v2-lite", n_routed_experts=160, num_experts_per_tok=6,
                               n_group=8, topk_group=3, routed_scaling_factor=16.0,
                               **_V2_GROUPS), False),
    # softmax with norm_topk_prob: renormalised, and the scaling factor must be ignored
    "v2-norm": (_config("v2-lite", n_routed_experts=12, num_experts_per_tok=3, n_group=3,
                        topk_group=2, norm_topk_prob=True, routed_scaling_factor=2.0,
                        **_V2_GROUPS), False),
    "v3": (_config("v3"), True),
    "tiny-v3": (_config("tiny"), True),
    "tiny-v3-no-bias": (_config("tiny"), False),
    "tiny-v3-k1": (_config("tiny", num_experts_per_tok=1), True),  # k == 1: no renorm
}


def _by_id(weights: torch.Tensor, ids: torch.Tensor, k: int):
    """Routed columns sorted by expert id per row (route() leaves their order unspecified)."""
    order = ids[:, :k].long().argsort(dim=1)
    return weights[:, :k].gather(1, order), ids[:, :k].gather(1, order)


@pytest.mark.parametrize("num_shared", [0, 2])
@pytest.mark.parametrize("tokens", [1, 5, 37])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_route_topk_matches_ref(name, tokens, num_shared, device):
    config, with_bias = CONFIGS[name]
    n, k = config.n_routed_experts, config.num_experts_per_tok
    gen = torch.Generator().manual_seed(tokens * 31 + num_shared)
    logits = torch.randn(tokens, n, generator=gen).to(device)
    bias = (torch.randn(n, generator=gen) * 0.1).to(device) if with_bias else None
    weights, ids = route_topk(logits, config, bias, num_shared)
    ref_w, ref_ids = route_topk_ref(logits, config, bias, num_shared)
    assert weights.shape == ids.shape == (tokens, k + num_shared)
    assert weights.dtype == torch.float32 and ids.dtype == torch.int64
    w, i = _by_id(weights.cpu(), ids.cpu(), k)
    rw, ri = _by_id(ref_w.cpu(), ref_ids.cpu(), k)
    assert torch.equal(i, ri)
    torch.testing.assert_close(w, rw, rtol=1e-6, atol=0)
    assert torch.equal(ids[:, k:].cpu(), ref_ids[:, k:].cpu())
    assert torch.equal(weights[:, k:].cpu(), torch.ones(tokens, num_shared))


def test_route_topk_strided_rows(device):
    config, _ = CONFIGS["v2-small-groups"]
    wide = torch.randn(7, 20, generator=torch.Generator().manual_seed(3)).to(device)
    logits = wide[:, 4:16]  # rows 20 apart, last dim contiguous
    w, i = _by_id(*route_topk(logits, config), 3)
    rw, ri = _by_id(*route_topk_ref(logits.contiguous(), config), 3)
    assert torch.equal(i.cpu(), ri.cpu())
    torch.testing.assert_close(w.cpu(), rw.cpu(), rtol=1e-6, atol=0)


def test_normalised_weights_sum_to_one_or_scaling(device):
    logits = torch.randn(9, 12, generator=torch.Generator().manual_seed(4)).to(device)
    weights, _ = route_topk(logits, CONFIGS["v2-norm"][0], num_shared=1)
    torch.testing.assert_close(weights[:, :3].sum(1).cpu(), torch.ones(9))
    v3, _ = CONFIGS["tiny-v3"]
    weights, _ = route_topk(logits[:, :8].contiguous(), v3, torch.zeros(8, device=device))
    torch.testing.assert_close(weights.sum(1).cpu(), torch.full((9,), 2.5))


def test_v2_group_limit_skips_a_better_expert_in_a_losing_group(device):
    # Group maxima 5.0, 4.0, 4.5: group 1 loses, so its 4.0 (expert 4) must give way to 2.0.
    logits = torch.tensor([[5.0, 1.0, 0.5, 0.0, 4.0, 3.9, 3.8, 0.1, 4.5, 2.0, 0.2, -1.0]])
    config, _ = CONFIGS["v2-small-groups"]
    weights, ids = route_topk(logits.to(device), config)
    assert sorted(ids[0].tolist()) == [0, 8, 9]
    expected = logits.softmax(-1)[0, [0, 8, 9]]
    torch.testing.assert_close(_by_id(weights.cpu(), ids.cpu(), 3)[0][0], expected)


def test_v3_group_limit_uses_top2_sum_and_minus_inf_fill(device):
    # Group 0 holds the best raw expert (0) but a top-2 sum of ~1.0 against group 1's ~1.9.
    # A uniform bias of -2 leaves every biased score < 0: a 0.0 fill (V2's) for the losing
    # group would then pick its experts; V3's -inf fill must not.
    logits = torch.tensor([[6.0, -6.0, -6.5, -7.0, 3.0, 2.9, 2.8, 2.7]])
    config, _ = CONFIGS["tiny-v3"]
    bias = torch.full((8,), -2.0)
    weights, ids = route_topk(logits.to(device), config, bias.to(device), num_shared=1)
    assert ids[0].tolist() in ([4, 5, 8], [5, 4, 8])
    s = logits[0, [4, 5]].sigmoid()  # the bias steers selection only, never the weights
    expected = torch.cat([s / s.sum() * 2.5, torch.ones(1)])
    order = [0, 1, 2] if ids[0, 0] == 4 else [1, 0, 2]
    torch.testing.assert_close(weights[0, order].cpu(), expected)


def test_no_tokens_returns_empty(device):
    config, _ = CONFIGS["v3"]
    weights, ids = route_topk(torch.empty(0, 256, device=device), config, num_shared=1)
    assert weights.shape == ids.shape == (0, 9)
    assert weights.dtype == torch.float32 and ids.dtype == torch.int64


@pytest.mark.parametrize("logits,bias,match", [
    (torch.zeros(3, 2, 12), None, "2-D float32"),
    (torch.zeros(3, 12, dtype=torch.bfloat16), None, "2-D float32"),
    (torch.zeros(3, 10), None, "10 experts but config.n_routed_experts is 12"),
    (torch.zeros(3, 12), torch.zeros(10), r"correction_bias must have shape \(12,\)"),
    (torch.zeros(3, 12), torch.zeros(1, 12), r"correction_bias must have shape \(12,\)"),
])
def test_bad_arguments(logits, bias, match):
    config, _ = CONFIGS["v2-small-groups"]
    with pytest.raises(ValueError, match=match):
        route_topk(logits, config, bias)


def test_experts_not_divisible_by_groups():
    config = dataclasses.replace(CONFIGS["v2-small-groups"][0], n_group=5)
    with pytest.raises(ValueError, match="12 experts are not divisible by n_group=5"):
        route_topk(torch.zeros(2, 12), config)
