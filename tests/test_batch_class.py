"""Batch classes (common/batch_class.py): the decode graphs' ladder and the decode kernel's
tile choice follow one rule, so an eager batch of any size maps onto a captured size."""

from __future__ import annotations

from moeserve.common.batch_class import batch_class, batch_classes


def test_ladder() -> None:
    assert batch_classes(256) == [1, 2, 4, 8, *range(16, 257, 16)]
    assert batch_classes(40) == [1, 2, 4, 8, 16, 32, 40]
    assert batch_classes(6) == [1, 2, 4, 6] and batch_classes(1) == [1]


def test_every_batch_lands_on_a_captured_class() -> None:
    for max_batch in (1, 6, 40, 100, 256):
        ladder = batch_classes(max_batch)
        for n in range(1, max_batch + 1):
            assert min(batch_class(n), max_batch) in ladder and batch_class(n) >= n
