"""Prefix index: exact per-worker overlap from KV events and the shared block hashes."""

from __future__ import annotations

from moeserve.common.block_hash import hash_blocks
from moeserve.router.prefix_index import PrefixIndex

BS = 4


def test_overlap_counts_leading_cached_blocks() -> None:
    index = PrefixIndex()
    prompt = list(range(20))
    hashes = hash_blocks(prompt, BS, "m")
    assert len(hashes) == 5
    index.stored("w0", hashes[:3])
    assert index.overlap("w0", hashes) == 3
    assert index.overlap("w1", hashes) == 0
    # Same tokens after a different first block hash differently: no false sharing.
    other = hash_blocks([99, *prompt[1:]], BS, "m")
    assert index.overlap("w0", other) == 0


def test_evicted_middle_block_cuts_overlap() -> None:
    index = PrefixIndex()
    hashes = hash_blocks(list(range(16)), BS, "m")
    index.stored("w0", hashes)
    index.removed("w0", [hashes[1]])
    assert index.overlap("w0", hashes) == 1
    index.cleared("w0")
    assert index.overlap("w0", hashes) == 0 and index.num_blocks("w0") == 0


def test_remove_worker_and_overlaps() -> None:
    index = PrefixIndex()
    hashes = hash_blocks(list(range(8)), BS, "m")
    index.stored("a", hashes)
    index.stored("b", hashes[:1])
    index.add_worker("c")
    assert index.overlaps(["a", "b", "c"], hashes) == {"a": 2, "b": 1, "c": 0}
    index.remove_worker("a")
    index.removed("a", hashes)  # events after removal are harmless
    assert index.workers() == ["b", "c"]
