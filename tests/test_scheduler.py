"""Scheduler driven by a fake model that reads its context back through the block tables.

The fake model writes each computed token into a fake paged KV store at the slot its block
table names, and predicts the next token from what it reads back. A wrong block table, a
stale prefix-cache hit or a lost preempted token therefore changes the output, and every
test compares against the request run alone.
"""

import pytest

from moeserve.common.errors import ConfigError, InvalidRequestError
from moeserve.common.sampling import SamplingParams
from moeserve.worker.block_pool import NULL_BLOCK_ID
from moeserve.worker.kv_cache_manager import KVCacheManager
from moeserve.worker.request import Request, RequestStatus
from moeserve.worker.scheduler import Scheduler, SchedulerConfig

BS = 4
VOCAB = 101
MODEL = "fake"


class FakeModel:
    def __init__(self):
        self.kv: dict[int, list[int | None]] = {}

    def __call__(self, sched, out):
        sampled = {}
        for req in out.scheduled:
            assert NULL_BLOCK_ID not in req.block_ids
            n = out.num_scheduled_tokens[req.request_id]
            start = req.num_computed_tokens
            assert len(req.block_ids) * BS >= start + n
            for pos in range(start, start + n):
                block = self.kv.setdefault(req.block_ids[pos // BS], [None] * BS)
                block[pos % BS] = req.all_token_ids[pos]
            if sched.needs_sampling(req, n):
                context = [self.kv[req.block_ids[p // BS]][p % BS] for p in range(start + n)]
                assert context == req.all_token_ids  # the KV the model attends to is right
                sampled[req.request_id] = (context[-1] * 7 + 3 + len(context)) % VOCAB
        return sampled


def make_sched(num_blocks=64, prefix_caching=True, **config):
    kv = KVCacheManager(num_blocks, BS, MODEL, enable_prefix_caching=prefix_caching)
    return Scheduler(SchedulerConfig(**config), kv)


def make_req(rid, prompt, eos=None, **params):
    params.setdefault("max_tokens", 8)
    return Request(rid, prompt, SamplingParams(**params), eos, block_size=BS, model_id=MODEL)


def drive(sched, reqs, max_steps=1000, on_step=None, model=None):
    """Run to completion; returns ({id: output tokens}, {id: finish reason}, step outputs)."""
    model = model or FakeModel()
    for req in reqs:
        sched.add_request(req)
    tokens, reasons, steps = {}, {}, []
    for _ in range(max_steps):
        if not sched.has_unfinished_requests():
            break
        out = sched.schedule()
        steps.append(out)
        assert out.total_num_scheduled_tokens <= sched.config.max_num_batched_tokens
        assert len(out.scheduled) <= sched.config.max_num_seqs
        if on_step:
            on_step(sched, out)
        for o in sched.update_from_output(out, model(sched, out)):
            tokens.setdefault(o.request_id, []).extend(o.new_token_ids)
            if o.finished:
                reasons[o.request_id] = o.finish_reason
    assert not sched.has_unfinished_requests(), "requests left unfinished"
    return tokens, reasons, steps


def alone(prompt, **params):
    tokens, _, _ = drive(make_sched(), [make_req("solo", prompt, **params)])
    return tokens["solo"]


PROMPTS = {
    "a": [5, 9, 2],
    "b": list(range(1, 18)),
    "c": [7] * 11,
    "d": list(range(40, 9, -1)),
    "e": [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5],
}


def expected(max_tokens=8):
    return {rid: alone(p, max_tokens=max_tokens) for rid, p in PROMPTS.items()}


def check_scheduled_kv_clean(sched):
    assert sched.kv.usage == 0.0
    assert sched.num_running == sched.num_waiting == 0


def test_batched_equals_alone_with_budget_respected():
    sched = make_sched(max_num_batched_tokens=16)
    reqs = [make_req(rid, p) for rid, p in PROMPTS.items()]
    tokens, reasons, steps = drive(sched, reqs)
    assert tokens == expected()
    assert set(reasons.values()) == {"length"}
    assert max(s.total_num_scheduled_tokens for s in steps) == 16
    check_scheduled_kv_clean(sched)


def test_chunked_prefill_and_mixed_decode():
    sched = make_sched(max_num_batched_tokens=8, long_prefill_token_threshold=5)
    seen_mixed = []

    def on_step(sched, out):
        for req in out.scheduled:
            assert out.num_scheduled_tokens[req.request_id] <= 5
        decodes = [r for r in out.scheduled if r.num_output_tokens > 0]
        prefills = [r for r in out.scheduled if r.num_output_tokens == 0]
        if decodes and prefills:
            seen_mixed.append(out)
            # Batch order: running requests first, newly admitted ones after.
            new = set(out.new_req_ids)
            flags = [r.request_id in new for r in out.scheduled]
            assert flags == sorted(flags)

    tokens, _, _ = drive(sched, [make_req(rid, p) for rid, p in PROMPTS.items()], on_step=on_step)
    assert tokens == expected()
    assert seen_mixed


def test_long_prompt_is_chunked_over_steps():
    sched = make_sched(max_num_batched_tokens=6)
    req = make_req("d", PROMPTS["d"], max_tokens=3)
    tokens, _, steps = drive(sched, [req])
    prefill = [s.num_scheduled_tokens["d"] for s in steps[:6]]
    assert prefill == [6, 6, 6, 6, 6, 1]  # 31 prompt tokens, then 1 per decode
    assert tokens["d"] == alone(PROMPTS["d"], max_tokens=3)


def test_preemption_under_tiny_pool_finishes_everything_correctly():
    # 11 usable blocks = 44 tokens: the longest request (31 + 12 tokens) just fits alone,
    # and all five together need about 3x the pool.
    sched = make_sched(num_blocks=12, max_num_batched_tokens=32)
    preempted = set()
    tokens, reasons, steps = drive(
        sched,
        [make_req(rid, p, max_tokens=12) for rid, p in PROMPTS.items()],
        on_step=lambda s, out: preempted.update(out.preempted_req_ids),
    )
    assert preempted, "the pool was meant to force preemption"
    assert tokens == expected(max_tokens=12)
    assert set(reasons.values()) == {"length"}
    check_scheduled_kv_clean(sched)


def test_preemption_without_prefix_caching():
    sched = make_sched(num_blocks=12, prefix_caching=False, max_num_batched_tokens=32)
    preempted = set()
    tokens, _, _ = drive(
        sched,
        [make_req(rid, p, max_tokens=12) for rid, p in PROMPTS.items()],
        on_step=lambda s, out: preempted.update(out.preempted_req_ids),
    )
    assert preempted
    assert tokens == expected(max_tokens=12)


def test_preempted_request_goes_to_front_and_is_recomputed():
    sched = make_sched(num_blocks=5, prefix_caching=False)  # 4 blocks = 16 tokens
    a = make_req("a", [1] * 7, max_tokens=6)
    b = make_req("b", [2] * 7, max_tokens=6)
    sched.add_request(a)
    sched.add_request(b)
    model = FakeModel()
    out = sched.schedule()
    assert [r.request_id for r in out.scheduled] == ["a", "b"]
    sched.update_from_output(out, model(sched, out))
    out = sched.schedule()  # both need a 3rd block at token 9: b is preempted
    sched.update_from_output(out, model(sched, out))
    out = sched.schedule()
    assert out.preempted_req_ids == ["b"]
    assert b.status == RequestStatus.PREEMPTED and b.block_ids == [] and b.num_computed_tokens == 0
    assert sched.waiting[0] is b and b.num_preemptions == 1


def test_prefix_cache_hit_reported_and_correct():
    sched = make_sched()
    model = FakeModel()  # one KV store across both runs: the hits read what "x" wrote
    shared = list(range(1, 14))
    t1, _, _ = drive(sched, [make_req("x", shared)], model=model)
    reqs = [make_req("y", shared + [60, 61]), make_req("z", shared[:9])]
    t2, _, steps = drive(sched, reqs, model=model)
    assert reqs[0].num_cached_tokens == 12 and reqs[1].num_cached_tokens == 8
    assert steps[0].num_scheduled_tokens == {"y": 3, "z": 1}
    assert t2["y"] == alone(shared + [60, 61]) and t2["z"] == alone(shared[:9])
    assert t1["x"] == alone(shared)


def test_max_num_seqs():
    sched = make_sched(max_num_seqs=2)
    tokens, _, steps = drive(sched, [make_req(rid, p) for rid, p in PROMPTS.items()])
    assert max(len(s.scheduled) for s in steps) == 2
    assert tokens == expected()


def test_abort_frees_blocks_and_reports():
    sched = make_sched()
    model = FakeModel()
    for rid in ("a", "b", "c"):
        sched.add_request(make_req(rid, PROMPTS["b"]))
    out = sched.schedule()
    sched.update_from_output(out, model(sched, out))
    usage = sched.kv.usage
    assert usage > 0
    out = sched.schedule()
    sampled = model(sched, out)
    # Abort between the model step and update_from_output(): b's result is dropped.
    aborted = sched.abort_requests(["b", "nope"])
    assert [(o.request_id, o.finished, o.finish_reason) for o in aborted] == [("b", True, "abort")]
    results = sched.update_from_output(out, sampled)
    assert {o.request_id for o in results} == {"a", "c"}
    assert sched.kv.usage < usage
    assert "b" in sched.schedule().finished_req_ids
    sched.abort_requests(["a", "c"])
    assert sched.kv.usage == 0.0 and not sched.has_unfinished_requests()


def test_abort_waiting_request():
    sched = make_sched(max_num_seqs=1)
    sched.add_request(make_req("a", [1, 2]))
    sched.add_request(make_req("b", [1, 2]))
    sched.schedule()
    assert sched.num_waiting == 1
    sched.abort_requests(["b"])
    assert sched.num_waiting == 0 and sched.num_running == 1


def stop_run(prompt, **kwargs):
    sched = make_sched(max_model_len=kwargs.pop("max_model_len", None))
    eos = kwargs.pop("eos", None)
    tokens, reasons, _ = drive(sched, [make_req("r", prompt, eos=eos, **kwargs)])
    return tokens["r"], reasons["r"]


def test_stop_conditions():
    free_run = alone([5, 9, 2], max_tokens=8)
    eos = free_run[3]
    first = free_run.index(eos)
    assert stop_run([5, 9, 2], eos=eos) == (free_run[: first + 1], "stop")
    assert stop_run([5, 9, 2], eos=eos, ignore_eos=True) == (free_run, "length")
    assert stop_run([5, 9, 2], stop_token_ids=[free_run[2]]) == (free_run[:3], "stop")
    # min_tokens: a stop token before it does not stop the request.
    tokens, reason = stop_run([5, 9, 2], stop_token_ids=[free_run[0]], min_tokens=2)
    later = [i for i, t in enumerate(free_run) if t == free_run[0] and i >= 1]
    if later:
        assert (tokens, reason) == (free_run[: later[0] + 1], "stop")
    else:
        assert (tokens, reason) == (free_run, "length")
    assert stop_run([5, 9, 2], max_tokens=2) == (free_run[:2], "length")
    # max_model_len counts prompt + output tokens.
    assert stop_run([5, 9, 2], max_model_len=6) == (free_run[:3], "length")
    # A prompt exactly at the limit still gets one token.
    assert stop_run([5, 9, 2], max_model_len=3) == (free_run[:1], "length")


def test_output_reports_first_token_and_cached_tokens():
    sched = make_sched()
    sched.add_request(make_req("a", [1, 2, 3]))
    out = sched.schedule()
    (o,) = sched.update_from_output(out, FakeModel()(sched, out))
    assert (o.request_id, len(o.new_token_ids), o.finished, o.num_cached_tokens) == (
        "a",
        1,
        False,
        0,
    )


def test_bad_requests_rejected():
    sched = make_sched(max_model_len=10)
    with pytest.raises(InvalidRequestError, match="max_model_len"):
        sched.add_request(make_req("long", list(range(11))))
    with pytest.raises(InvalidRequestError) as info:
        sched.add_request(make_req("empty", []))
    assert info.value.param == "prompt"
    sched.add_request(make_req("a", [1]))
    with pytest.raises(InvalidRequestError, match="duplicate"):
        sched.add_request(make_req("a", [1]))


def test_sampled_tokens_must_match_needs_sampling():
    sched = make_sched(max_num_batched_tokens=4)
    sched.add_request(make_req("a", list(range(10))))
    out = sched.schedule()  # a 4-token chunk of a 10-token prompt: nothing to sample
    with pytest.raises(ValueError, match="needs_sampling"):
        sched.update_from_output(out, {"a": 1})


def test_max_model_len_capped_by_kv_capacity():
    sched = make_sched(num_blocks=5, max_model_len=1000)
    assert sched.max_model_len == 16


def test_chunking_disabled_admits_whole_prompts_only():
    with pytest.raises(ConfigError):
        SchedulerConfig(enable_chunked_prefill=False)
    sched = make_sched(enable_chunked_prefill=False, max_num_batched_tokens=48, max_model_len=48)

    def on_step(sched, out):
        for req in out.scheduled:
            # Every chunk runs to the end of the request's tokens: a whole prompt or a decode.
            assert sched.needs_sampling(req, out.num_scheduled_tokens[req.request_id])

    reqs = [make_req(rid, p) for rid, p in PROMPTS.items()]
    tokens, _, steps = drive(sched, reqs, on_step=on_step)
    assert tokens == expected()
    # a (3) + b (17) + c (11) fit the 48-token budget; d (31) does not, and e may not overtake.
    assert [r.request_id for r in steps[0].scheduled] == ["a", "b", "c"]


def test_shared_prefix_hits_blocks_of_running_requests():
    # A small budget staggers admission, so later requests hit blocks the first one is
    # still holding (shared, ref count > 1) and then diverge.
    sched = make_sched(max_num_batched_tokens=20, num_blocks=24)
    shared = list(range(30, 50))
    prompts = {f"s{i}": shared + [i] * (i + 1) for i in range(4)}
    reqs = [make_req(rid, p, max_tokens=6) for rid, p in prompts.items()]
    tokens, _, _ = drive(sched, reqs)
    assert [r.num_cached_tokens for r in reqs] == [0, 20, 20, 20]
    assert tokens == {rid: alone(p, max_tokens=6) for rid, p in prompts.items()}
    check_scheduled_kv_clean(sched)


# ---------------------------------------------------------------- KV computed on another worker


def remote_kv_ready(model, req):
    """What a KV READ does: the prompt's KV lands in the request's blocks."""
    for pos, token in enumerate(req.prompt_token_ids):
        model.kv.setdefault(req.block_ids[pos // BS], [None] * BS)[pos % BS] = token


def test_request_waiting_for_remote_kv_is_not_scheduled_and_holds_its_blocks():
    sched, model = make_sched(), FakeModel()
    r = make_req("r", PROMPTS["b"])  # 17 tokens: 5 blocks
    got = sched.add_remote_kv_request(r)
    assert got.num_cached_blocks == 0 and got.block_ids == r.block_ids and len(got.block_ids) == 5
    assert r.status is RequestStatus.WAITING_FOR_REMOTE_KV
    assert not sched.has_unfinished_requests()  # nothing for a step to do: the engine idles
    free = sched.kv.num_free_blocks

    def never_r(sched, out):
        assert "r" not in out.num_scheduled_tokens
        assert all(sched.kv.pool.ref_count(b) == 1 for b in got.block_ids)

    tokens, _, steps = drive(sched, [make_req("a", PROMPTS["a"])], on_step=never_r, model=model)
    assert tokens["a"] == alone(PROMPTS["a"]) and len(steps) == 8
    assert sched.kv.num_free_blocks == free  # a's blocks came back, r's are still held
    assert sched.num_waiting == sched.num_running == 0 and "r" in sched.requests
    with pytest.raises(InvalidRequestError, match="duplicate request id"):
        sched.add_remote_kv_request(make_req("r", PROMPTS["b"]))


def test_remote_kv_completion_makes_the_request_run_with_its_first_token():
    ref = alone(PROMPTS["b"])
    sched, model = make_sched(), FakeModel()
    r = make_req("r", PROMPTS["b"])
    sched.add_remote_kv_request(r)
    remote_kv_ready(model, r)
    out = sched.finish_remote_kv("r", ref[0])
    assert (out.request_id, out.new_token_ids, out.finished) == ("r", [ref[0]], False)
    # First in line with its blocks: admitted by the next step, within max_num_seqs.
    assert r.status is RequestStatus.WAITING and r.num_computed_tokens == len(PROMPTS["b"])
    tokens, reasons, steps = drive(sched, [], model=model)
    assert [ref[0]] + tokens["r"] == ref and reasons["r"] == "length"
    # No step computed the prompt: every step was one decode token.
    assert all(s.num_scheduled_tokens == {"r": 1} for s in steps)
    check_scheduled_kv_clean(sched)


def test_remote_kv_reuses_the_local_prefix_cache():
    sched = make_sched()
    drive(sched, [make_req("warm", PROMPTS["b"][:12] + [99, 98])])  # 3 full blocks cached
    got = sched.add_remote_kv_request(make_req("r", PROMPTS["b"]))
    assert got.num_cached_blocks == 3 and len(got.block_ids) == 5
    assert sched.requests["r"].num_cached_tokens == 3 * BS


def test_remote_kv_failure_recomputes_here_and_frees_its_blocks_once():
    sched = make_sched()
    r = make_req("r", PROMPTS["b"])
    sched.add_remote_kv_request(r)
    assert sched.kv.usage > 0
    assert sched.finish_remote_kv("r", None) is None
    assert sched.kv.usage == 0.0 and r.block_ids == [] and r.status is RequestStatus.WAITING
    assert sched.num_waiting == 1
    tokens, _, steps = drive(sched, [])
    assert tokens["r"] == alone(PROMPTS["b"])
    assert steps[0].num_scheduled_tokens == {"r": len(PROMPTS["b"])}  # prefilled here
    check_scheduled_kv_clean(sched)  # a second free of its blocks would have raised


def test_abort_while_waiting_for_remote_kv_frees_its_blocks_once():
    sched = make_sched()
    sched.add_remote_kv_request(make_req("r", PROMPTS["b"]))
    (out,) = sched.abort_requests(["r"])
    assert (out.request_id, out.finished, out.finish_reason) == ("r", True, "abort")
    assert sched.kv.usage > 0 and not sched.requests  # held while the READ may still write
    assert sched.abort_requests(["r"]) == []  # nothing left to free
    assert sched.finish_remote_kv("r", 5) is None  # the READ is over: the blocks go back
    assert sched.kv.usage == 0.0
    with pytest.raises(InvalidRequestError, match="no KV reservation"):
        sched.finish_remote_kv("r", 5)  # once only
    assert sched.kv.usage == 0.0
    assert "r" in sched.schedule().finished_req_ids


def test_full_pool_admits_no_remote_kv_request():
    sched = make_sched(num_blocks=8)  # 7 usable blocks; each prompt needs 5
    assert sched.add_remote_kv_request(make_req("q", PROMPTS["b"])) is not None
    usage = sched.kv.usage
    assert sched.add_remote_kv_request(make_req("r", PROMPTS["b"])) is None
    assert list(sched.requests) == ["q"] and sched.kv.usage == usage
