"""Async scheduling: decode step N+1 is scheduled and launched before step N's tokens reach
the host. Users must see exactly the tokens of the synchronous engine, in the same order,
with every block returned, whatever stops, aborts or joins in between."""

from __future__ import annotations

import random

import pytest

from moeserve.common.sampling import SamplingParams
from moeserve.worker.config import EngineConfig
from moeserve.worker.engine import LLMEngine


def _engine(path, mode: str, **kw) -> LLMEngine:
    kw.setdefault("block_size", 4)
    kw.setdefault("num_kv_blocks", 256)
    return LLMEngine(EngineConfig(model=str(path), async_scheduling=mode, **kw))


def _prompts(lengths, seed=0):
    rng = random.Random(seed)
    return [[rng.randrange(2, 500) for _ in range(n)] for n in lengths]


def _run(engine: LLMEngine, requests, on_step=None) -> dict[str, list]:
    """request id -> list of outputs, driving the engine as the engine loop does."""
    for rid, prompt, params in requests:
        engine.add_request(rid, prompt, params)
    got: dict[str, list] = {}
    step = 0
    while engine.has_unfinished_requests():
        for o in engine.step():
            got.setdefault(o.request_id, []).append(o)
        step += 1
        if on_step is not None:
            on_step(engine, step, got)
    return got


def _tokens(outputs) -> list[int]:
    return [t for o in outputs for t in o.new_token_ids]


def _spy_ahead(engine: LLMEngine) -> list[int]:
    """Sizes of the steps scheduled ahead (the overlap actually happening)."""
    sizes: list[int] = []
    inner = engine.scheduler.schedule_ahead

    def spy(prev, rows):
        out = inner(prev, rows)
        if out is not None:
            sizes.append(len(out.scheduled))
        return out

    engine.scheduler.schedule_ahead = spy
    return sizes


def test_stops_and_lengths_match_the_synchronous_engine(tiny_v3):
    prompts = _prompts((3, 9, 17, 30, 41, 5))
    free = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    ref = _engine(tiny_v3, "off").generate(prompts, free)
    # Request i stops on the token it produces at step i + 2: the steps ahead carry rows for
    # requests that have already stopped, which must neither print nor leak.
    params = [SamplingParams(max_tokens=16, temperature=0, stop_token_ids=(ref[i][i + 2],))
              for i in range(4)]
    params += [SamplingParams(max_tokens=3, temperature=0, ignore_eos=True),  # length
               SamplingParams(max_tokens=16, temperature=0, min_tokens=9,
                              stop_token_ids=tuple(ref[5][:6]))]  # suppressed, then stops
    requests = [(str(i), p, sp) for i, (p, sp) in enumerate(zip(prompts, params, strict=True))]
    want = _run(_engine(tiny_v3, "off"), requests)
    engine = _engine(tiny_v3, "on")
    ahead = _spy_ahead(engine)
    got = _run(engine, requests)
    assert {k: _tokens(v) for k, v in got.items()} == {k: _tokens(v) for k, v in want.items()}
    assert [(o[-1].finished, o[-1].finish_reason) for o in got.values()] == [
        (o[-1].finished, o[-1].finish_reason) for o in want.values()]
    for outputs in got.values():  # nothing after the last output of a request
        assert [o.finished for o in outputs] == [False] * (len(outputs) - 1) + [True]
    assert len(ahead) > 5  # the overlap ran
    assert engine.stats().kv_usage == 0.0


def test_min_tokens_counts_the_token_still_being_sampled(tiny_v3):
    """Stop ids are suppressed for the first min_tokens tokens and no longer: a row
    scheduled ahead counts the output token its step before is still sampling."""
    prompt = _prompts((11,), seed=9)[0]
    stop = set(_engine(tiny_v3, "off").generate(
        [prompt], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))[0])
    for _ in range(20):  # grow the stop set until the first token allowed to stop does
        params = SamplingParams(max_tokens=12, temperature=0, min_tokens=4,
                                stop_token_ids=tuple(sorted(stop)))
        want = _engine(tiny_v3, "off").generate([prompt], params)[0]
        if len(want) == 5:
            break
        stop.add(want[4])
    assert len(want) == 5 and want[4] in stop and not stop.intersection(want[:4])
    assert _engine(tiny_v3, "on").generate([prompt], params)[0] == want


def test_seeded_sampling_matches_the_synchronous_engine(tiny_v3):
    prompts = _prompts((6, 20, 9, 13), seed=3)
    params = [SamplingParams(max_tokens=10 + s, temperature=0.8, top_p=0.9, top_k=50, seed=s,
                             ignore_eos=True) for s in range(4)]
    assert (_engine(tiny_v3, "on").generate(prompts, params)
            == _engine(tiny_v3, "off").generate(prompts, params))


def test_blocks_of_a_stopped_request_wait_for_the_step_ahead(tiny_v3):
    """A request that stops at step N still has a row in the launched step N+1, which writes
    its KV: its blocks go back to the pool only once N+1 has run."""
    prompts = _prompts((5, 7))
    free = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    ref = _engine(tiny_v3, "off").generate(prompts, free)
    engine = _engine(tiny_v3, "on")
    engine.add_request("stops", prompts[0],
                       SamplingParams(max_tokens=8, temperature=0, stop_token_ids=(ref[0][3],)))
    engine.add_request("goes on", prompts[1], free)
    blocks = None
    while blocks is None:
        for o in engine.step():
            if o.request_id == "stops" and o.finished:
                ahead, _ = engine._in_flight
                assert "stops" in ahead.num_scheduled_tokens
                blocks = list(ahead.scheduled[0].block_ids)
    pool = engine.kv_manager.pool
    assert blocks and not any(pool.is_free(b) for b in blocks)
    engine.step()
    assert all(pool.is_free(b) for b in blocks)
    while engine.has_unfinished_requests():
        engine.step()
    assert engine.stats().kv_usage == 0.0


def test_abort_while_a_step_is_ahead(tiny_v3):
    prompts = _prompts((3, 9, 17))
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    ref = _engine(tiny_v3, "off").generate(prompts, params)
    engine = _engine(tiny_v3, "on")
    aborted: list = []

    def abort_1(engine, step, got):
        if step == 4:
            assert engine._in_flight is not None
            aborted.extend(engine.abort_request("1"))

    got = _run(engine, [(str(i), p, params) for i, p in enumerate(prompts)], abort_1)
    assert _tokens(got["0"]) == ref[0] and _tokens(got["2"]) == ref[2]
    assert [o.finish_reason for o in aborted] == ["abort"]
    assert all(not o.finished for o in got["1"])  # no output of "1" after its abort
    assert _tokens(got["1"]) == ref[1][: len(got["1"])]
    assert engine.stats().kv_usage == 0.0


def test_arrivals_and_remote_kv_join_a_running_batch(tiny_v3):
    """New prompts wait for a synchronous step; a request whose KV came from a prefill
    worker joins the step ahead with its first token known."""
    prompts = _prompts((3, 9, 17, 30), seed=5)
    params = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    ref = _engine(tiny_v3, "off").generate(prompts, params)
    prefill = _engine(tiny_v3, "off")
    prefill.add_request("3", prompts[3], params, prefill_only=True)
    (first,) = [o for _ in range(4) for o in prefill.step()]
    engine = _engine(tiny_v3, "on")
    ahead = _spy_ahead(engine)

    def join(engine, step, got):
        if step == 3:
            engine.add_request("2", prompts[2], params)
        if step == 6:
            res = engine.add_remote_kv_request("3", prompts[3], params)
            engine.kv_cache[res.block_ids] = prefill.kv_cache[prefill.pinned_blocks("3")]
            got["3"] = engine.finish_remote_kv("3", first.new_token_ids[0])

    got = _run(engine, [(str(i), p, params) for i, p in enumerate(prompts[:2])], join)
    assert [_tokens(got[str(i)]) for i in range(4)] == ref
    assert 4 in ahead  # the remote request ran in a step ahead beside the other three
    assert engine.stats().kv_usage == 0.0


def test_a_request_waiting_for_remote_kv_does_not_stall_the_steps_ahead(tiny_v3):
    """While its KV is read (WAITING_FOR_REMOTE_KV) the request holds its blocks, is never
    scheduled and does not stop the running batch from being launched a step ahead."""
    prompts = _prompts((5, 11, 23), seed=9)
    params = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    ref = _engine(tiny_v3, "off").generate(prompts, params)
    prefill = _engine(tiny_v3, "off")
    prefill.add_request("2", prompts[2], params, prefill_only=True)
    (first,) = [o for _ in range(4) for o in prefill.step()]
    engine = _engine(tiny_v3, "on")
    ahead = _spy_ahead(engine)
    waited: list[int] = []

    def remote(engine, step, got):
        if step == 2:
            blocks = engine.add_remote_kv_request("2", prompts[2], params)
            assert blocks is not None and engine.has_unfinished_requests()
            remote.blocks = blocks
            remote.ahead_before = len(ahead)
        elif 2 < step < 6:
            assert "2" not in got  # not scheduled while its KV is in flight
            waited.append(step)
        elif step == 6:
            assert len(ahead) > remote.ahead_before  # the batch kept running ahead meanwhile
            engine.kv_cache[remote.blocks.block_ids] = prefill.kv_cache[
                prefill.pinned_blocks("2")]
            got["2"] = engine.finish_remote_kv("2", first.new_token_ids[0])

    got = _run(engine, [(str(i), p, params) for i, p in enumerate(prompts[:2])], remote)
    assert waited == [3, 4, 5]
    assert [_tokens(got[str(i)]) for i in range(3)] == ref
    assert engine.stats().kv_usage == 0.0


def test_async_scheduling_setting_is_checked(tiny_v3):
    with pytest.raises(ValueError, match="async_scheduling must be auto, on or off"):
        EngineConfig(model=str(tiny_v3), async_scheduling="yes")
    with pytest.raises(ValueError, match="expert parallelism"):
        EngineConfig(model=str(tiny_v3), async_scheduling="on", ep=2, dp=2)
