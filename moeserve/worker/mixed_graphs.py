"""CUDA graphs of mixed steps: decode rows beside a few prompt chunks, for a grid of sizes.

An eager mixed step spends more host time launching its ~1000 kernels than the GPU spends
running them (H200, V2-Lite: 64 ms of wall time for 30 ms of kernels at 2k tokens; see
docs/performance.md), and serving at concurrency is mostly such steps. A graph of
``decode`` rows and ``prompt`` tokens (sizes from the two ladders, the step padded up)
replays them with one launch. Its layout is fixed: the decode rows first, through the decode
kernel, then the prompt tokens of at most ``max_prompt_seqs`` sequences, absorbed over the
paged cache (the MHA form's per-sequence launches cannot be captured). Padding rows read and
write only block 0, which the block pool never hands out; padding tokens' attention output is
zeroed. Steps outside the grid run eagerly.

Off by default (`EngineConfig.mixed_cuda_graphs`) until measured on a GPU against the eager
step: docs/performance.md, "Engine speed under the serving load".
"""

from __future__ import annotations

import bisect
import logging
import time
from itertools import accumulate

import numpy as np
import torch

from moeserve.worker.cuda_graphs import capture_graphs
from moeserve.worker.host_to_device import to_device
from moeserve.worker.model import AttentionMetadata, DeepseekForCausalLM
from moeserve.worker.model.attention_split import AttentionSplit, PromptRegion
from moeserve.worker.model.forward_context import KernelBackend
from moeserve.worker.sampler import feed_back

__all__ = ["MixedGraphs", "decode_ladder", "prompt_ladder"]

logger = logging.getLogger(__name__)


def decode_ladder(max_rows: int) -> list[int]:
    """Decode-row sizes of the grid: 16, 64, then doubling, up to max_rows (included)."""
    sizes = [s for s in (16, 64, 128, 256, 512) if s < max_rows] + [max_rows]
    return sorted(set(sizes))


def prompt_ladder(max_tokens: int) -> list[int]:
    """Prompt-token sizes of the grid: 128, 256, 512, ... up to max_tokens (included)."""
    sizes, p = [], 128
    while p < max_tokens:
        sizes.append(p)
        p *= 2
    return sizes + [max_tokens]


class MixedGraphs:
    def __init__(self, model: DeepseekForCausalLM, kv_cache: torch.Tensor,
                 last_sampled: torch.Tensor, block_size: int, max_decode_rows: int,
                 max_prompt_tokens: int, max_prompt_seqs: int, max_context: int,
                 backend: KernelBackend):
        self.model = model
        self.kv_cache = kv_cache
        self.last_sampled = last_sampled
        self.block_size = block_size
        self.backend = backend
        self.decode_sizes = decode_ladder(max_decode_rows)
        self.prompt_sizes = prompt_ladder(max_prompt_tokens)
        self.max_prompt_seqs = max_prompt_seqs
        self.width = -(-max_context // block_size)
        self.max_context = self.width * block_size
        dev = kv_cache.device
        n = self._size(self.decode_sizes[-1], self.prompt_sizes[-1])
        pin = dev.type == "cuda"
        # Two pinned staging buffers take turns (a copy may still be queued), one device buffer
        # that every graph's inputs are views of (as in cuda_graphs.DecodeGraphs).
        self._staging = [torch.zeros(n, dtype=torch.int64, pin_memory=pin) for _ in range(2)]
        self._turn = 0
        self._device = torch.zeros(n, dtype=torch.int64, device=dev)
        self._graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.capture_s = 0.0
        self.replays = 0  # steps served by a captured graph (benchmarks report the share)

    # ------------------------------------------------------------------ layout

    def _parts(self, d: int, p: int) -> list[tuple[str, tuple[int, ...]]]:
        s, w = self.max_prompt_seqs, self.width
        return [("ids", (d + p,)), ("pos", (d + p,)), ("slots", (d + p,)),
                ("dec_lens", (d,)), ("dec_table", (d, w)), ("pr_lens", (s,)),
                ("pr_starts", (s + 1,)), ("pr_table", (s, w)), ("valid", (p,))]

    def _size(self, d: int, p: int) -> int:
        return sum(int(np.prod(shape)) for _, shape in self._parts(d, p))

    def _views(self, flat, d: int, p: int) -> dict:
        """Named views of ``flat`` (the device buffer, or a staging buffer's numpy array)
        laid out for the graph of (d, p)."""
        out, at = {}, 0
        for name, shape in self._parts(d, p):
            size = int(np.prod(shape))
            out[name] = flat[at : at + size].reshape(shape)
            at += size
        return out

    def _meta(self, d: int, p: int) -> AttentionMetadata:
        v = self._views(self._device, d, p)
        region = PromptRegion(slice(d, d + p), v["pr_table"], v["pr_lens"], v["pr_starts"],
                              p, v["valid"] != 0)
        split = AttentionSplit((), 0, None, None, slice(0, d), v["dec_table"], v["dec_lens"],
                               None, 1, True, region)
        # The kernel path reads only slot_mapping and the split; the rest is filled for shape.
        return AttentionMetadata(
            slot_mapping=v["slots"], block_tables=v["dec_table"], seq_lens=v["dec_lens"],
            query_start_loc=v["pr_starts"], token_seq_idx=v["pos"], token_query_idx=v["pos"],
            max_query_len=max(2, p), max_seq_len=self.max_context, block_size=self.block_size,
            split=split)

    def forward(self, d: int, p: int) -> torch.Tensor:
        """The captured computation of (d, p): hidden states [d + p, hidden] of the staged
        inputs (tests run it eagerly)."""
        v = self._views(self._device, d, p)
        ids = feed_back(v["ids"], self.last_sampled)
        return self.model(ids, v["pos"], self.kv_cache, self._meta(d, p), self.backend)

    # ------------------------------------------------------------------ capture / run

    @torch.inference_mode()
    def capture(self) -> None:
        """Every (decode, prompt) size, largest first so the smaller reuse its memory."""
        start = time.perf_counter()
        cells = [(d, p) for d in reversed(self.decode_sizes) for p in reversed(self.prompt_sizes)]
        self._graphs = capture_graphs(
            cells, lambda c: self._stage_padding(*c), lambda c: self.forward(*c),
            lambda c: f"mixed step {c[0]} decode rows + {c[1]} prompt tokens")
        self.capture_s = time.perf_counter() - start
        logger.info("captured mixed-step CUDA graphs: decode rows %s x prompt tokens %s",
                    self.decode_sizes, self.prompt_sizes)

    def _stage_padding(self, d: int, p: int) -> None:
        v = self._views(self._device, d, p)
        self._device.zero_()
        v["dec_lens"].fill_(1)
        v["pr_lens"].fill_(1)

    def fits(self, query_lens: list[int], context_lens: list[int]) -> bool:
        """Whether a step of these sequences has a graph (or, before capture, a grid cell)."""
        prompts = [q for q in query_lens if q > 1]
        decodes = len(query_lens) - len(prompts)
        return (bool(prompts) and len(prompts) <= self.max_prompt_seqs
                and decodes <= self.decode_sizes[-1] and sum(prompts) <= self.prompt_sizes[-1]
                and max(c + q for c, q in zip(context_lens, query_lens, strict=True))
                <= self.max_context)

    def stage(self, token_ids: list[int], context_lens: list[int], query_lens: list[int],
              tables: list[list[int]]) -> tuple[int, int, list[int]]:
        """Copy a step's inputs (as the runner builds them: scheduler order, flat tokens) into
        the inputs of its graph; returns (d, p, graph row of each flat token)."""
        dec = [i for i, q in enumerate(query_lens) if q == 1]
        pr = [i for i, q in enumerate(query_lens) if q > 1]
        d = self.decode_sizes[bisect.bisect_left(self.decode_sizes, len(dec))]
        p_real = sum(query_lens[i] for i in pr)
        p = self.prompt_sizes[bisect.bisect_left(self.prompt_sizes, p_real)]
        staging = self._staging[self._turn][: self._size(d, p)]
        self._turn ^= 1
        flat = staging.numpy()
        flat[:] = 0
        v = self._views(flat, d, p)
        starts = [0, *accumulate(query_lens)]
        rows = [0] * starts[-1]
        bsz = self.block_size
        for row, i in enumerate(dec):
            rows[starts[i]] = row
            v["ids"][row] = token_ids[starts[i]]
            v["pos"][row] = context_lens[i]
            v["dec_table"][row, : len(tables[i])] = tables[i]
            v["dec_lens"][row] = context_lens[i] + 1
        v["dec_lens"][len(dec):] = 1  # padding rows: block 0's first slot
        at = 0
        for k, i in enumerate(pr):
            n, ctx = query_lens[i], context_lens[i]
            span = slice(d + at, d + at + n)
            rows[starts[i] : starts[i + 1]] = range(span.start, span.stop)
            v["ids"][span] = token_ids[starts[i] : starts[i + 1]]
            v["pos"][span] = np.arange(ctx, ctx + n)
            v["pr_table"][k, : len(tables[i])] = tables[i]
            v["pr_lens"][k] = ctx + n
            v["pr_starts"][k] = at
            v["valid"][at : at + n] = 1
            at += n
        v["pr_starts"][len(pr):] = at  # unused sequences: no tokens
        v["pr_lens"][len(pr):] = 1
        table = np.concatenate([v["dec_table"], v["pr_table"]])
        owner = np.concatenate([np.arange(d), np.full(p, -1)])
        for k in range(len(pr)):
            owner[d + v["pr_starts"][k] : d + v["pr_starts"][k + 1]] = d + k
        pos = v["pos"]
        used = owner >= 0
        v["slots"][used] = table[owner[used], pos[used] // bsz] * bsz + pos[used] % bsz
        self._device[: staging.numel()].copy_(staging, non_blocking=True)
        return d, p, rows

    @torch.inference_mode()
    def run(self, token_ids: list[int], context_lens: list[int], query_lens: list[int],
            tables: list[list[int]], sample_rows: list[int]) -> torch.Tensor:
        """Hidden states [len(sample_rows), hidden] of the flat tokens ``sample_rows`` after
        one replay (captured graphs), or one eager run of the same computation."""
        d, p, rows = self.stage(token_ids, context_lens, query_lens, tables)
        if self._graphs:
            graph, hidden = self._graphs[(d, p)]
            graph.replay()
            self.replays += 1
        else:
            hidden = self.forward(d, p)
        return hidden[to_device([rows[r] for r in sample_rows], hidden.device, torch.int64)]
