"""logprobs: computed on the device in the step, equal to log_softmax of the model's raw logits
(transformers as the reference), greedy's chosen token is the top one, carried through the
worker wire and rendered in OpenAI's completions and chat shapes."""

from __future__ import annotations

import math

import pytest
import torch

from moeserve.api import common_pb2
from moeserve.api.wire import logprobs_from_proto, logprobs_to_proto
from moeserve.common.sampling import SamplingParams, TokenLogprobs
from moeserve.worker.config import EngineConfig
from moeserve.worker.engine import LLMEngine
from moeserve.worker.logits_processors import gather_logprobs
from moeserve.worker.sampler import SampledTokens


def _engine(path, **kw) -> LLMEngine:
    """On the CPU wherever the test runs: float32, comparable with the reference to 1e-4
    (tests/gpu covers CUDA)."""
    return LLMEngine(EngineConfig(model=str(path), device="cpu", block_size=4, **kw))

PROMPT = [7, 91, 33, 250, 18, 4, 77, 301, 12, 65, 140, 9]


def test_gather_logprobs_is_log_softmax_and_topk():
    x = torch.randn(3, 40, generator=torch.Generator().manual_seed(0)) * 4
    tokens = torch.tensor([5, 0, 39])
    out = gather_logprobs(x, tokens, 4)
    ref = torch.log_softmax(x.double(), -1)
    assert torch.allclose(out.chosen.double(), ref[torch.arange(3), tokens], atol=1e-5)
    vals, ids = ref.topk(4, -1)
    assert torch.equal(out.top_ids, ids) and torch.allclose(out.top_logprobs.double(), vals,
                                                            atol=1e-5)


def test_sampled_tokens_hand_each_row_its_k():
    x = torch.randn(3, 20, generator=torch.Generator().manual_seed(1))
    tokens = x.argmax(-1)
    handle = SampledTokens(["a", "b", "c"], tokens, gather_logprobs(x, tokens, 3), [3, None, 0])
    assert handle.result() == dict(zip("abc", tokens.tolist(), strict=True))
    got = handle.logprobs()
    assert set(got) == {"a", "c"}  # "b" asked for none
    assert len(got["a"].top) == 3 and got["c"].top == ()
    assert got["a"].top[0] == (got["a"].token_id, pytest.approx(got["a"].logprob))


def test_wire_round_trip():
    lp = TokenLogprobs(5, -0.25, ((5, -0.25), (9, -1.5)))
    msg = common_pb2.TokenLogprobs.FromString(logprobs_to_proto(lp).SerializeToString())
    back = logprobs_from_proto(5, msg)
    assert back.token_id == 5 and back.logprob == -0.25 and back.top == lp.top


def _reference_logprobs(path, ids: list[int]) -> torch.Tensor:
    """log_softmax of transformers' logits at every position of ``ids``."""
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0]
    return torch.log_softmax(logits.double(), -1)


def _run(engine: LLMEngine, params: SamplingParams) -> list[TokenLogprobs]:
    engine.add_request("r", PROMPT, params)
    got = []
    while engine.has_unfinished_requests():
        for o in engine.step():
            assert o.new_logprobs is not None and len(o.new_logprobs) == len(o.new_token_ids)
            got += o.new_logprobs
    return got


@pytest.mark.parametrize("mode", ["off", "on"])
def test_engine_logprobs_equal_log_softmax_of_reference_logits(tiny_v3, mode):
    engine = _engine(tiny_v3, num_kv_blocks=64, async_scheduling=mode)
    got = _run(engine, SamplingParams(max_tokens=6, temperature=0, ignore_eos=True, logprobs=5))
    assert len(got) == 6
    ref = _reference_logprobs(tiny_v3, PROMPT + [g.token_id for g in got])
    for i, g in enumerate(got):
        row = ref[len(PROMPT) - 1 + i]
        # greedy: the chosen token is the most likely one
        assert g.top[0][0] == g.token_id and g.top[0][1] == g.logprob
        assert g.logprob == pytest.approx(row[g.token_id].item(), abs=1e-4)
        want_vals, want_ids = row.topk(5)
        assert [t for t, _ in g.top] == want_ids.tolist()
        assert [v for _, v in g.top] == pytest.approx(want_vals.tolist(), abs=1e-4)


def test_logprobs_are_the_raw_distribution_not_the_processed_one(tiny_v3):
    """vLLM's default (raw_logprobs): bias, penalties and temperature change the choice, not
    the reported distribution."""
    engine = _engine(tiny_v3, num_kv_blocks=64)
    plain = _run(engine, SamplingParams(max_tokens=1, temperature=0, logprobs=3))[0]
    forced = _run(engine, SamplingParams(max_tokens=1, temperature=0.7, seed=3, logprobs=3,
                                         logit_bias={11: 100.0}, presence_penalty=1.0))[0]
    assert forced.token_id == 11 and plain.token_id != 11
    assert [t for t, _ in forced.top] == [t for t, _ in plain.top]  # the same raw top 3
    assert [v for _, v in forced.top] == pytest.approx([v for _, v in plain.top], abs=1e-5)
    assert forced.logprob < plain.logprob and math.isfinite(forced.logprob)


def test_no_logprobs_unless_asked(tiny_v3):
    engine = _engine(tiny_v3, num_kv_blocks=64)
    engine.add_request("r", PROMPT, SamplingParams(max_tokens=2, temperature=0))
    outs = []
    while engine.has_unfinished_requests():
        outs += engine.step()
    assert outs and all(o.new_logprobs is None for o in outs)


class _LogprobsDecode:
    """A decode stub that streams one token per message with its logprobs (when asked) and
    breaks after ``fail_after`` messages."""

    def __init__(self, fail_after: int | None = None):
        self.fail_after = fail_after
        self.calls: list = []

    def Generate(self, req, timeout=None):  # noqa: N802 (gRPC method name)
        from moeserve.api import worker_pb2
        from tests.test_reliability import _Call, _Unavailable

        self.calls.append(req)

        async def gen():
            for i in range(req.sampling.max_tokens):
                if i == self.fail_after:
                    raise _Unavailable()
                last = i == req.sampling.max_tokens - 1
                msg = worker_pb2.WorkerGenerateResponse(token_ids=[100 + i], finished=last,
                                                        finish_reason="length" if last else "")
                if req.sampling.HasField("logprobs"):
                    msg.logprobs.append(common_pb2.TokenLogprobs(
                        logprob=-0.5, top_token_ids=[100 + i], top_logprobs=[-0.5]))
                yield msg

        return _Call(gen())

    async def Abort(self, req, timeout=None):  # noqa: N802
        from moeserve.api import worker_pb2

        return worker_pb2.AbortResponse()


def test_a_migrated_stream_keeps_its_logprobs():
    import asyncio

    from tests.test_reliability import _router

    async def go():
        broken, good = _LogprobsDecode(fail_after=3), _LogprobsDecode()
        router, _, _ = _router([good, broken])  # round robin starts with the broken one
        chunks = [c async for c in router.generate(
            "r", [5, 6, 7], SamplingParams(max_tokens=8, temperature=0, logprobs=1))]
        return chunks, good

    chunks, good = asyncio.run(go())
    assert sum(len(c.token_ids) for c in chunks) == 8
    assert all(c.logprobs is not None and len(c.logprobs) == len(c.token_ids) for c in chunks)
    resumed = good.calls[-1].sampling
    assert resumed.logprobs == 1 and resumed.prior_output_tokens == 3
