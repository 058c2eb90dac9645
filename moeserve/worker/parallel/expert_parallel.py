"""The MoE layers of one rank in an EP group: which experts it holds, how tokens reach them,
and how weights move when EPLB rearranges experts.

`ExpertParallel.stages(moe, layer, x)` is a generator that yields while its all-to-all is in
flight; run straight through it is a plain expert-parallel MoE forward, interleaved with a second
micro-batch's generator it is dual-batch overlap (dbo.py).
"""

from __future__ import annotations

import logging
from collections.abc import Generator
from dataclasses import dataclass

import torch
import torch.distributed as dist

from moeserve.worker.config import EngineConfig
from moeserve.worker.model.moe import Experts, MoE
from moeserve.worker.parallel.dispatch import Dispatcher, make_dispatcher
from moeserve.worker.parallel.eplb import (
    ExpertLoadWindow,
    Placement,
    default_placement,
    imbalance,
    rebalance_experts,
)
from moeserve.worker.parallel.group import ParallelContext

__all__ = ["ExpertParallel", "RebalanceReport", "weighted_combine"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RebalanceReport:
    """Per-rank load balance (max/mean) of the window's load under the old and new placement."""

    step: int
    imbalance_before: float
    imbalance_after: float
    experts_moved: int


def weighted_combine(copies: torch.Tensor, weights: torch.Tensor,
                     ids: torch.Tensor) -> torch.Tensor:
    """Sum each token's k expert outputs with its routing weights.

    copies: [T * k, H] in flat (token, choice) order; weights/ids: [T, k]. Adds in the order
    Experts.forward does on one rank (copies sorted by logical expert), so EP and single-rank
    results agree bit for bit whenever each expert's rows do.
    """
    top_k = ids.shape[1]
    order = ids.flatten().argsort(stable=True)
    tokens = order // top_k
    y = copies[order].float() * weights.flatten()[order, None]
    out = torch.zeros(ids.shape[0], copies.shape[1], dtype=torch.float32, device=copies.device)
    return out.index_add_(0, tokens, y).to(copies.dtype)


class ExpertParallel:
    """Owns the placement, the dispatcher and the load window of every MoE layer on this rank."""

    def __init__(self, ctx: ParallelContext, config: EngineConfig, moe_layers: list[MoE],
                 device: torch.device):
        self.ctx = ctx
        self.config = config
        self.layers = moe_layers
        self.num_experts = moe_layers[0].experts.num_logical_experts if moe_layers else 0
        if (self.num_experts + config.eplb_redundant_experts) % ctx.world_size:
            raise ValueError(
                f"n_routed_experts ({self.num_experts}) + eplb_redundant_experts "
                f"({config.eplb_redundant_experts}) must divide evenly over ep={ctx.world_size}")
        self.placement: Placement = default_placement(
            len(moe_layers), self.num_experts, config.eplb_redundant_experts, ctx.world_size)
        self.dispatcher: Dispatcher = make_dispatcher(config.a2a_backend, ctx, device)
        self.loads = ExpertLoadWindow(len(moe_layers), self.num_experts, config.eplb_window)
        self.steps = 0
        self.reports: list[RebalanceReport] = []
        for i, moe in enumerate(moe_layers):
            moe.experts.set_placement(self.placement.local_experts(i, ctx.rank))
            moe.use_expert_parallel(self, i)

    @classmethod
    def attach(cls, model: torch.nn.Module, ctx: ParallelContext, config: EngineConfig,
               device: torch.device) -> ExpertParallel:
        """Make every MoE layer of `model` expert-parallel over `ctx` (before weights load)."""
        layers = [m for m in model.modules() if isinstance(m, MoE)]
        return cls(ctx, config, layers, device)

    # ------------------------------------------------------------------ forward

    def begin_step(self) -> None:
        """Called once per forward on every rank, so step counts agree across the group."""
        self.steps += 1
        c = self.config
        if c.enable_eplb and self.steps > 1 and (self.steps - 1) % c.eplb_interval == 0:
            self.rebalance()
        self.loads.begin_step()

    def _physical(self, layer: int, ids: torch.Tensor) -> torch.Tensor:
        """Logical [T, k] -> physical slot [T, k]; a token's copies rotate over the replicas."""
        p = self.placement
        log2phy = p.log2phy[layer].to(ids.device)
        count = p.logcnt[layer].to(ids.device)[ids]
        token = torch.arange(ids.shape[0], device=ids.device).unsqueeze(1)
        replica = (token + torch.arange(ids.shape[1], device=ids.device)) % count
        return log2phy[ids, replica]

    def stages(self, moe: MoE, x: torch.Tensor) -> Generator[None, None, torch.Tensor]:
        """MoE forward of x [T, H] (T may be 0 on an idle rank); yields while bytes travel."""
        layer = moe.layer_index
        weights, ids = moe.gate(x)
        self.loads.record(layer, ids)
        pending = self.dispatcher.dispatch(x, self._physical(layer, ids),
                                           self.placement.slots_per_rank)
        yield
        got = pending.wait()
        ones = torch.ones(got.slots.shape[0], 1, dtype=torch.float32, device=x.device)
        y = moe.experts(got.x, ones, got.slots.unsqueeze(1))
        pending_out = self.dispatcher.combine(y, got.handle)
        # Shared experts run while the combine is on the wire.
        shared = moe.shared_experts(x) if moe.shared_experts is not None else None
        yield
        out = weighted_combine(pending_out.wait(), weights, ids)
        return out if shared is None else out + shared

    def forward(self, moe: MoE, x: torch.Tensor) -> torch.Tensor:
        gen = self.stages(moe, x)
        while True:
            try:
                next(gen)
            except StopIteration as stop:
                return stop.value

    # ------------------------------------------------------------------ EPLB

    def rebalance(self) -> RebalanceReport:
        """Recompute the placement from the group's load window and move weights to match.

        Runs between steps on every rank at the same step; requests in flight keep their KV
        cache and continue on the new placement (the weights moved are the same weights).
        """
        load = self.ctx.all_reduce_sum_(self.loads.total().double())
        c = self.config
        num_groups = self.layers[0].gate.config.n_group if self.layers else 1
        num_physical = self.num_experts + c.eplb_redundant_experts
        new = rebalance_experts(load, num_physical, self.ctx.world_size,
                                num_groups=num_groups, num_nodes=self.ctx.info.num_nodes)
        before, after = imbalance(load, self.placement), imbalance(load, new)
        moved = 0
        for i, moe in enumerate(self.layers):
            moved += _move_experts(self.ctx, moe.experts, self.placement.phy2log[i],
                                   new.phy2log[i])
        self.placement = new
        report = RebalanceReport(self.steps, before, after, moved)
        self.reports.append(report)
        logger.info("EPLB at step %d: per-rank max/mean load %.3f -> %.3f, %d expert copies "
                    "fetched by rank %d", self.steps, before, after, moved, self.ctx.rank)
        return report


def _move_experts(ctx: ParallelContext, experts: Experts, old: torch.Tensor,
                  new: torch.Tensor) -> int:
    """Give this rank the experts `new` assigns it, fetching missing ones from their holders.

    old/new: [P] phy2log of one layer. Every rank derives the same send/receive lists from the
    two maps, so one all_to_all with known sizes moves everything.
    """
    world, me = ctx.world_size, ctx.rank
    old_r = old.view(world, -1).tolist()
    new_r = new.view(world, -1).tolist()
    source = {}
    for r in range(world):
        for e in old_r[r]:
            source.setdefault(e, r)  # the lowest rank holding a copy serves it

    def needed(dst: int, src: int) -> list[int]:
        held = set(old_r[dst])
        return sorted({e for e in new_r[dst] if e not in held and source[e] == src})

    # An expert travels as one row of bytes: its weights and, fp8, their scales (gloo and
    # NCCL move uint8 whatever the dtypes inside).
    held = {name: p.data for name, p in experts.stacked().items()}
    sizes = [t[0].numel() * t.element_size() for t in held.values()]
    mine = {e: s for s, e in reversed(list(enumerate(old_r[me])))}
    send_lists = [needed(d, me) if d != me else [] for d in range(world)]
    recv_lists = [needed(me, s) if s != me else [] for s in range(world)]
    sends = [torch.cat([t[mine[e]].reshape(-1).view(torch.uint8) for t in held.values()])
             for lst in send_lists for e in lst]
    send = torch.stack(sends) if sends else torch.empty(0, sum(sizes), dtype=torch.uint8,
                                                         device=experts.w13.device)
    n_recv = sum(len(lst) for lst in recv_lists)
    recv = send.new_empty(n_recv, sum(sizes))
    ctx.wait(dist.all_to_all_single(
        recv, send, [len(lst) for lst in recv_lists], [len(lst) for lst in send_lists],
        group=ctx.group, async_op=True))
    fetched = {e: recv[i] for i, e in enumerate(e for lst in recv_lists for e in lst)}
    new = {name: torch.empty_like(t) for name, t in held.items()}
    for slot, e in enumerate(new_r[me]):
        offset = 0
        for (name, t), size in zip(held.items(), sizes, strict=True):
            if e in mine:
                new[name][slot] = t[mine[e]]
            else:
                new[name][slot].reshape(-1).view(torch.uint8).copy_(
                    fetched[e][offset : offset + size])
            offset += size
    experts.set_placement(new_r[me], new)
    return n_recv
