"""One expert-parallel forward step, optionally as two overlapped micro-batches (DBO).

Each micro-batch runs the model's one layer loop (`DeepseekForCausalLM.stages`), a generator
that yields whenever its all-to-all is in flight. Alternating between two such generators
(`run_stages`) puts micro-batch A's dispatch/combine on the wire while micro-batch B computes
attention or experts, and the other way round. Every rank runs the same number of
micro-batches (empty ones on an idle rank) so collectives pair up.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from moeserve.worker.model import AttentionMetadata, DeepseekForCausalLM
from moeserve.worker.model.forward_context import ForwardContext, KernelBackend, run_stages
from moeserve.worker.parallel.expert_parallel import ExpertParallel

__all__ = ["MicroBatch", "StepBatch", "split_point", "forward_step"]


@dataclass(frozen=True)
class StepBatch:
    """A rank's scheduled tokens, request after request (the runner's lists)."""

    token_ids: list[int]
    tables: list[list[int]]
    context_lens: list[int]
    query_lens: list[int]


@dataclass(frozen=True)
class MicroBatch:
    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    meta: AttentionMetadata | None  # None when T == 0

    @classmethod
    def build(cls, batch: StepBatch, lo: int, hi: int, block_size: int,
              device: torch.device) -> MicroBatch:
        """Requests lo..hi of `batch`."""
        tok_lo = sum(batch.query_lens[:lo])
        tok_hi = tok_lo + sum(batch.query_lens[lo:hi])
        ids = torch.tensor(batch.token_ids[tok_lo:tok_hi], dtype=torch.int64, device=device)
        if hi <= lo:
            return cls(ids, torch.zeros(0, dtype=torch.int64, device=device), None)
        meta, positions = AttentionMetadata.build(
            batch.tables[lo:hi], batch.context_lens[lo:hi], batch.query_lens[lo:hi],
            block_size, device)
        return cls(ids, positions, meta)

    def context(self, kv_cache: torch.Tensor, model: DeepseekForCausalLM) -> ForwardContext:
        return ForwardContext(self.positions, kv_cache, self.meta, model.rotary)


def split_point(query_lens: Sequence[int]) -> int:
    """Request index splitting the batch into two halves of near-equal tokens."""
    total, acc = sum(query_lens), 0
    best, best_gap = 0, total
    for i, n in enumerate(query_lens):
        acc += n
        gap = abs(total - 2 * acc)
        if gap < best_gap:
            best, best_gap = i + 1, gap
    return best


def forward_step(ep: ExpertParallel, model: DeepseekForCausalLM, kv_cache: torch.Tensor,
                 batch: StepBatch, block_size: int, device: torch.device,
                 backend: KernelBackend) -> torch.Tensor:
    """Hidden states [T, H] of this rank's batch (T may be 0: the rank only relays experts).

    Every rank of the group must call this once per step.
    """
    ep.begin_step()
    c = ep.config
    use_dbo = False
    if c.enable_dbo:
        # The decision must be the same on every rank, so it is made on the largest batch.
        (max_tokens,) = ep.ctx.all_reduce_max([len(batch.token_ids)])
        use_dbo = max_tokens >= c.dbo_token_threshold
    n = len(batch.query_lens)
    bounds = [0, split_point(batch.query_lens), n] if use_dbo else [0, n]
    mbs = [MicroBatch.build(batch, lo, hi, block_size, device)
           for lo, hi in zip(bounds, bounds[1:], strict=False)]
    outs = run_stages([model.stages(mb.input_ids, mb.context(kv_cache, model))
                       for mb in mbs], backend)
    return torch.cat(outs) if len(outs) > 1 else outs[0]
