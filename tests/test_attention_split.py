"""The attention split of a prefill or mixed step (worker/model/attention_split.py): which
sequences attend in the MHA form, which of those share one K/V expansion, and how the others
are batched, planned once for every layer."""

from __future__ import annotations

import torch

from moeserve.worker.model.attention_metadata import AttentionMetadata
from moeserve.worker.model.attention_split import plan_split

BLOCK = 16


def _split(context: list[int], new: list[int], limit: int = 10_000):
    tables = [[10 + 4 * i + j for j in range(4)] for i in range(len(new))]
    meta, _ = AttentionMetadata.build(tables, context, new, BLOCK)
    return meta, plan_split(meta, lambda q, s: q >= 16 and s <= limit)


def test_decode_rows_first_then_new_prompts_pack_and_slice() -> None:
    meta, split = _split([30, 7, 0, 0], [1, 1, 20, 18])
    assert split.mha == ((2, 22, 2), (22, 40, 3)) and split.num_packed == 2
    assert split.fresh == slice(2, 40)
    blocks, offsets = split.fresh_slots
    assert torch.equal(blocks * BLOCK + offsets, meta.slot_mapping[2:40])
    # the decode rows as a slice of the batch, served by the decode kernel
    assert split.rest == slice(0, 2) and split.rest_decode
    assert split.rest_seq_lens.tolist() == [31, 8]
    assert split.rest_tables.tolist() == meta.block_tables[:2].tolist()


def test_a_continued_chunk_attends_apart_and_scattered_rows_are_gathered() -> None:
    meta, split = _split([20, 5, 0, 12, 0], [1, 18, 4, 1, 16])
    # seq 1 continues a 5-token prefix: MHA over its cache, not packed; seq 4 is a new prompt
    assert split.num_packed == 1 and split.mha[0] == (24, 40, 4) and split.mha[1][2] == 1
    assert split.fresh == slice(24, 40)
    # rows of seqs 0, 2, 3 are not contiguous: gathered, absorbed (a 4-token chunk among them)
    assert isinstance(split.rest, torch.Tensor) and not split.rest_decode
    assert split.rest.tolist() == [0, 19, 20, 21, 22, 23]
    assert split.rest_starts.tolist() == [0, 1, 5, 6] and split.rest_max_query_len == 4
    assert split.rest_seq_lens.tolist() == [21, 4, 13]


def test_packing_stays_within_one_expansion_limit() -> None:
    _, split = _split([0, 0, 0], [20, 20, 20], limit=45)
    assert split.num_packed == 2 and split.fresh == slice(0, 40)
    assert [m[2] for m in split.mha] == [0, 1, 2] and split.rest is None


def test_no_mha_sequence_reuses_the_steps_tensors() -> None:
    meta, split = _split([3, 0], [1, 8])
    assert split.mha == () and split.fresh is None
    assert split.rest == slice(0, 9) and split.rest_tables is meta.block_tables
