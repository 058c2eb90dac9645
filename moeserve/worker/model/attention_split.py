"""Which form each sequence of a prefill or mixed step attends in, planned once a step.

A step with multi-token sequences runs long new runs in the MHA form (K/V expanded per head,
flash attention) and everything else (decode rows, short chunks) absorbed over the paged
cache. The choice, and the index tensors each form needs, depend only on the step's lengths,
so they are built here once on the host and shared by every layer: planning per layer cost
~1 ms of host time a layer at 64 decode rows beside a prompt (a 2k-token mixed step took 110
ms of wall time for 34 ms of kernels on the H200).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from itertools import accumulate

import torch

from moeserve.worker.host_to_device import to_device

__all__ = ["AttentionSplit", "PromptRegion", "plan_split"]


@dataclass(frozen=True)
class PromptRegion:
    """Multi-token sequences attending absorbed as one batch of fixed shape (a captured mixed
    step: mixed_graphs.py): their tokens are ``rows`` of the step; tables / seq_lens / starts
    describe ``num_seqs`` sequences, the unused ones with no tokens; ``valid`` marks the rows
    that belong to one (the others are padding, whose attention output is zeroed)."""

    rows: slice
    tables: torch.Tensor
    seq_lens: torch.Tensor
    starts: torch.Tensor
    max_query_len: int
    valid: torch.Tensor


@dataclass(frozen=True)
class AttentionSplit:
    """mha: (start, end, seq) token ranges of the sequences in the MHA form, the packed ones
    (below) first. fresh: the tokens of MHA sequences that are whole new prompts (no cached
    prefix) lying back to back, as one slice: their keys are exactly these tokens' latents,
    read from the cache at ``fresh_slots`` (block, offset) in one gather for all of them; the
    first ``num_packed`` entries of mha are theirs, the others attend one by one.
    rest: the other sequences' tokens (a slice when contiguous, else an index tensor), None
    when there are none; rest_tables / rest_seq_lens / rest_starts / rest_max_query_len
    describe them as a batch of their own; rest_decode: each has exactly one new token (the
    decode kernel serves them). prompts: set only for captured mixed steps, whose split is
    fixed in advance (mixed_graphs.py)."""

    mha: tuple[tuple[int, int, int], ...]
    num_packed: int
    fresh: slice | None
    fresh_slots: tuple[torch.Tensor, torch.Tensor] | None
    rest: slice | torch.Tensor | None
    rest_tables: torch.Tensor | None
    rest_seq_lens: torch.Tensor | None
    rest_starts: torch.Tensor | None
    rest_max_query_len: int
    rest_decode: bool
    prompts: PromptRegion | None = None


def plan_split(meta, use_mha: Callable[[int, int], bool]) -> AttentionSplit:
    """The split of ``meta``'s step (an AttentionMetadata built on the host: its
    query_lens_host / seq_lens_host) given ``use_mha(query_len, seq_len)``."""
    qlens, slens = meta.query_lens_host, meta.seq_lens_host
    starts = [0, *accumulate(qlens)]
    mha_seqs = [s for s in range(len(qlens)) if use_mha(qlens[s], slens[s])]
    mha = tuple((starts[s], starts[s + 1], s) for s in mha_seqs)
    device = meta.seq_lens.device
    # Whole new prompts (no cached prefix) lying back to back share one K/V expansion; a
    # chunk continuing a prefix (a step budget's last prompt) attends apart, over its cache.
    packed = [s for s in mha_seqs if qlens[s] == slens[s]]
    while len(packed) > 1 and packed[-1] - packed[0] != len(packed) - 1:
        packed.pop(0)  # keep a consecutive run (the usual layout is one)
    # the packed expansion is bounded as one sequence's is (use_mha's size limit)
    while len(packed) > 1 and not use_mha(*(2 * [sum(qlens[s] for s in packed)])):
        packed.pop()
    fresh = fresh_slots = None
    if packed:
        fresh = slice(starts[packed[0]], starts[packed[-1] + 1])
        slots = meta.slot_mapping[fresh]
        fresh_slots = (slots // meta.block_size, slots % meta.block_size)
    in_pack = set(packed)
    mha = tuple(m for m in mha if m[2] in in_pack) + tuple(m for m in mha if m[2] not in in_pack)
    chosen = set(mha_seqs)
    rest_seqs = [s for s in range(len(qlens)) if s not in chosen]
    if not rest_seqs:
        return AttentionSplit(mha, len(packed), fresh, fresh_slots, None, None, None, None, 0,
                              False)
    rest_lens = [qlens[s] for s in rest_seqs]
    rest_max = max(rest_lens)
    if len(rest_seqs) == len(qlens):  # nothing in the MHA form: the step's own tensors
        return AttentionSplit(mha, 0, None, None, slice(0, starts[-1]), meta.block_tables,
                              meta.seq_lens, meta.query_start_loc, rest_max, rest_max == 1)
    contiguous = rest_seqs == list(range(rest_seqs[0], rest_seqs[-1] + 1))
    if contiguous:
        lo, hi = rest_seqs[0], rest_seqs[-1] + 1
        rest: slice | torch.Tensor = slice(starts[lo], starts[hi])
        # copies, not views: a view's data pointer is aligned to 16 bytes or not depending on
        # lo, and the kernels' compiled variants are keyed on that alignment
        tables, seq_lens = meta.block_tables[lo:hi].clone(), meta.seq_lens[lo:hi].clone()
    else:
        rest = to_device(torch.cat([torch.arange(starts[s], starts[s + 1])
                                    for s in rest_seqs]), device)
        idx = to_device(rest_seqs, device, torch.int64)
        tables, seq_lens = meta.block_tables[idx], meta.seq_lens[idx]
    rest_starts = None if rest_max == 1 else to_device([0, *accumulate(rest_lens)], device,
                                                       torch.int64)
    return AttentionSplit(mha, len(packed), fresh, fresh_slots, rest, tables, seq_lens, rest_starts,
                          rest_max, rest_max == 1)
