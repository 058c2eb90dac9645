"""Continuous batching gives every request the tokens it gets alone."""

from __future__ import annotations

import pytest

from moeserve.common.sampling import SamplingParams
from moeserve.worker.config import EngineConfig
from moeserve.worker.engine import LLMEngine

GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)


def _prompts(lengths, seed=0):
    import random

    rng = random.Random(seed)
    return [[rng.randrange(2, 500) for _ in range(n)] for n in lengths]


@pytest.fixture(params=["off", "on"])
def mode(request) -> str:
    """Async scheduling off and on: batching must not change a request's tokens either way."""
    return request.param


def _engine(path, mode="off", **kw) -> LLMEngine:
    kw.setdefault("async_scheduling", mode)
    kw.setdefault("block_size", 4)
    kw.setdefault("num_kv_blocks", 256)
    return LLMEngine(EngineConfig(model=str(path), **kw))


@pytest.fixture(scope="module")
def alone(tiny_v3):
    """Each prompt run by itself on a fresh engine: the reference outputs."""
    prompts = _prompts((3, 9, 17, 30, 41, 5))
    outs = []
    for p in prompts:
        outs.append(_engine(tiny_v3, enable_prefix_caching=False).generate([p], GREEDY)[0])
    assert len({tuple(o) for o in outs}) > 1  # outputs depend on the prompt
    return prompts, outs


def test_batched_equals_alone(tiny_v3, alone, mode):
    prompts, ref = alone
    assert _engine(tiny_v3, mode).generate(prompts, GREEDY) == ref


def test_small_chunked_prefill_equals_alone(tiny_v3, alone, mode):
    prompts, ref = alone
    engine = _engine(tiny_v3, mode, max_num_batched_tokens=7)
    assert engine.generate(prompts, GREEDY) == ref


def test_staggered_arrivals_mix_prefill_and_decode(tiny_v3, alone, mode):
    prompts, ref = alone
    engine = _engine(tiny_v3, mode, max_num_batched_tokens=16)
    got: dict[str, list[int]] = {}
    pending = list(enumerate(prompts))
    while pending or engine.has_unfinished_requests():
        if pending:  # one new request joins while the others decode
            i, p = pending.pop(0)
            engine.add_request(str(i), p, GREEDY)
        for o in engine.step():
            got.setdefault(o.request_id, []).extend(o.new_token_ids)
    assert [got[str(i)] for i in range(len(prompts))] == ref


def test_prefix_cache_hit_gives_same_tokens(tiny_v3):
    shared = _prompts((24,), seed=7)[0]
    prompts = [shared + tail for tail in _prompts((5, 11), seed=8)]
    ref = [_engine(tiny_v3, enable_prefix_caching=False).generate([p], GREEDY)[0]
           for p in prompts]
    engine = _engine(tiny_v3)
    assert engine.generate([prompts[0]], GREEDY) == [ref[0]]
    before = engine.stats().prefix_cache_hits
    assert engine.generate([prompts[1]], GREEDY) == [ref[1]]
    assert engine.stats().prefix_cache_hits - before == 24  # six full blocks of 4 reused


def test_preemption_by_tiny_pool_keeps_every_request(tiny_v3, alone, mode):
    prompts, ref = alone
    # 24 blocks of 4 tokens cannot hold all six requests at once: some are preempted and
    # recomputed, and still produce exactly their solo tokens.
    engine = _engine(tiny_v3, mode, num_kv_blocks=24, max_model_len=60)
    assert engine.generate(prompts, GREEDY) == ref
    assert engine.stats().num_preemptions > 0


def test_seeded_sampling_does_not_depend_on_batch(tiny_v3):
    prompts = _prompts((6, 20, 9), seed=3)
    params = [SamplingParams(max_tokens=10, temperature=0.8, top_p=0.9, top_k=50, seed=s,
                             ignore_eos=True) for s in (1, 2, 3)]
    batched = _engine(tiny_v3).generate(prompts, params)
    for p, sp, got in zip(prompts, params, batched, strict=True):
        assert _engine(tiny_v3).generate([p], sp)[0] == got
    # and the seed matters
    other = _engine(tiny_v3).generate([prompts[0]], SamplingParams(
        max_tokens=10, temperature=0.8, top_p=0.9, top_k=50, seed=99, ignore_eos=True))
    assert other[0] != batched[0]


def test_abort_frees_blocks_and_others_finish(tiny_v3, alone, mode):
    prompts, ref = alone
    engine = _engine(tiny_v3, mode)
    for i, p in enumerate(prompts[:3]):
        engine.add_request(str(i), p, GREEDY)
    got: dict[str, list[int]] = {}
    for o in engine.step():
        got.setdefault(o.request_id, []).extend(o.new_token_ids)
    engine.abort_request("1")
    while engine.has_unfinished_requests():
        for o in engine.step():
            got.setdefault(o.request_id, []).extend(o.new_token_ids)
    assert got["2"] == ref[2]
    assert engine.stats().kv_usage == 0.0
