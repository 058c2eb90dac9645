"""BlockPool: reference counts, reserved null block, LRU eviction order, KV events."""

import pytest

from moeserve.worker.block_pool import (
    NULL_BLOCK_ID,
    AllBlocksCleared,
    BlockPool,
    BlockRemoved,
    BlockStored,
)


def test_null_block_is_never_handed_out():
    pool = BlockPool(4)
    assert pool.num_free_blocks == 3
    blocks = pool.allocate(3)
    assert NULL_BLOCK_ID not in blocks and sorted(blocks) == [1, 2, 3]
    with pytest.raises(ValueError):
        pool.allocate(1)
    with pytest.raises(ValueError):
        pool.free([NULL_BLOCK_ID])
    with pytest.raises(ValueError):
        BlockPool(1)


def test_ref_counts_and_usage():
    pool = BlockPool(5)
    (b,) = pool.allocate(1)
    assert pool.ref_count(b) == 1 and pool.usage == pytest.approx(0.25)
    pool.touch([b])
    pool.free([b])
    assert pool.ref_count(b) == 1 and not pool.is_free(b)
    pool.free([b])
    assert pool.is_free(b) and pool.usage == 0.0
    with pytest.raises(ValueError):
        pool.free([b])  # double free


def test_cached_block_revived_by_touch_and_evicted_lru():
    pool = BlockPool(4)
    a, b, c = pool.allocate(3)
    pool.cache_blocks([a, b], [11, 12], None, [1, 2, 3, 4], 2)
    assert pool.take_events() == [BlockStored([11, 12], None, [1, 2, 3, 4], 2)]
    pool.free([b])  # cached: tail
    pool.free([a])  # cached: tail, after b
    pool.free([c])  # uncached: head (worthless, reused first)
    assert pool.get_cached_block(11) == a
    # Revive a: it leaves the free queue with its hash intact.
    pool.touch([a])
    assert pool.ref_count(a) == 1 and pool.num_free_blocks == 2
    # Allocation takes c (uncached) first, then b (evicting 12).
    assert pool.allocate(1) == [c]
    assert pool.take_events() == []
    assert pool.allocate(1) == [b]
    assert pool.get_cached_block(12) is None
    assert pool.take_events() == [BlockRemoved([12])]


def test_duplicate_hash_keeps_first_copy_and_splits_events():
    pool = BlockPool(8)
    x = pool.allocate(3)
    pool.cache_blocks(x[1:2], [22], 21, [3, 4], 2)
    pool.take_events()
    # Chain 21 -> 22 -> 23 on other blocks: 22 is already held elsewhere.
    y = pool.allocate(3)
    pool.cache_blocks(y, [21, 22, 23], None, [1, 2, 3, 4, 5, 6], 2)
    assert pool.get_cached_block(22) == x[1]
    assert pool.take_events() == [
        BlockStored([21], None, [1, 2], 2),
        BlockStored([23], 22, [5, 6], 2),
    ]
    # Re-offering already cached blocks emits nothing.
    pool.cache_blocks(y, [21, 22, 23], None, [1, 2, 3, 4, 5, 6], 2)
    assert pool.take_events() == []


def test_reset_prefix_cache():
    pool = BlockPool(4)
    a, b = pool.allocate(2)
    pool.cache_blocks([a, b], [1, 2], None, [0, 0, 0, 0], 2)
    pool.free([a])
    pool.reset_prefix_cache()
    assert pool.get_cached_block(1) is None and pool.get_cached_block(2) is None
    assert pool.take_events() == [AllBlocksCleared()]
    assert pool.ref_count(b) == 1  # still usable by its owner
    assert len(pool.allocate(2)) == 2
    assert pool.take_events() == []  # nothing left to evict
