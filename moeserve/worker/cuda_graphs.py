"""CUDA graphs of decode-only steps for a ladder of batch sizes.

A decode step launches hundreds of small kernels; replaying a captured graph removes the CPU
cost of launching them. Each ladder size has a graph over static input buffers; a step with n
requests replays the smallest graph of >= n rows, padding the rest. Padded rows read and write
only block 0, which the block pool never hands out. Prefill and mixed steps stay eager.
"""

from __future__ import annotations

import bisect
import logging
import time
from collections.abc import Callable, Iterable
from typing import TypeVar

import numpy as np
import torch

from moeserve.common.batch_class import batch_classes
from moeserve.worker.compile_watch import WATCH
from moeserve.worker.model import AttentionMetadata, DeepseekForCausalLM
from moeserve.worker.model.forward_context import KernelBackend
from moeserve.worker.sampler import feed_back

__all__ = ["DecodeGraphs", "capture_graphs", "graph_batch_sizes"]

logger = logging.getLogger(__name__)

K = TypeVar("K")


def capture_graphs(keys: Iterable[K], stage: Callable[[K], None],
                   forward: Callable[[K], torch.Tensor], label: Callable[[K], str]
                   ) -> dict[K, tuple[torch.cuda.CUDAGraph, torch.Tensor]]:  # fmt: skip
    """One CUDA graph of ``forward(key)`` per key, in the order given (largest first: the
    smaller reuse the first one's memory pool), on inputs ``stage(key)`` left valid. Each runs
    once eagerly first: lazy initialisation must not happen inside a capture."""
    graphs = {}
    pool = torch.cuda.graph_pool_handle()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for key in keys:
            stage(key)
            forward(key)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool, stream=stream):
                out = forward(key)
            graphs[key] = (graph, out)
            WATCH.note("cuda_graph", label(key))
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    return graphs


def graph_batch_sizes(max_batch: int) -> list[int]:
    """1, 2, 4, 8, then every 16 up to max_batch (always including max_batch): the batch
    classes (common/batch_class.py), whose kernel variants eager steps then reuse."""
    return batch_classes(max_batch)


class DecodeGraphs:
    def __init__(
        self,
        model: DeepseekForCausalLM,
        kv_cache: torch.Tensor,
        last_sampled: torch.Tensor,
        block_size: int,
        max_batch: int,
        max_context: int,
        backend: KernelBackend,
    ):
        self.model = model
        self.backend = backend  # the eager steps' backend: captured graphs run the same ops
        self.kv_cache = kv_cache
        self.last_sampled = last_sampled  # inputs of rows scheduled ahead come from here
        self.block_size = block_size
        self.sizes = graph_batch_sizes(max_batch)
        self.max_batch = self.sizes[-1]
        self.max_blocks = -(-max_context // block_size)
        self.max_context = self.max_blocks * block_size
        dev = kv_cache.device
        n = self.max_batch
        self.query_start_loc = torch.arange(n + 1, dtype=torch.int64, device=dev)
        self.token_seq_idx = torch.arange(n, dtype=torch.int64, device=dev)
        self.token_query_idx = torch.zeros(n, dtype=torch.int64, device=dev)
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.capture_s = 0.0  # the start-up log's "capture" share
        # Step inputs are staged in one pinned host buffer (ids, positions, slots, seq_lens,
        # then the block table) and cross in one asynchronous copy straight into the buffer
        # the graph of that size reads (its inputs are views of it at offsets of its own);
        # building them row by row with torch.tensor cost ~5 us a sequence of host time the
        # GPU waited for. Two staging buffers take turns: with a step scheduled ahead, the
        # copy out of one may still be queued while the next step is staged.
        pin = dev.type == "cuda"
        self._staging = [torch.zeros(n * (4 + self.max_blocks), dtype=torch.int64,
                                     pin_memory=pin) for _ in range(2)]  # fmt: skip
        self._turn = 0
        self._device_inputs = torch.zeros_like(self._staging[0], device=dev)

    def _inputs(self, bs: int) -> tuple[torch.Tensor, ...]:
        """(ids, positions, slots, seq_lens, block table) of the graph of bs rows: views of
        the one input buffer, laid out as `run` stages them."""
        d, width = self._device_inputs, self.max_blocks
        return (*(d[i * bs : (i + 1) * bs] for i in range(4)),
                d[4 * bs : (4 + width) * bs].view(bs, width))

    def _meta(self, bs: int) -> AttentionMetadata:
        _, _, slots, seq_lens, table = self._inputs(bs)
        return AttentionMetadata(
            slot_mapping=slots,
            block_tables=table,
            seq_lens=seq_lens,
            query_start_loc=self.query_start_loc[: bs + 1],
            token_seq_idx=self.token_seq_idx[:bs],
            token_query_idx=self.token_query_idx[:bs],
            max_query_len=1,
            max_seq_len=self.max_context,
            block_size=self.block_size,
        )

    def _forward(self, bs: int) -> torch.Tensor:
        ids, positions = self._inputs(bs)[:2]
        ids = feed_back(ids, self.last_sampled)
        hidden = self.model(ids, positions, self.kv_cache, self._meta(bs), self.backend)
        return self.model.compute_logits(hidden)

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture every ladder size, largest first so smaller graphs reuse its memory pool."""
        start = time.perf_counter()

        def pad(bs: int) -> None:  # a valid step: padding rows (block 0, one token)
            self._device_inputs.zero_()
            self._inputs(bs)[3].fill_(1)

        self._graphs = capture_graphs(reversed(self.sizes), pad, self._forward,
                                      lambda bs: f"decode batch {bs}")
        self.capture_s = time.perf_counter() - start
        logger.info("captured decode CUDA graphs for batch sizes %s (context <= %d)",
                    self.sizes, self.max_context)

    def graph_for(self, num_seqs: int) -> torch.cuda.CUDAGraph:
        """The captured graph a step of num_seqs rows replays (benchmarks time it bare)."""
        return self._graphs[self.sizes[bisect.bisect_left(self.sizes, num_seqs)]][0]

    def can_run(self, num_seqs: int, max_seq_len: int) -> bool:
        return bool(self._graphs) and num_seqs <= self.max_batch and (
            max_seq_len <= self.max_context)

    @torch.inference_mode()
    def run(
        self, token_ids: list[int], context_lens: list[int], tables: list[list[int]]
    ) -> torch.Tensor:
        """One decode token per sequence: token_ids[i] at position context_lens[i] (a
        negative id -1 - r is row r of the last step's sampled tokens: `feed_back`).

        Returns float32 logits [n, vocab] (a view of the graph's output: use before the next
        replay).
        """
        n = len(token_ids)
        bs = self.sizes[bisect.bisect_left(self.sizes, n)]
        bsz, width = self.block_size, self.max_blocks
        staging = self._staging[self._turn][: bs * (4 + width)]
        self._turn ^= 1
        host = staging.numpy()
        host[:] = 0
        ids, pos, slots, lens = (host[i * bs : (i + 1) * bs] for i in range(4))
        table = host[4 * bs :].reshape(bs, width)
        ids[:n] = token_ids
        pos[:n] = context_lens
        # Row by row: numpy converts each list in C; a flat generator over every block id
        # cost twice as much (0.52 vs 0.28 ms at 128 x 64 blocks, 1.24 vs 0.58 at 128 x 256).
        for row, blocks in zip(table[:n], tables, strict=True):
            row[: len(blocks)] = blocks
        slots[:] = table[np.arange(bs), pos // bsz] * bsz + pos % bsz
        lens[:] = pos + 1
        self._device_inputs[: bs * (4 + width)].copy_(staging, non_blocking=True)
        graph, logits = self._graphs[bs]
        graph.replay()
        return logits[:n]
