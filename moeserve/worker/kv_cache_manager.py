"""Which KV blocks each request holds: allocation, prefix-cache lookup and registration.

The manager returns values and never mutates a Request: the scheduler applies the results
(``req.block_ids.extend(...)``), so the scheduler alone owns request state.
"""

from __future__ import annotations

from collections.abc import Sequence

from moeserve.worker.block_pool import BlockPool, KVCacheEvent
from moeserve.worker.request import Request

__all__ = ["KVCacheManager"]


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


class KVCacheManager:
    """Blocks of ``block_size`` tokens from a pool of ``num_blocks`` (block 0 reserved)."""

    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        model_id: str,
        enable_prefix_caching: bool = True,
    ):
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.block_size = block_size
        self.model_id = model_id
        self.enable_prefix_caching = enable_prefix_caching
        self.pool = BlockPool(num_blocks)
        # request id -> how many of its leading blocks were already offered to the cache.
        self._num_cached_blocks: dict[str, int] = {}

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    @property
    def num_usable_blocks(self) -> int:
        return self.pool.num_usable_blocks

    @property
    def usage(self) -> float:
        """Fraction of usable blocks held by requests (0.0 .. 1.0)."""
        return self.pool.usage

    def get_computed_blocks(self, req: Request) -> tuple[list[int], int]:
        """Longest cached prefix of ``req``: (block ids, number of tokens they hold).

        Never the whole sequence: the last token must be computed to produce logits, so at most
        ``(num_tokens - 1) // block_size`` blocks are returned.
        """
        if not self.enable_prefix_caching:
            return [], 0
        self._check_hashes(req)
        max_blocks = (req.num_tokens - 1) // self.block_size
        block_ids = []
        for block_hash in req.block_hashes[:max_blocks]:
            block_id = self.pool.get_cached_block(block_hash)
            if block_id is None:
                break
            block_ids.append(block_id)
        return block_ids, len(block_ids) * self.block_size

    def allocate(
        self, req: Request, num_new_tokens: int, computed_blocks: Sequence[int] = ()
    ) -> list[int] | None:
        """Blocks to append to ``req.block_ids`` so it can hold its next tokens, or None.

        Covers ``req.num_computed_tokens + len(computed_blocks) * block_size + num_new_tokens``
        tokens. ``computed_blocks`` (from ``get_computed_blocks``, first allocation only) gain
        a reference and lead the result. None means the pool cannot satisfy it; then nothing
        was changed.
        """
        if computed_blocks and req.block_ids:
            raise ValueError("computed_blocks may only be passed on a request's first allocation")
        num_computed_tokens = req.num_computed_tokens + len(computed_blocks) * self.block_size
        num_blocks = _cdiv(num_computed_tokens + num_new_tokens, self.block_size)
        num_needed = max(0, num_blocks - len(req.block_ids) - len(computed_blocks))
        if not num_needed and not computed_blocks:
            return []  # most decode steps: the last block has room (runs for every request)
        # A cached hit that sits in the free queue stops being allocatable once touched.
        num_revived = sum(1 for b in computed_blocks if self.pool.is_free(b))
        if num_needed + num_revived > self.pool.num_free_blocks:
            return None
        self.pool.touch(computed_blocks)
        return list(computed_blocks) + self.pool.allocate(num_needed)

    def cache_full_blocks(self, req: Request, num_computed_tokens: int) -> None:
        """Register the blocks that are full and computed once ``num_computed_tokens`` are."""
        if not self.enable_prefix_caching:
            return
        self._check_hashes(req)
        start = self._num_cached_blocks.get(req.request_id, 0)
        end = min(num_computed_tokens // self.block_size, len(req.block_hashes), len(req.block_ids))
        if end <= start:
            return
        size = self.block_size
        self.pool.cache_blocks(
            req.block_ids[start:end],
            req.block_hashes[start:end],
            req.block_hashes[start - 1] if start > 0 else None,
            req.all_token_ids[start * size : end * size],
            size,
        )
        self._num_cached_blocks[req.request_id] = end

    def free(self, req: Request) -> None:
        """Release ``req``'s blocks, last block first so a prefix outlives its tail in cache."""
        self.pool.free(reversed(req.block_ids))
        self._num_cached_blocks.pop(req.request_id, None)

    def reset_prefix_cache(self) -> None:
        self.pool.reset_prefix_cache()
        # Requests still running re-offer their blocks from scratch.
        self._num_cached_blocks.clear()

    def take_events(self) -> list[KVCacheEvent]:
        return self.pool.take_events()

    def _check_hashes(self, req: Request) -> None:
        if req.block_size != self.block_size or req.model_id != self.model_id:
            raise ValueError(
                f"request {req.request_id!r} hashes blocks with block_size={req.block_size}, "
                f"model_id={req.model_id!r}; the KV cache uses block_size={self.block_size}, "
                f"model_id={self.model_id!r} (create the Request with these)"
            )
