"""Routing policies and the conditional disaggregation decision."""

from __future__ import annotations

import random

import pytest

from moeserve.router.policy import (
    Candidate,
    Policy,
    WorkerLoad,
    choose,
    pick_prefix,
    prefix_score,
    should_disaggregate,
)


def test_prefix_prefers_cached_worker_unless_overloaded() -> None:
    cached = Candidate("a", overlap_blocks=8, load=WorkerLoad(num_running=2))
    cold = Candidate("b", overlap_blocks=0)
    assert pick_prefix([cold, cached], counter=0).name == "a"
    busy = Candidate("a", overlap_blocks=8, load=WorkerLoad(num_waiting=20, kv_usage=0.9))
    assert pick_prefix([cold, busy], counter=0).name == "b"


def test_prefix_score_uses_freshest_queue_and_kv_usage() -> None:
    load = WorkerLoad(num_running=1, num_waiting=1, kv_usage=0.5, inflight=5)
    assert load.queue == 5
    assert prefix_score(10, load, queue_weight=1.0, kv_weight=4.0) == pytest.approx(3.0)


def test_ties_rotate_like_round_robin() -> None:
    cands = [Candidate("a"), Candidate("b"), Candidate("c")]
    picks = [pick_prefix(cands, counter=i).name for i in range(6)]
    assert picks == ["a", "b", "c", "a", "b", "c"]


def test_ties_prefer_the_emptier_cache() -> None:
    cands = [Candidate("a", cached_blocks=10), Candidate("b", cached_blocks=0)]
    assert {pick_prefix(cands, counter=i).name for i in range(4)} == {"b"}


def test_round_robin_and_random() -> None:
    cands = [Candidate("a", overlap_blocks=100), Candidate("b")]
    rng = random.Random(0)
    assert [choose(Policy.ROUND_ROBIN, cands, i, rng).name for i in range(4)] == list("abab")
    seen = {choose(Policy.RANDOM, cands, 0, rng).name for _ in range(50)}
    assert seen == {"a", "b"}
    with pytest.raises(ValueError):
        choose(Policy.PREFIX, [], 0, rng)


def test_conditional_disaggregation() -> None:
    assert should_disaggregate(1000, 0, threshold=256)
    assert not should_disaggregate(1000, 900, threshold=256)  # decode has most of it cached
    assert not should_disaggregate(100, 0, threshold=256)  # short prompt: prefill in place
    assert should_disaggregate(1, 0, threshold=0)
    assert not should_disaggregate(1000, 0, threshold=0, have_prefill=False)
