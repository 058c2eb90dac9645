"""A worker that falls behind its engine sends the queued steps' tokens as one message, in
order and complete; the router still ends the text at a stop string inside such a message and
counts only the tokens up to it."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import grpc
import pytest
from fastapi.testclient import TestClient

from benchmarks.local_worker import served_engine
from benchmarks.stream_overhead import PacedSteps
from moeserve.api import common_pb2, worker_pb2, worker_pb2_grpc
from moeserve.common.sampling import TokenLogprobs
from moeserve.router.frontend import Frontend
from moeserve.router.http_app import create_app
from moeserve.router.metrics import RouterMetrics
from moeserve.router.serving import Chunk
from moeserve.router.settings import RouterSettings
from moeserve.router.tokenizer import load_tokenizer
from moeserve.worker.config import EngineConfig
from moeserve.worker.engine import LLMEngine
from moeserve.worker.engine_loop import ENGINE_GIL_SWITCH_INTERVAL_S
from moeserve.worker.scheduler_types import EngineCoreOutput, merge_outputs
from moeserve.worker.tokenizer_files import write_tokenizer


def _out(tokens: list[int], finished: bool = False, logprobs: bool = False,
         cached: int = 0) -> EngineCoreOutput:
    lps = [TokenLogprobs(t, -0.5, ()) for t in tokens] if logprobs else None
    return EngineCoreOutput("r", tokens, finished, "length" if finished else None, cached, lps)


def test_merge_outputs_joins_tokens_and_logprobs_in_order() -> None:
    merged = merge_outputs(_out([5], cached=3), _out([6, 7], finished=True))
    assert merged == _out([5, 6, 7], finished=True, cached=3)
    with_lps = merge_outputs(_out([1], logprobs=True), _out([2], logprobs=True))
    assert with_lps is not None and [lp.token_id for lp in with_lps.new_logprobs] == [1, 2]
    # what does not merge: an error behind it, logprobs on one side only, a finished output
    assert merge_outputs(_out([1]), RuntimeError("engine died")) is None
    assert merge_outputs(_out([1]), _out([2], logprobs=True)) is None
    assert merge_outputs(_out([1], finished=True), _out([2])) is None


class BurstSteps(PacedSteps):
    """Each step emits ``burst`` outputs for every request at once, as a worker loop that
    fell ``burst`` steps behind its engine would find them queued."""

    def __init__(self, burst: int) -> None:
        super().__init__(step_s=0.0, host_s=0.0)
        self.burst = burst
        self.next_token = 100

    def step(self) -> list[EngineCoreOutput]:
        outs = []
        for rid in list(self.left):
            for _ in range(min(self.burst, self.left[rid])):
                self.left[rid] -= 1
                done = self.left[rid] == 0
                outs.append(EngineCoreOutput(rid, [self.next_token], done,
                                             "length" if done else None, 0))
                self.next_token += 1
            if not self.left[rid]:
                del self.left[rid]
        return outs


@pytest.fixture(scope="module")
def engine(tiny_v3: Path) -> LLMEngine:
    return LLMEngine(EngineConfig(model=str(tiny_v3), num_kv_blocks=16))


def test_a_worker_behind_its_engine_coalesces_queued_tokens(engine: LLMEngine,
                                                            monkeypatch) -> None:
    steps = BurstSteps(burst=3)
    for name in ("add_request", "has_unfinished_requests", "abort_request", "step"):
        monkeypatch.setattr(engine, name, getattr(steps, name))

    async def go() -> list[list[int]]:
        async with (served_engine(engine) as (address, _),
                    grpc.aio.insecure_channel(address) as channel):
            assert sys.getswitchinterval() <= ENGINE_GIL_SWITCH_INTERVAL_S
            stub = worker_pb2_grpc.WorkerStub(channel)
            req = worker_pb2.WorkerGenerateRequest(
                request_id="r1", prompt_token_ids=[1, 2],
                sampling=common_pb2.SamplingParams(max_tokens=7, temperature=0.0))
            msgs = [msg async for msg in stub.Generate(req, timeout=10)]
        assert msgs[-1].finished and msgs[-1].finish_reason == "length"
        return [list(m.token_ids) for m in msgs]

    messages = asyncio.run(go())
    assert [t for m in messages for t in m] == list(range(100, 107))  # all, in order
    assert len(messages) < 7  # three a step arrived queued together: fewer messages


class ChunkScript:
    """Router.generate's interface: one message of several tokens, as a coalescing worker
    sends them."""

    def __init__(self, token_ids: list[int]) -> None:
        self.settings = RouterSettings()
        self.token_ids = token_ids

    async def generate(self, rid, prompt, params, timeout_s=None):  # noqa: ANN001, ANN201
        lps = [TokenLogprobs(t, -0.5, ()) for t in self.token_ids]
        yield Chunk(self.token_ids, False, None, num_cached_tokens=0, logprobs=lps)
        yield Chunk([self.token_ids[0]], True, "length", num_cached_tokens=0)


def test_a_stop_string_inside_a_multi_token_message_ends_text_and_usage(tmp_path) -> None:
    write_tokenizer(tmp_path, vocab_size=512, bos_id=0, eos_id=1)
    tok = load_tokenizer(tmp_path)
    words = [tok.encode(w, add_special_tokens=False)[0] for w in ("alpha", "beta", "gamma")]
    script = ChunkScript([words[0], words[1], words[2], words[0]])
    frontend = Frontend(script, tok, "m", 10**6, 512, RouterMetrics())  # type: ignore[arg-type]
    with TestClient(create_app(frontend, lambda: True)) as http:
        r = http.post("/v1/completions", json={"model": "m", "prompt": "hi", "max_tokens": 8,
                                               "stop": [tok.decode([words[2]]).strip()],
                                               "logprobs": 1})
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "stop"
    assert choice["text"] == tok.decode(words[:2])
    # the tokens after the stop string's token in the same message are not counted or shown
    assert r.json()["usage"]["completion_tokens"] == 3
    assert len(choice["logprobs"]["tokens"]) == 3
