"""Decode through CUDA graphs gives the tokens of eager decode (runs where CUDA is)."""

from __future__ import annotations

import pytest
import torch

from moeserve.common.sampling import SamplingParams
from moeserve.worker.config import EngineConfig
from moeserve.worker.cuda_graphs import graph_batch_sizes
from moeserve.worker.engine import LLMEngine

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_ladder_covers_every_batch_size():
    sizes = graph_batch_sizes(40)
    assert sizes == [1, 2, 4, 8, 16, 32, 40]
    assert graph_batch_sizes(1) == [1]


@cuda
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_graph_decode_equals_eager(tiny_v3, dtype):
    import random

    rng = random.Random(0)
    prompts = [[rng.randrange(2, 500) for _ in range(n)] for n in (3, 17, 40, 9, 70)]
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    outs = {}
    for eager in (True, False):
        engine = LLMEngine(EngineConfig(model=str(tiny_v3), device="cuda", dtype=dtype,
                                        block_size=16, num_kv_blocks=128,
                                        enforce_eager=eager, max_num_seqs=8))
        if eager or dtype == "float32":
            # torch's grouped GEMM has no float32 kernel on CUDA: capture fails, the engine
            # says so and runs eagerly
            assert engine.runner.graphs is None
        else:
            assert engine.runner.graphs is not None
        outs[eager] = engine.generate(prompts, params)
    if dtype == "float32":
        assert outs[False] == outs[True]
    else:  # bf16 attention over a padded context rounds differently: compare prefixes
        same = sum(a[:8] == b[:8] for a, b in zip(outs[False], outs[True], strict=True))
        assert same >= 4
