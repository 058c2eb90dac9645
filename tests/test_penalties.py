"""presence / frequency / repetition penalties, logit_bias and min_p: on the device in the
sampler, equal to a plain reference, validated with OpenAI's ranges, and the same whether or
not the step was scheduled ahead (the pending token read on the device)."""

from __future__ import annotations

import pytest
import torch

from moeserve.common.errors import InvalidRequestError
from moeserve.common.sampling import SamplingParams
from moeserve.router.protocol import ChatCompletionRequest, CompletionRequest
from moeserve.worker.config import EngineConfig
from moeserve.worker.engine import LLMEngine
from moeserve.worker.logits_processors import apply_penalties, penalty_inputs
from moeserve.worker.sampler import Sampler


def _engine(path, **kw) -> LLMEngine:
    """On the CPU wherever the test runs: float32, comparable with the reference to 1e-4
    (tests/gpu covers CUDA)."""
    return LLMEngine(EngineConfig(model=str(path), device="cpu", block_size=4, **kw))

V = 30
sampler = Sampler()


def _reference(logits: list[float], p: SamplingParams, prompt: list[int],
               output: list[int]) -> list[float]:
    """One row, by the textbook definitions (vLLM's order: repetition, frequency, presence)."""
    out = list(logits)
    for t in range(len(out)):
        if t in prompt or t in output:
            out[t] = out[t] / p.repetition_penalty if out[t] > 0 else out[t] * p.repetition_penalty
        count = output.count(t)
        out[t] -= p.frequency_penalty * count + p.presence_penalty * (count > 0)
    return out


def test_penalties_match_the_reference():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, V, generator=g) * 3
    params = [
        SamplingParams(presence_penalty=0.7),
        SamplingParams(),  # untouched row between penalized ones
        SamplingParams(frequency_penalty=-1.2, repetition_penalty=1.6),
        SamplingParams(repetition_penalty=0.5, presence_penalty=-2.0, frequency_penalty=2.0),
    ]
    prompts = [[1, 2, 3], [4], [5, 5, 6], [7, 8]]
    outputs = [[2, 9, 9, 9], [4, 4], [6, 10, 10], []]
    inputs = penalty_inputs(params, outputs, prompts, V, "cpu")
    assert inputs is not None and inputs.row_list == [0, 2, 3]
    got = apply_penalties(x.clone(), params, inputs)
    for row in range(4):
        want = _reference(x[row].tolist(), params[row], prompts[row], outputs[row])
        assert got[row].tolist() == pytest.approx(want, abs=1e-5), row


def test_pending_token_is_read_on_the_device():
    """An output id -1 - r (a token the step before is still sampling) counts last_sampled[r]."""
    params = [SamplingParams(frequency_penalty=1.0)]
    last_sampled = torch.tensor([0, 13, 0])
    x = torch.zeros(1, V)
    inputs = penalty_inputs(params, [[13, -1 - 1]], [[1]], V, "cpu", last_sampled)
    got = apply_penalties(x.clone(), params, inputs)
    assert got[0, 13].item() == -2.0 and got[0].count_nonzero().item() == 1


def test_no_penalty_rows_build_nothing():
    assert penalty_inputs([SamplingParams()] * 3, [[1]] * 3, [[2]] * 3, V, "cpu") is None


def test_logit_bias_bans_and_forces():
    x = torch.randn(6, V, generator=torch.Generator().manual_seed(2)) * 3
    top = x.argmax(-1).tolist()
    banned = [SamplingParams(temperature=0, logit_bias={t: -100}) for t in top]
    assert all(a != b for a, b in zip(sampler(x, banned, [None] * 6).tolist(), top, strict=True))
    forced = [SamplingParams(temperature=1.5, logit_bias={17: 100})] * 6
    torch.manual_seed(0)
    assert sampler(x, forced, [None] * 6).tolist() == [17] * 6
    assert torch.equal(x, x.clone())  # the caller's logits stay raw (logprobs read them)


def test_sampler_applies_penalties_before_greedy_argmax():
    x = torch.zeros(1, V)
    x[0, 4], x[0, 9] = 2.0, 1.5
    p = [SamplingParams(temperature=0, frequency_penalty=1.0)]
    inputs = penalty_inputs(p, [[4]], [[1]], V, "cpu")
    assert sampler(x, p, [None], penalties=inputs).item() == 9
    assert sampler(x, p, [None]).item() == 4


def test_min_p_keeps_only_likely_tokens():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    x = probs.log().expand(4000, 4).contiguous()
    torch.manual_seed(0)
    out = sampler(x, [SamplingParams(min_p=0.5)] * 4000, [None] * 4000)
    assert set(out.tolist()) == {0, 1}  # 0.15 and 0.05 are below 0.5 * 0.5
    frac = (out == 0).float().mean().item()
    assert frac == pytest.approx(0.5 / 0.8, abs=0.03)  # renormalized over what is left


def _tokens(path, mode: str, params: SamplingParams) -> list[int]:
    engine = _engine(path, num_kv_blocks=64, async_scheduling=mode)
    return engine.generate([[3, 14, 15, 92, 65]], params)[0]


def test_frequency_penalty_breaks_a_forced_loop_same_with_steps_ahead(tiny_v3):
    biased = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True, logit_bias={42: 8.0})
    assert _tokens(tiny_v3, "off", biased) == [42] * 10
    penalized = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True,
                               logit_bias={42: 8.0}, frequency_penalty=2.0)
    off = _tokens(tiny_v3, "off", penalized)
    assert 1 <= off.count(42) < 10
    # Scheduled ahead, each step's penalty counts the token still being sampled on the device.
    assert _tokens(tiny_v3, "on", penalized) == off


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"presence_penalty": 2.5}, "presence_penalty"),
        ({"frequency_penalty": -3}, "frequency_penalty"),
        ({"repetition_penalty": 0}, "repetition_penalty"),
        ({"logit_bias": {"5": 101}}, "logit_bias"),
        ({"logit_bias": {"five": 1}}, "logit_bias"),
        ({"min_p": 1.5}, "min_p"),
    ],
)
def test_bad_values_are_400s_naming_the_field(kwargs, param):
    for req in (CompletionRequest.model_validate({"prompt": "x", **kwargs}),
                ChatCompletionRequest.model_validate(
                    {"messages": [{"role": "user", "content": "x"}], **kwargs})):
        with pytest.raises(InvalidRequestError) as info:
            req.sampling_params(16)
        assert info.value.param == param and param in str(info.value)


def test_engine_refuses_a_bias_outside_the_vocabulary(tiny_v3):
    engine = _engine(tiny_v3, num_kv_blocks=16)
    with pytest.raises(InvalidRequestError) as info:
        engine.add_request("r", [1, 2], SamplingParams(logit_bias={10**6: 1.0}))
    assert info.value.param == "logit_bias"


@pytest.mark.parametrize("sampling", [
    {"temperature": 0, "frequency_penalty": 2.0, "logit_bias": {42: 8.0}},
    {"temperature": 1.0, "seed": 7, "presence_penalty": 1.5, "min_p": 0.01},
])
def test_a_migrated_request_resumes_as_if_uninterrupted(tiny_v3, sampling):
    """The router resumes a migrated request with the tokens sent so far appended to the
    prompt and prior_output_tokens naming them: penalties count them, seeds continue."""
    prompt = [3, 14, 15, 92, 65]
    engine = _engine(tiny_v3, num_kv_blocks=64)
    whole = engine.generate([prompt], SamplingParams(max_tokens=10, ignore_eos=True,
                                                     **sampling))[0]
    resumed = engine.generate([prompt + whole[:4]], SamplingParams(
        max_tokens=6, ignore_eos=True, prior_output_tokens=4, **sampling))[0]
    assert resumed == whole[4:]
    restarted = engine.generate([prompt + whole[:4]], SamplingParams(
        max_tokens=6, ignore_eos=True, **sampling))[0]
    assert restarted != whole[4:]  # without it the resumed stream would differ
