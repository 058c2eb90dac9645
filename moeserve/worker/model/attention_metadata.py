"""Per-step attention inputs for a ragged batch over the paged latent KV cache."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moeserve.worker.host_to_device import to_device

__all__ = ["AttentionMetadata"]


@dataclass
class AttentionMetadata:
    """Describes T new tokens from S sequences, flattened sequence after sequence.

    slot_mapping: [T] int64, cache slot (block_id * block_size + offset) each new latent goes to.
    block_tables: [S, max_blocks] int64, padded with block 0 (never read past seq_lens).
    seq_lens: [S] int64, tokens in cache for each sequence after this step's writes.
    query_start_loc: [S + 1] int64, offsets of each sequence's new tokens in the flat batch.
    token_seq_idx: [T] int64, sequence index of each new token.
    token_query_idx: [T] int64, index of each new token within its sequence's new tokens.
    max_query_len / max_seq_len: Python ints sizing the padded attention.
    query_lens_host / seq_lens_host: the same lengths as Python ints where the step was built
    on the host (empty in captured decode graphs); prefill splits its batch by them.
    split: the step's AttentionSplit (attention_split.py), planned by the first layer that
    needs it and reused by the others.
    """

    slot_mapping: torch.Tensor
    block_tables: torch.Tensor
    seq_lens: torch.Tensor
    query_start_loc: torch.Tensor
    token_seq_idx: torch.Tensor
    token_query_idx: torch.Tensor
    max_query_len: int
    max_seq_len: int
    block_size: int
    query_lens_host: tuple[int, ...] = ()
    seq_lens_host: tuple[int, ...] = ()
    split: object | None = None

    @property
    def num_seqs(self) -> int:
        return self.block_tables.shape[0]

    @classmethod
    def build(
        cls,
        block_tables: list[list[int]],
        context_lens: list[int],
        query_lens: list[int],
        block_size: int,
        device: torch.device | str = "cpu",
    ) -> tuple[AttentionMetadata, torch.Tensor]:
        """Metadata plus the [T] positions tensor, from per-sequence Python lists.

        context_lens[s] tokens are already cached; query_lens[s] new tokens follow them.
        """
        num_seqs = len(query_lens)
        q = torch.tensor(query_lens, dtype=torch.int64)
        ctx = torch.tensor(context_lens, dtype=torch.int64)
        seq_lens = ctx + q
        starts = torch.zeros(num_seqs + 1, dtype=torch.int64)
        torch.cumsum(q, 0, out=starts[1:])
        total = int(starts[-1])
        seq_idx = torch.repeat_interleave(torch.arange(num_seqs), q)
        query_idx = torch.arange(total) - starts[:-1][seq_idx]
        positions = ctx[seq_idx] + query_idx
        max_blocks = max(len(b) for b in block_tables)
        tables = torch.zeros(num_seqs, max_blocks, dtype=torch.int64)
        for i, blocks in enumerate(block_tables):
            tables[i, : len(blocks)] = torch.tensor(blocks, dtype=torch.int64)
        block_of_token = tables[seq_idx, positions // block_size]
        slots = block_of_token * block_size + positions % block_size
        meta = cls(
            slot_mapping=to_device(slots, device),
            block_tables=to_device(tables, device),
            seq_lens=to_device(seq_lens, device),
            query_start_loc=to_device(starts, device),
            token_seq_idx=to_device(seq_idx, device),
            token_query_idx=to_device(query_idx, device),
            max_query_len=int(q.max()),
            max_seq_len=int(seq_lens.max()),
            block_size=block_size,
            query_lens_host=tuple(query_lens),
            seq_lens_host=tuple(c + n for c, n in zip(context_lens, query_lens, strict=True)),
        )
        return meta, to_device(positions, device)
