"""KVCacheManager: prefix hits, allocation without side effects on failure, events, free order."""

import pytest

from moeserve.common.block_hash import hash_blocks
from moeserve.common.sampling import SamplingParams
from moeserve.worker.block_pool import BlockRemoved, BlockStored
from moeserve.worker.kv_cache_manager import KVCacheManager
from moeserve.worker.request import Request

BS = 4
MODEL = "tiny"


def make_req(rid, tokens, **kwargs):
    return Request(
        rid, tokens, SamplingParams(max_tokens=8), block_size=BS, model_id=MODEL, **kwargs
    )


def run_prefill(kv, req):
    """Allocate and 'compute' the whole prompt the way the scheduler would."""
    computed, num_cached = kv.get_computed_blocks(req)
    blocks = kv.allocate(req, req.num_tokens - num_cached, computed)
    assert blocks is not None
    req.block_ids.extend(blocks)
    req.num_computed_tokens = req.num_tokens
    kv.cache_full_blocks(req, req.num_computed_tokens)
    return num_cached


def test_request_block_hashes_grow_incrementally():
    req = make_req("a", list(range(7)))
    assert req.block_hashes == hash_blocks(list(range(7)), BS, MODEL)
    req.append_output_token(7)
    assert len(req.block_hashes) == 2
    assert req.block_hashes == hash_blocks(list(range(8)), BS, MODEL)
    assert req.all_token_ids == list(range(8)) and req.output_token_ids == [7]


def test_prefix_hit_and_never_whole_prompt():
    kv = KVCacheManager(num_blocks=16, block_size=BS, model_id=MODEL)
    a = make_req("a", list(range(12)))
    assert run_prefill(kv, a) == 0
    events = kv.take_events()
    assert events == [BlockStored(a.block_hashes, None, list(range(12)), BS)]

    # Same 12-token prompt: at most (12-1)//4 = 2 blocks may be reused.
    b = make_req("b", list(range(12)))
    computed, n = kv.get_computed_blocks(b)
    assert computed == a.block_ids[:2] and n == 8
    # A longer prompt sharing 8 tokens then diverging.
    c = make_req("c", list(range(8)) + [99, 98, 97, 96, 95])
    computed, n = kv.get_computed_blocks(c)
    assert computed == a.block_ids[:2] and n == 8
    blocks = kv.allocate(c, c.num_tokens - n, computed)
    assert blocks[:2] == a.block_ids[:2] and len(blocks) == 4
    assert kv.pool.ref_count(a.block_ids[0]) == 2


def test_cache_full_blocks_after_prefix_hit_emits_only_new_blocks():
    kv = KVCacheManager(num_blocks=16, block_size=BS, model_id=MODEL)
    a = make_req("a", list(range(9)))
    run_prefill(kv, a)
    kv.take_events()
    b = make_req("b", list(range(8)) + [50, 51, 52, 53, 54])
    assert run_prefill(kv, b) == 8
    assert kv.take_events() == [
        BlockStored([b.block_hashes[2]], b.block_hashes[1], [50, 51, 52, 53], BS)
    ]
    assert b.num_cached_tokens == 0  # the manager never writes request state


def test_decode_blocks_cached_as_they_fill():
    kv = KVCacheManager(num_blocks=16, block_size=BS, model_id=MODEL)
    req = make_req("a", [1, 2, 3])
    run_prefill(kv, req)
    assert kv.take_events() == []
    req.append_output_token(4)
    blocks = kv.allocate(req, 1)
    assert blocks == []  # token 4 still fits in block 0
    req.num_computed_tokens += 1
    kv.cache_full_blocks(req, req.num_computed_tokens)
    assert kv.take_events() == [BlockStored(req.block_hashes[:1], None, [1, 2, 3, 4], BS)]
    req.append_output_token(5)
    assert len(kv.allocate(req, 1)) == 1


def test_allocate_none_has_no_side_effects():
    kv = KVCacheManager(num_blocks=5, block_size=BS, model_id=MODEL)  # 4 usable
    a = make_req("a", list(range(9)))
    run_prefill(kv, a)  # 3 blocks
    kv.free(a)  # all cached & free
    kv.take_events()
    b = make_req("b", list(range(8)) + [7] * 9)  # shares 2 blocks, needs 5 in total
    computed, n = kv.get_computed_blocks(b)
    assert len(computed) == 2
    before = (kv.num_free_blocks, [kv.pool.ref_count(i) for i in range(5)], b.block_ids[:])
    assert kv.allocate(b, b.num_tokens - n, computed) is None
    after = (kv.num_free_blocks, [kv.pool.ref_count(i) for i in range(5)], b.block_ids[:])
    assert before == after
    assert kv.take_events() == []
    assert kv.get_computed_blocks(b) == (computed, n)  # nothing was evicted


def test_free_evicts_tail_blocks_first():
    kv = KVCacheManager(num_blocks=5, block_size=BS, model_id=MODEL)
    a = make_req("a", list(range(13)))  # 4 blocks, 3 full and cached
    run_prefill(kv, a)
    kv.take_events()
    kv.free(a)
    assert kv.usage == 0.0
    # The uncached partial block goes first, then the cached ones from the tail backwards.
    x = make_req("x", [500] * 8)
    blocks = kv.allocate(x, 8)
    assert blocks == [a.block_ids[3], a.block_ids[2]]
    assert kv.take_events() == [BlockRemoved([a.block_hashes[2]])]
    computed, n = kv.get_computed_blocks(make_req("y", list(range(13))))
    assert computed == a.block_ids[:2] and n == 8


def test_prefix_caching_disabled():
    kv = KVCacheManager(num_blocks=16, block_size=BS, model_id=MODEL, enable_prefix_caching=False)
    a = Request("a", list(range(9)), SamplingParams())  # no hasher needed
    run_prefill(kv, a)
    assert kv.take_events() == []
    assert kv.get_computed_blocks(a) == ([], 0)


def test_request_hashed_with_other_block_size_is_refused():
    kv = KVCacheManager(num_blocks=16, block_size=BS, model_id=MODEL)
    with pytest.raises(ValueError, match="block_size"):
        kv.get_computed_blocks(Request("a", [1, 2, 3], SamplingParams(), block_size=8))


def test_computed_blocks_only_on_first_allocation():
    kv = KVCacheManager(num_blocks=16, block_size=BS, model_id=MODEL)
    a = make_req("a", list(range(9)))
    run_prefill(kv, a)
    with pytest.raises(ValueError):
        kv.allocate(a, 1, [1])


def test_reset_prefix_cache():
    kv = KVCacheManager(num_blocks=16, block_size=BS, model_id=MODEL)
    a = make_req("a", list(range(9)))
    run_prefill(kv, a)
    kv.reset_prefix_cache()
    assert kv.get_computed_blocks(make_req("b", list(range(9)))) == ([], 0)
    kv.take_events()
    # A running request re-offers its blocks after the reset.
    a.append_output_token(9)
    kv.cache_full_blocks(a, 9)
    assert [e.block_hashes for e in kv.take_events()] == [a.block_hashes[:2]]
