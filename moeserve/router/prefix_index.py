"""Which KV blocks each worker holds, kept exact by the workers' KV events.

Block hashes are chained (``moeserve.common.block_hash``): block i's hash covers every token
before it, so a worker holding hash ``h_i`` holds exactly that prefix. The overlap of a prompt
with a worker is therefore the count of leading hashes found in the worker's set; no tree is
needed, and an evicted middle block correctly cuts the overlap there.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

__all__ = ["PrefixIndex"]


class PrefixIndex:
    """Per-worker set of cached block hashes. Pure data; not thread-safe (one event loop)."""

    def __init__(self) -> None:
        self._blocks: dict[str, set[int]] = {}

    def add_worker(self, worker: str) -> None:
        self._blocks.setdefault(worker, set())

    def remove_worker(self, worker: str) -> None:
        """Forget a worker (it died or left); its blocks no longer attract requests."""
        self._blocks.pop(worker, None)

    def workers(self) -> list[str]:
        return sorted(self._blocks)

    def stored(self, worker: str, block_hashes: Iterable[int]) -> None:
        self._blocks.setdefault(worker, set()).update(block_hashes)

    def removed(self, worker: str, block_hashes: Iterable[int]) -> None:
        blocks = self._blocks.get(worker)
        if blocks is not None:
            blocks.difference_update(block_hashes)

    def cleared(self, worker: str) -> None:
        self._blocks[worker] = set()

    def num_blocks(self, worker: str) -> int:
        return len(self._blocks.get(worker, ()))

    def overlap(self, worker: str, block_hashes: Sequence[int]) -> int:
        """Number of leading blocks of the prompt that ``worker`` has cached."""
        blocks = self._blocks.get(worker)
        if not blocks:
            return 0
        n = 0
        for h in block_hashes:
            if h not in blocks:
                break
            n += 1
        return n

    def overlaps(self, workers: Iterable[str], block_hashes: Sequence[int]) -> dict[str, int]:
        return {w: self.overlap(w, block_hashes) for w in workers}
