"""Random inputs shared by the kernel tests: paged latent caches with shuffled block tables."""

from __future__ import annotations

import torch


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| over the whole tensor, in float64."""
    out, ref = out.double(), ref.double()
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


# float32 runs as tf32 in tl.dot on a GPU (10-bit mantissa operands): measured up to 2.3e-3
# norm-relative error on the H100, so not 1e-6. A wrong index or mask errs by O(1).
TF32_TOL = 5e-3


def tolerance(dtype: torch.dtype) -> float:
    return TF32_TOL if dtype == torch.float32 else 1e-2


def paged_cache(
    seq_lens: list[int],
    block_size: int,
    kv_dim: int,
    dtype: torch.dtype,
    device: str,
    gen: torch.Generator,
    num_layers: int = 3,
    layer: int = 1,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(full cache [num_blocks, L, block_size, kv_dim], block_tables [S, max_blocks] int32,
    seq_lens [S] int32).

    Pages are a random permutation (never page 0, which pads the tables) with spare pages, and
    the cache is filled with random values everywhere, so a kernel reading past a sequence's
    length, a wrong page or the wrong layer gets garbage into its result.
    """
    pages_per_seq = [-(-n // block_size) for n in seq_lens]
    num_blocks = sum(pages_per_seq) + 4
    cache = torch.randn(num_blocks, num_layers, block_size, kv_dim, generator=gen)
    cache = cache.to(dtype).to(device)
    perm = (torch.randperm(num_blocks - 1, generator=gen) + 1).tolist()
    max_blocks = max(pages_per_seq) + 1
    tables = torch.zeros(len(seq_lens), max_blocks, dtype=torch.int32)
    for s, n in enumerate(pages_per_seq):
        tables[s, :n] = torch.tensor([perm.pop() for _ in range(n)], dtype=torch.int32)
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    return cache, tables.to(device), lens.to(device)
