"""On CUDA: logits processing and logprobs queue no host sync, and a graph-captured,
scheduled-ahead engine returns the tokens and logprobs of an eager, step-by-step one."""

from __future__ import annotations

import pytest
import torch

from moeserve.common.sampling import SamplingParams
from moeserve.worker.config import EngineConfig
from moeserve.worker.engine import LLMEngine
from moeserve.worker.logits_processors import gather_logprobs, penalty_inputs
from moeserve.worker.sampler import SampledTokens, Sampler, make_generator

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

PARAMS = [
    SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, logprobs=4),
    SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, frequency_penalty=1.5,
                   presence_penalty=0.5, repetition_penalty=1.3, logit_bias={7: 3.0},
                   logprobs=0),
    SamplingParams(max_tokens=8, temperature=0.8, seed=11, min_p=0.1, top_p=0.9,
                   ignore_eos=True, logprobs=2),
    SamplingParams(max_tokens=8, temperature=0, ignore_eos=True),
]


def test_processing_and_logprobs_never_sync():
    vocab = 1000
    logits = torch.randn(4, vocab, device="cuda")
    last = torch.randint(0, vocab, (8,), device="cuda")
    gens = [None, None, make_generator(11, "cuda"), None]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        inputs = penalty_inputs(PARAMS, [[1, 2], [3, 3, -1 - 2], [], [4]],
                                [[5], [6, 7], [8], [9]], vocab, "cuda", last)
        tokens = Sampler()(logits, PARAMS, gens, [[], [], [], []], inputs)
        lps = gather_logprobs(logits, tokens, 4)
        handle = SampledTokens(["a", "b", "c", "d"], tokens, lps, [p.logprobs for p in PARAMS])
    finally:
        torch.cuda.set_sync_debug_mode("default")
    got = handle.result(), handle.logprobs()
    assert set(got[1]) == {"a", "b", "c"} and len(got[1]["a"].top) == 4


def _run(path, **kw) -> tuple[list[list[int]], list[list[float]]]:
    engine = LLMEngine(EngineConfig(model=str(path), device="cuda", dtype="float32",
                                    block_size=16, num_kv_blocks=128, max_num_seqs=8, **kw))
    prompts = [[3 + i, 14, 15, 92, 65, 35 + i] for i in range(len(PARAMS))]
    for i, (p, params) in enumerate(zip(prompts, PARAMS, strict=True)):
        engine.add_request(str(i), p, params)
    tokens: dict[str, list[int]] = {str(i): [] for i in range(len(PARAMS))}
    values: dict[str, list[float]] = {str(i): [] for i in range(len(PARAMS))}
    while engine.has_unfinished_requests():
        for o in engine.step():
            tokens[o.request_id] += o.new_token_ids
            values[o.request_id] += [lp.logprob for lp in o.new_logprobs or ()]
    return list(tokens.values()), list(values.values())


def test_graphs_and_steps_ahead_match_eager(tiny_v3):
    fast = _run(tiny_v3, async_scheduling="on")
    slow = _run(tiny_v3, async_scheduling="off", enforce_eager=True)
    assert fast[0] == slow[0]
    for a, b in zip(fast[1], slow[1], strict=True):
        assert a == pytest.approx(b, abs=1e-3)
    assert [len(v) for v in fast[1]] == [8, 8, 8, 0]
