"""Routing decisions as pure functions: which worker, and whether to disaggregate.

``prefix`` (default) scores each worker by blocks it already caches minus its load, all in
block units: one queued request costs ``queue_weight`` blocks, a full KV cache ``kv_weight``
blocks. Ties (for example no worker caches the prompt) go to the worker caching least overall,
then rotate, so cold traffic spreads instead of piling onto the first name.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum

__all__ = [
    "Candidate",
    "Policy",
    "WorkerLoad",
    "choose",
    "pick_prefix",
    "pick_random",
    "pick_round_robin",
    "prefix_score",
    "should_disaggregate",
]


class Policy(StrEnum):
    PREFIX = "prefix"
    ROUND_ROBIN = "round_robin"
    RANDOM = "random"


@dataclass(frozen=True)
class WorkerLoad:
    """Last load report of a worker plus what this router itself has in flight there."""

    num_running: int = 0
    num_waiting: int = 0
    kv_usage: float = 0.0
    inflight: int = 0

    @property
    def queue(self) -> int:
        # The worker's report lags; the router's own count is fresher for its own requests.
        return max(self.num_running + self.num_waiting, self.inflight)


@dataclass(frozen=True)
class Candidate:
    name: str
    overlap_blocks: int = 0
    load: WorkerLoad = WorkerLoad()
    # Everything the worker caches: among equal scores the emptier cache wins, so cold
    # prefixes spread over the workers instead of crowding one cache.
    cached_blocks: int = 0


def prefix_score(
    overlap_blocks: int, load: WorkerLoad, queue_weight: float = 1.0, kv_weight: float = 4.0
) -> float:
    """Blocks the worker would not have to compute, minus the cost of its load."""
    return overlap_blocks - queue_weight * load.queue - kv_weight * load.kv_usage


def pick_prefix(
    candidates: Sequence[Candidate],
    counter: int,
    queue_weight: float = 1.0,
    kv_weight: float = 4.0,
) -> Candidate:
    """Highest ``prefix_score``; ties go to the emptier cache, then rotate with ``counter``."""
    if not candidates:
        raise ValueError("no candidate workers")
    scores = [prefix_score(c.overlap_blocks, c.load, queue_weight, kv_weight) for c in candidates]
    best = max(scores)
    tied = [c for c, s in zip(candidates, scores, strict=True) if s >= best - 1e-9]
    emptiest = min(c.cached_blocks for c in tied)
    tied = [c for c in tied if c.cached_blocks == emptiest]
    return tied[counter % len(tied)]


def pick_round_robin(candidates: Sequence[Candidate], counter: int) -> Candidate:
    if not candidates:
        raise ValueError("no candidate workers")
    return candidates[counter % len(candidates)]


def pick_random(candidates: Sequence[Candidate], rng: random.Random) -> Candidate:
    if not candidates:
        raise ValueError("no candidate workers")
    return rng.choice(list(candidates))


def choose(
    policy: Policy,
    candidates: Sequence[Candidate],
    counter: int,
    rng: random.Random,
    queue_weight: float = 1.0,
    kv_weight: float = 4.0,
) -> Candidate:
    """The worker ``policy`` picks among ``candidates`` (given in a stable order)."""
    if policy is Policy.PREFIX:
        return pick_prefix(candidates, counter, queue_weight, kv_weight)
    if policy is Policy.ROUND_ROBIN:
        return pick_round_robin(candidates, counter)
    return pick_random(candidates, rng)


def should_disaggregate(
    num_prompt_tokens: int, num_cached_tokens: int, threshold: int, have_prefill: bool = True
) -> bool:
    """Send the prompt to a prefill worker only when enough of it is uncached on the decoder.

    Short uncached tails are cheaper to prefill in place than to move over the network
    (conditional disaggregation); ``threshold`` 0 always disaggregates when a prefill worker
    is available.
    """
    if not have_prefill:
        return False
    return num_prompt_tokens - num_cached_tokens >= threshold
