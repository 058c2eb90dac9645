"""Reference-counted KV blocks with an eviction-ordered free queue and prefix-cache events.

Pure Python (no torch): the pool only hands out block ids; the runner owns the memory.

A block is *in use* while its reference count is > 0. A free block sits in the free queue; if
it still carries a block hash it is a prefix-cache entry that can be revived (``touch``) until
allocation reaches it at the head of the queue and evicts it. Block 0 is reserved as the null
block the runner pads block tables with; it is never handed out.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

__all__ = [
    "NULL_BLOCK_ID",
    "AllBlocksCleared",
    "BlockPool",
    "BlockRemoved",
    "BlockStored",
    "KVCacheEvent",
]

NULL_BLOCK_ID = 0


@dataclass(frozen=True)
class BlockStored:
    """Consecutive full blocks became cached.

    ``block_hashes[0]`` chains to ``parent_block_hash`` (None for a prompt's first block) and
    each later hash to the one before it; ``token_ids`` holds ``block_size`` tokens per hash.
    """

    block_hashes: list[int]
    parent_block_hash: int | None
    token_ids: list[int]
    block_size: int


@dataclass(frozen=True)
class BlockRemoved:
    """Blocks were evicted; their hashes are no longer served from this worker's cache."""

    block_hashes: list[int]


@dataclass(frozen=True)
class AllBlocksCleared:
    """The whole prefix cache was dropped (``reset_prefix_cache``)."""


KVCacheEvent = BlockStored | BlockRemoved | AllBlocksCleared


class BlockPool:
    """``num_blocks`` block ids (including the reserved null block 0) with prefix caching."""

    def __init__(self, num_blocks: int):
        if num_blocks < 2:
            raise ValueError(f"num_blocks must be >= 2 (block 0 is reserved), got {num_blocks}")
        self.num_blocks = num_blocks
        self._ref_cnt = [0] * num_blocks
        self._block_hash: list[int | None] = [None] * num_blocks
        self._cached: dict[int, int] = {}  # block hash -> block id
        # Head = evicted first. OrderedDict gives O(1) removal from the middle on a cache hit.
        self._free: OrderedDict[int, None] = OrderedDict(
            (block_id, None) for block_id in range(1, num_blocks)
        )
        self._events: list[KVCacheEvent] = []

    @property
    def num_usable_blocks(self) -> int:
        return self.num_blocks - 1

    @property
    def num_free_blocks(self) -> int:
        """Blocks allocation can take now: never used, freed, or cached but unreferenced."""
        return len(self._free)

    @property
    def usage(self) -> float:
        """Fraction of usable blocks referenced by requests (0.0 .. 1.0)."""
        return 1.0 - len(self._free) / self.num_usable_blocks

    def ref_count(self, block_id: int) -> int:
        return self._ref_cnt[block_id]

    def block_hash(self, block_id: int) -> int | None:
        return self._block_hash[block_id]

    def is_free(self, block_id: int) -> bool:
        return block_id in self._free

    def get_cached_block(self, block_hash: int) -> int | None:
        """Block id holding ``block_hash``, in use or free, or None."""
        return self._cached.get(block_hash)

    def allocate(self, n: int) -> list[int]:
        """Take ``n`` blocks from the head of the free queue (ref count 1), evicting hashes."""
        if n > len(self._free):
            raise ValueError(f"cannot allocate {n} blocks, {len(self._free)} free")
        block_ids = []
        evicted = []
        for _ in range(n):
            block_id, _ = self._free.popitem(last=False)
            old_hash = self._block_hash[block_id]
            if old_hash is not None:
                self._block_hash[block_id] = None
                del self._cached[old_hash]
                evicted.append(old_hash)
            self._ref_cnt[block_id] = 1
            block_ids.append(block_id)
        if evicted:
            self._events.append(BlockRemoved(evicted))
        return block_ids

    def touch(self, block_ids: Iterable[int]) -> None:
        """Add a reference to each block, reviving cached free ones."""
        for block_id in block_ids:
            if self._ref_cnt[block_id] == 0:
                del self._free[block_id]
            self._ref_cnt[block_id] += 1

    def free(self, block_ids: Iterable[int]) -> None:
        """Drop a reference from each block, in the order given.

        A block that reaches zero joins the free queue: at the tail if it is cached (LRU, so it
        can still be hit), at the head if not (its contents are worthless, reuse it first).
        """
        for block_id in block_ids:
            if block_id == NULL_BLOCK_ID or self._ref_cnt[block_id] <= 0:
                raise ValueError(f"block {block_id} is not allocated")
            self._ref_cnt[block_id] -= 1
            if self._ref_cnt[block_id] == 0:
                self._free[block_id] = None
                if self._block_hash[block_id] is None:
                    self._free.move_to_end(block_id, last=False)

    def cache_blocks(
        self,
        block_ids: Sequence[int],
        block_hashes: Sequence[int],
        parent_block_hash: int | None,
        token_ids: Sequence[int],
        block_size: int,
    ) -> None:
        """Register consecutive full, computed blocks under their hashes; emit BlockStored.

        ``token_ids`` holds the ``block_size`` tokens of each block. A block already holding its
        hash is skipped, and so is a hash another block already holds (two requests computed
        the same prefix at once): the first copy stays the cached one.
        """
        if not len(block_ids) == len(block_hashes) == len(token_ids) // block_size:
            raise ValueError("block_ids, block_hashes and token_ids disagree in length")
        run_ids: list[int] = []
        run_tokens: list[int] = []
        run_parent = parent_block_hash
        parent = parent_block_hash
        for i, (block_id, block_hash) in enumerate(zip(block_ids, block_hashes, strict=True)):
            if self._block_hash[block_id] is None and block_hash not in self._cached:
                self._block_hash[block_id] = block_hash
                self._cached[block_hash] = block_id
                if not run_ids:
                    run_parent = parent
                run_ids.append(block_hash)
                run_tokens.extend(token_ids[i * block_size : (i + 1) * block_size])
            elif run_ids:
                # One event per chained run keeps every event's parent link true.
                self._events.append(BlockStored(run_ids, run_parent, run_tokens, block_size))
                run_ids, run_tokens = [], []
            parent = block_hash
        if run_ids:
            self._events.append(BlockStored(run_ids, run_parent, run_tokens, block_size))

    def reset_prefix_cache(self) -> None:
        """Forget every block hash. Blocks in use stay valid, only unfindable by hash."""
        self._block_hash = [None] * self.num_blocks
        self._cached.clear()
        # Events before the clear describe a cache that no longer exists.
        self._events = [AllBlocksCleared()]

    def take_events(self) -> list[KVCacheEvent]:
        """Events since the last call, oldest first."""
        events, self._events = self._events, []
        return events
