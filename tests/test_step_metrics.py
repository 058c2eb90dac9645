"""A worker exports each engine step's wall time by kind and the prompt tokens of its mixed
steps: what tells, under a serving load, whether prefills arrive as a few full steps or many
small ones (benchmarks/serving_sweep.py reports them per load)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
from prometheus_client import generate_latest

from benchmarks.local_worker import served_engine
from moeserve.api import common_pb2, worker_pb2, worker_pb2_grpc
from moeserve.worker.config import EngineConfig
from moeserve.worker.engine import LLMEngine
from moeserve.worker.metrics import WorkerMetrics


def _sample(metrics: WorkerMetrics, name: str, labels: dict[str, str] | None = None) -> float:
    value = metrics.registry.get_sample_value(name, labels or {})
    return 0.0 if value is None else value


def test_worker_exports_step_time_by_kind_and_prompt_tokens_per_mixed_step(tiny_v3: Path
                                                                           ) -> None:  # fmt: skip
    engine = LLMEngine(EngineConfig(model=str(tiny_v3), num_kv_blocks=16,
                                    enable_prefix_caching=False))  # fmt: skip
    metrics = WorkerMetrics()

    async def go() -> None:
        async with (served_engine(engine, metrics=metrics) as (address, _),
                    grpc.aio.insecure_channel(address) as channel):
            stub = worker_pb2_grpc.WorkerStub(channel)
            for rid, prompt in (("a", list(range(3, 23))), ("b", list(range(5, 17)))):
                req = worker_pb2.WorkerGenerateRequest(
                    request_id=rid, prompt_token_ids=prompt,
                    sampling=common_pb2.SamplingParams(max_tokens=5, temperature=0.0,
                                                       ignore_eos=True))  # fmt: skip
                msgs = [m async for m in stub.Generate(req, timeout=30)]
                assert sum(len(m.token_ids) for m in msgs) == 5

    asyncio.run(go())
    mixed = _sample(metrics, "moeserve:engine_step_seconds_count", {"kind": "mixed"})
    decode = _sample(metrics, "moeserve:engine_step_seconds_count", {"kind": "decode"})
    assert mixed == 2  # one prompt each, whole
    assert decode >= 2 * 3  # the other tokens, a step each (one may run ahead)
    assert _sample(metrics, "moeserve:engine_step_prompt_tokens_sum") == 20 + 12
    assert _sample(metrics, "moeserve:engine_step_prompt_tokens_count") == 2
    assert _sample(metrics, "moeserve:engine_step_seconds_sum", {"kind": "mixed"}) > 0
    # a gap after every step that left its request unfinished (each request's last one did not)
    assert _sample(metrics, "moeserve:engine_step_gap_seconds_count") == mixed + decode - 2
    text = generate_latest(metrics.registry).decode()
    assert 'moeserve:engine_step_seconds_bucket{kind="decode",le="0.01"}' in text
