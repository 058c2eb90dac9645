"""EPLB placement (pure functions) and the sliding load window."""

from __future__ import annotations

import torch

from moeserve.worker.parallel.eplb import (
    ExpertLoadWindow,
    balanced_packing,
    default_placement,
    imbalance,
    rebalance_experts,
    replicate_experts,
)


def _check_consistent(p, n_experts: int) -> None:
    layers, num_physical = p.phy2log.shape
    for layer in range(layers):
        assert sorted(set(p.phy2log[layer].tolist())) == list(range(n_experts))
        for e in range(n_experts):
            slots = [s for s in p.log2phy[layer, e].tolist() if s >= 0]
            assert len(slots) == p.logcnt[layer, e]
            assert all(p.phy2log[layer, s] == e for s in slots)
        assert int(p.logcnt[layer].sum()) == num_physical


def test_balanced_packing_equal_counts_and_near_equal_weight():
    weight = torch.tensor([[10.0, 9, 1, 1, 1, 1, 1, 8]])
    pack, rank = balanced_packing(weight, 2)
    assert sorted(pack[0].tolist()) == [0, 0, 0, 0, 1, 1, 1, 1]
    totals = [float(weight[0][pack[0] == i].sum()) for i in range(2)]
    assert sorted(totals) == [13.0, 19.0]  # the best split with four items per pack
    assert sorted(rank[0][pack[0] == 0].tolist()) == [0, 1, 2, 3]


def test_replicate_gives_redundant_slots_to_hot_experts():
    phy2log, _, logcnt = replicate_experts(torch.tensor([[100.0, 1, 1, 60]]), 6)
    assert logcnt[0].tolist() == [2, 1, 1, 2]  # 100/1 first, then 60/1 beats 100/2
    assert sorted(phy2log[0, 4:].tolist()) == [0, 3]


def test_skewed_load_rebalance_lowers_max_over_mean():
    torch.manual_seed(0)
    load = torch.rand(3, 16) * 10
    load[:, [0, 1, 2]] += 500  # three hot experts, all on rank 0 in the default layout
    before_p = default_placement(3, 16, 0, 4)
    after_p = rebalance_experts(load, 16 + 4, 4)
    before, after = imbalance(load, before_p), imbalance(load, after_p)
    print(f"max/mean expert load per rank: before {before:.3f} after {after:.3f}")
    assert after < before and after < 1.3
    _check_consistent(after_p, 16)


def test_hierarchical_keeps_groups_on_nodes():
    load = torch.arange(32, dtype=torch.float32).repeat(2, 1)
    p = rebalance_experts(load, 40, 8, num_groups=4, num_nodes=2)
    _check_consistent(p, 32)
    group = 32 // 4
    for layer in range(2):
        node_of = p.phy2log[layer].view(2, -1)
        for node in range(2):
            groups = {e // group for e in node_of[node].tolist()}
            assert len(groups) == 2  # two whole groups per node, redundants stay inside them


def test_default_placement_is_round_robin_free_of_load():
    p = default_placement(2, 8, 0, 2)
    assert p.local_experts(0, 1) == [4, 5, 6, 7]
    p = default_placement(2, 8, 2, 2)
    assert p.slots_per_rank == 5
    _check_consistent(p, 8)


def test_load_window_forgets_old_steps():
    w = ExpertLoadWindow(num_layers=1, num_experts=4, window=2)
    w.begin_step()
    w.record(0, torch.tensor([[0, 1]]))
    w.begin_step()
    w.record(0, torch.tensor([[1, 2]]))
    assert w.total()[0].tolist() == [1, 2, 1, 0]
    w.begin_step()  # the first step slides out
    w.record(0, torch.tensor([[3, 3]]))
    assert w.total()[0].tolist() == [0, 1, 1, 2]
