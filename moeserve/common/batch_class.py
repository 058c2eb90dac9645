"""The decode batch sizes that share compiled kernels and CUDA graphs.

One rule for two places that must agree: the decode CUDA graphs are captured for these sizes
(worker/cuda_graphs.py), and the MLA decode kernel picks its tiles and split count by the
class of a batch (kernels/mla_decode.py), so an eager batch of any size (a mixed step's decode
rows) reuses a kernel variant the graphs compiled instead of compiling one mid-serving.
"""

from __future__ import annotations

__all__ = ["batch_class", "batch_classes"]


def batch_class(num_seqs: int) -> int:
    """The next power of two up to 8, then the next multiple of 16."""
    if num_seqs <= 8:
        return 1 << max(0, num_seqs - 1).bit_length()
    return -(-num_seqs // 16) * 16


def batch_classes(max_batch: int) -> list[int]:
    """Every class of a batch of 1..max_batch, max_batch itself standing for the classes
    above it: 1, 2, 4, 8, then every 16 below max_batch, then max_batch."""
    return sorted({min(batch_class(n), max_batch) for n in range(1, max_batch + 1)})
