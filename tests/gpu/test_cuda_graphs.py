"""Decode through CUDA graphs computes what eager decode computes (runs where CUDA is)."""

from __future__ import annotations

import random

import pytest
import torch

from moeserve.common.sampling import SamplingParams
from moeserve.worker.config import EngineConfig
from moeserve.worker.cuda_graphs import graph_batch_sizes
from moeserve.worker.engine import LLMEngine
from moeserve.worker.model import AttentionMetadata

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_ladder_covers_every_batch_size():
    assert graph_batch_sizes(40) == [1, 2, 4, 8, 16, 32, 40]
    assert graph_batch_sizes(1) == [1]


@cuda
@pytest.mark.parametrize("backend", ["auto", "torch"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_graph_logits_equal_eager(tiny_v3, dtype, backend):
    engine = LLMEngine(EngineConfig(model=str(tiny_v3), device="cuda", dtype=dtype,
                                    block_size=16, num_kv_blocks=128, max_num_seqs=8,
                                    kernel_backend=backend))
    graphs = engine.runner.graphs
    if backend == "torch" and dtype == "float32":
        # torch's grouped GEMM has no float32 CUDA kernel: capture fails, the engine says so
        # and runs eagerly
        assert graphs is None
        return
    assert graphs is not None
    rng = random.Random(0)
    for i, n in enumerate((3, 17, 40, 9, 70)):  # 5 rows: the graph pads them to 8
        engine.add_request(str(i), [rng.randrange(2, 500) for _ in range(n)],
                           SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
    engine.step()  # prefill (eager)
    reqs = [engine.scheduler.requests[str(i)] for i in range(5)]
    tokens = [r.all_token_ids[r.num_computed_tokens] for r in reqs]
    ctx = [r.num_computed_tokens for r in reqs]
    tables = [r.block_ids for r in reqs]
    graph_logits = graphs.run(tokens, ctx, tables).clone()
    meta, pos = AttentionMetadata.build(tables, ctx, [1] * 5, 16, "cuda")
    with torch.inference_mode():
        model = engine.runner.model
        eager = model.compute_logits(model(torch.tensor(tokens, device="cuda"), pos,
                                           engine.kv_cache, meta, engine.runner.backend))
    err = (graph_logits - eager).norm() / eager.norm()
    assert err < (1e-2 if dtype == "bfloat16" else 5e-3)
    assert (graph_logits.argmax(-1) == eager.argmax(-1)).float().mean() >= 0.8


@cuda
def test_async_scheduling_replays_give_the_synchronous_tokens(tiny_v3):
    """Steps scheduled ahead read their input tokens from the device inside the graph: the
    tokens, stops and freed blocks are those of the synchronous engine."""
    rng = random.Random(1)
    prompts = [[rng.randrange(2, 500) for _ in range(n)] for n in (3, 17, 40, 9, 70)]
    free = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)

    def engine(mode: str) -> LLMEngine:
        # float32: a stopped request's wasted row changes the batch size, and bf16 GEMMs of
        # another size may round a near tie the other way
        return LLMEngine(EngineConfig(model=str(tiny_v3), device="cuda", dtype="float32",
                                      block_size=16, num_kv_blocks=128, max_num_seqs=8,
                                      async_scheduling=mode))

    ref = engine("off").generate(prompts, free)
    params = [SamplingParams(max_tokens=12, temperature=0, stop_token_ids=(ref[0][4],)),
              SamplingParams(max_tokens=5, temperature=0, ignore_eos=True),
              SamplingParams(max_tokens=12, temperature=0.7, seed=3, ignore_eos=True),
              SamplingParams(max_tokens=12, temperature=0.9, top_p=0.8, top_k=20,
                             ignore_eos=True),
              SamplingParams(max_tokens=12, temperature=0, min_tokens=6,
                             stop_token_ids=tuple(ref[4][:3]))]
    on = engine("on")
    assert on._async and on.runner.graphs is not None
    launched = []
    inner = on.runner.launch

    def launch(out):
        launched.append(bool(out.ahead_rows))
        if not out.ahead_rows:
            return inner(out)
        # A step launched ahead must not wait for the one running (sampling parameters,
        # suppression and seeded noise included): any synchronizing call raises here.
        torch.cuda.set_sync_debug_mode("error")
        try:
            return inner(out)
        finally:
            torch.cuda.set_sync_debug_mode("default")

    on.runner.launch = launch
    got, want = on.generate(prompts, params), engine("off").generate(prompts, params)
    assert [got[i] for i in (0, 1, 2, 4)] == [want[i] for i in (0, 1, 2, 4)]
    assert len(got[3]) == len(want[3]) == 12  # unseeded: its own draws, same length
    assert sum(launched) >= 8  # most decode steps ran ahead
    assert on.stats().kv_usage == 0.0
