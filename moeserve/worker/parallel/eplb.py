"""Expert-parallel load balancing: where each expert's copies live, chosen from observed load.

The placement functions are pure (tensors in, tensors out, no rank or process state): every
rank computes the same placement from the same all-reduced loads. The algorithm follows
DeepSeek's published EPLB: replicate the hottest experts into the redundant slots, then pack
physical experts onto ranks so each rank gets the same number and the loads even out. With
expert groups that map onto nodes it first packs whole groups onto nodes (hierarchical: group-
limited routing then keeps most traffic inside a node); otherwise it balances globally.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = [
    "Placement", "balanced_packing", "replicate_experts", "rebalance_experts",
    "default_placement", "placement_from_phy2log", "rank_loads", "imbalance", "ExpertLoadWindow",
]


@dataclass(frozen=True)
class Placement:
    """Experts of every MoE layer over `num_ranks` ranks; physical slot p lives on rank
    p // slots_per_rank.

    phy2log: [L, P] int64 logical expert held in each physical slot.
    log2phy: [L, E, R] int64 physical slots holding each logical expert, -1 padded.
    logcnt: [L, E] int64 copies of each logical expert (>= 1).
    """

    phy2log: torch.Tensor
    log2phy: torch.Tensor
    logcnt: torch.Tensor
    num_ranks: int

    @property
    def slots_per_rank(self) -> int:
        return self.phy2log.shape[1] // self.num_ranks

    def local_experts(self, layer: int, rank: int) -> list[int]:
        s = self.slots_per_rank
        return self.phy2log[layer, rank * s : (rank + 1) * s].tolist()


def balanced_packing(weight: torch.Tensor, num_packs: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Split the n items of each row into num_packs packs of n / num_packs items with near-equal
    total weight (greedy: heaviest item first into the lightest pack that has room).

    weight: [X, n]. Returns (pack of each item [X, n], position inside its pack [X, n]).
    """
    rows, n = weight.shape
    assert n % num_packs == 0, (n, num_packs)
    per_pack = n // num_packs
    if per_pack == 1:
        pack = torch.arange(n, dtype=torch.int64).expand(rows, n).clone()
        return pack, torch.zeros_like(pack)
    order = weight.float().sort(dim=-1, descending=True, stable=True).indices
    pack_index = torch.full((rows, n), -1, dtype=torch.int64)
    rank_in_pack = torch.full((rows, n), -1, dtype=torch.int64)
    for i in range(rows):
        totals = [0.0] * num_packs
        items = [0] * num_packs
        for item in order[i].tolist():
            pack = min((p for p in range(num_packs) if items[p] < per_pack),
                       key=totals.__getitem__)
            pack_index[i, item] = pack
            rank_in_pack[i, item] = items[pack]
            totals[pack] += float(weight[i, item])
            items[pack] += 1
    return pack_index, rank_in_pack


def replicate_experts(
    weight: torch.Tensor, num_physical: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Give each redundant slot to the expert with the highest load per copy.

    weight: [X, E]. Returns (phy2log [X, P], replica index of each slot [X, P], logcnt [X, E]).
    """
    rows, n_log = weight.shape
    phy2log = torch.arange(num_physical, dtype=torch.int64).repeat(rows, 1)
    replica = torch.zeros(rows, num_physical, dtype=torch.int64)
    logcnt = torch.ones(rows, n_log, dtype=torch.int64)
    r = torch.arange(rows)
    for p in range(n_log, num_physical):
        hottest = (weight / logcnt).max(dim=-1).indices
        phy2log[:, p] = hottest
        replica[:, p] = logcnt[r, hottest]
        logcnt[r, hottest] += 1
    return phy2log, replica, logcnt


def _inverse(perm: torch.Tensor) -> torch.Tensor:
    inv = torch.empty_like(perm)
    inv.scatter_(1, perm, torch.arange(perm.shape[1], dtype=torch.int64).expand(perm.shape))
    return inv


def _hierarchical(weight: torch.Tensor, num_physical: int, num_groups: int, num_nodes: int,
                  num_ranks: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    layers, n_log = weight.shape
    group_size = n_log // num_groups
    groups_per_node = num_groups // num_nodes
    slots = num_physical // num_ranks
    # 1. whole expert groups onto nodes
    group_load = weight.unflatten(-1, (num_groups, group_size)).sum(-1)
    gpack, grank = balanced_packing(group_load, num_nodes)
    log2mlog = (((gpack * groups_per_node + grank) * group_size).unsqueeze(-1)
                + torch.arange(group_size)).flatten(-2)
    mlog2log = _inverse(log2mlog)
    # 2. redundant copies within each node ("mlog": logical experts renumbered node by node)
    node_load = weight.gather(-1, mlog2log).view(-1, n_log // num_nodes)
    phy2mlog, phyrank, mlogcnt = replicate_experts(node_load, num_physical // num_nodes)
    # 3. physical experts onto the ranks of their node
    phy_load = (node_load / mlogcnt).gather(-1, phy2mlog)
    pack, rank_in_pack = balanced_packing(phy_load, num_ranks // num_nodes)
    phy2pphy = pack * slots + rank_in_pack
    pphy2phy = _inverse(phy2pphy)
    pphy2mlog = phy2mlog.gather(-1, pphy2phy)
    pphy2mlog = (pphy2mlog.view(layers, num_nodes, -1)
                 + torch.arange(0, n_log, n_log // num_nodes).view(1, -1, 1)).flatten(-2)
    pphy2log = mlog2log.gather(-1, pphy2mlog)
    pphyrank = phyrank.gather(-1, pphy2phy).view(layers, -1)
    logcnt = mlogcnt.view(layers, -1).gather(-1, log2mlog)
    return pphy2log, pphyrank, logcnt


def rebalance_experts(
    weight: torch.Tensor,
    num_physical: int,
    num_ranks: int,
    *,
    num_groups: int = 1,
    num_nodes: int = 1,
) -> Placement:
    """Placement for loads `weight` [L, E] over `num_ranks` ranks of `num_physical` slots.

    Hierarchical when experts come in `num_groups` groups that divide evenly over
    `num_nodes` > 1 nodes; global otherwise.
    """
    layers, n_log = weight.shape
    if num_physical % num_ranks or num_physical < n_log:
        raise ValueError(f"{num_physical} physical experts cannot hold {n_log} experts evenly "
                         f"on {num_ranks} ranks")
    weight = weight.float().cpu()
    hierarchical = (num_nodes > 1 and num_groups % num_nodes == 0
                    and num_ranks % num_nodes == 0 and n_log % num_groups == 0)
    if hierarchical:
        phy2log, phyrank, logcnt = _hierarchical(weight, num_physical, num_groups, num_nodes,
                                                 num_ranks)
    else:
        phy2log, phyrank, logcnt = _hierarchical(weight, num_physical, 1, 1, num_ranks)
    max_copies = num_physical - n_log + 1
    log2phy = torch.full((layers, n_log, max_copies), -1, dtype=torch.int64)
    log2phy.view(layers, -1).scatter_(
        -1, phy2log * max_copies + phyrank,
        torch.arange(num_physical, dtype=torch.int64).expand(layers, -1).contiguous())
    return Placement(phy2log, log2phy, logcnt, num_ranks)


def placement_from_phy2log(phy2log: torch.Tensor, num_experts: int,
                           num_ranks: int) -> Placement:
    """The Placement whose slots hold phy2log [L, P]; replicas numbered in slot order."""
    layers, num_physical = phy2log.shape
    logcnt = torch.zeros(layers, num_experts, dtype=torch.int64)
    logcnt.scatter_add_(1, phy2log, torch.ones_like(phy2log))
    log2phy = torch.full((layers, num_experts, int(logcnt.max())), -1, dtype=torch.int64)
    for layer in range(layers):
        seen = [0] * num_experts
        for slot, e in enumerate(phy2log[layer].tolist()):
            log2phy[layer, e, seen[e]] = slot
            seen[e] += 1
    return Placement(phy2log.clone(), log2phy, logcnt, num_ranks)


def default_placement(num_layers: int, num_experts: int, num_redundant: int,
                      num_ranks: int) -> Placement:
    """Start-up placement before any load is seen: experts in order, rank after rank, then
    one extra copy each of experts 0, 1, ... in the redundant slots (the last ranks')."""
    order = torch.cat([torch.arange(num_experts), torch.arange(num_redundant) % num_experts])
    return placement_from_phy2log(order.repeat(num_layers, 1), num_experts, num_ranks)


def rank_loads(load: torch.Tensor, placement: Placement) -> torch.Tensor:
    """[L, ranks] tokens each rank computes when each expert's load splits evenly over its
    copies. load: [L, E]."""
    per_copy = load.double() / placement.logcnt.double()
    per_slot = per_copy.gather(-1, placement.phy2log)
    return per_slot.view(load.shape[0], placement.num_ranks, -1).sum(-1)


def imbalance(load: torch.Tensor, placement: Placement) -> float:
    """Max over mean of the per-rank load, averaged over layers (1.0 = perfectly even)."""
    ranks = rank_loads(load, placement)
    mean = ranks.mean(-1).clamp_min(1e-9)
    return float((ranks.max(-1).values / mean).mean())


class ExpertLoadWindow:
    """Tokens routed to each logical expert, per MoE layer, over the last `window` steps."""

    def __init__(self, num_layers: int, num_experts: int, window: int):
        self.window = max(1, window)
        self._counts = torch.zeros(self.window, num_layers, num_experts, dtype=torch.int64)
        self._step = 0

    def begin_step(self) -> None:
        """Start a new step: its slot in the ring forgets the step `window` ago."""
        self._step += 1
        self._counts[self._step % self.window].zero_()

    def record(self, layer: int, expert_ids: torch.Tensor) -> None:
        """expert_ids: [T, k] logical ids chosen for this step's tokens of one layer."""
        if expert_ids.numel():
            ids = expert_ids.flatten().cpu()
            self._counts[self._step % self.window, layer].index_add_(
                0, ids, torch.ones_like(ids))

    def total(self) -> torch.Tensor:
        """[L, E] int64 sum over the window."""
        return self._counts.sum(0)
