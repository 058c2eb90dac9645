"""Warm-up before ready (worker/warmup.py) and the compilations-after-ready count
(worker/compile_watch.py)."""

from __future__ import annotations

import re

import pytest
from prometheus_client import generate_latest

from moeserve.common.sampling import SamplingParams
from moeserve.worker.compile_watch import WATCH, CompileWatch
from moeserve.worker.config import EngineConfig
from moeserve.worker.metrics import WorkerMetrics
from moeserve.worker.warmup import build_ready_engine, plan_warmup, sampling_variants


def _plan(**kw):
    args = dict(max_num_batched_tokens=8192, max_num_seqs=256, max_model_len=32768,
                block_size=64, num_blocks=10_000, full=True)
    return plan_warmup(**{**args, **kw})


def test_gpu_plan_covers_every_prefill_class_the_step_budget_allows() -> None:
    plan = _plan()
    lengths = set(plan.prefill_lengths)
    for k in range(14):  # 1 .. 8192
        assert 2**k in lengths
        if 2**k >= 16 and 2**k < 8192:
            assert 2**k + 1 in lengths  # the same MoE tile, not divisible by 16
        if 2**k >= 32:  # below a threshold there (SHARED_APART_MIN_TOKENS is 1024)
            assert {2**k - 16, 2**k - 1} <= lengths
    assert max(lengths) == 8192
    assert plan.chunked_prompt > 8192  # a second chunk runs over earlier context
    assert plan.decode_batch == 256  # every batch size 256..1 decodes
    assert plan.mixed_prompt >= 1
    # several prompts in one step, as a loaded server prefills them (the H200 sweep compiled
    # kernels after ready without these)
    assert plan.batched == ((4093,) * 2, (2045,) * 4, (1021,) * 8)
    assert plan.mixed_long == 1021  # 16 blocks of 64 with its two tokens
    from moeserve.worker.model.moe import SHARED_APART_MIN_TOKENS as apart

    assert {apart - 1, apart - 16, apart, apart + 1} <= lengths  # both sides, both classes


def test_gpu_plan_stays_within_max_model_len_and_the_kv_pool() -> None:
    plan = _plan(max_model_len=1000)
    assert max(plan.prefill_lengths) == 998 and plan.chunked_prompt == 0
    small = _plan(num_blocks=20, max_num_batched_tokens=2048)
    assert max(small.prefill_lengths) <= 19 * 64
    assert small.decode_batch < 256 and small.decode_batch >= 1


def test_gpu_plan_fills_steps_larger_than_any_prompt_with_several() -> None:
    """max_model_len below the step budget (1000-token prompts under an 8192 budget): each
    step size class up to the budget still runs once, as several prompts in one step."""
    plan = _plan(max_model_len=1164)
    assert max(plan.prefill_lengths) == 1162
    totals = {sum(step) for step in plan.batched}
    for k in range(11, 14):  # 2048 .. 8192
        assert {2**k, 2**k - 1, 2**k - 16} <= totals
        if 2**k < 8192:
            assert 2**k + 1 in totals
    assert all(max(step) <= 1162 for step in plan.batched)
    # a pool too small for a step's prompts leaves that step out
    small = _plan(max_model_len=1164, num_blocks=60)
    assert all(sum(-(-(n + 1) // 64) for n in step) <= 59 for step in small.batched)


def test_cpu_plan_is_small_whatever_the_limits() -> None:
    plan = _plan(full=False)
    assert plan.num_requests <= len(sampling_variants(1)) + 2
    assert max(plan.prefill_lengths) <= 8 and plan.chunked_prompt == 0 and not plan.stagger


def _scrape(metrics: WorkerMetrics) -> dict[str, float]:
    text = generate_latest(metrics.registry).decode()
    pat = r'^moeserve:worker_compilations_after_ready_total\{kind="(\w+)"\} (\S+)$'
    return {k: float(v) for k, v in re.findall(pat, text, re.M)}


@pytest.fixture(scope="module")
def ready_engine(model_dir):
    return build_ready_engine(EngineConfig(model=str(model_dir), device="cpu",
                                           num_kv_blocks=256, max_model_len=512))


def test_warmup_leaves_no_trace_and_the_worker_reports_its_startup(ready_engine) -> None:
    stats = ready_engine.stats()
    assert (stats.generation_tokens, stats.prompt_tokens_computed, stats.prefix_cache_queries,
            stats.num_running, stats.kv_usage) == (0, 0, 0, 0, 0.0)
    assert ready_engine.take_kv_events() == []
    text = generate_latest(WorkerMetrics().registry).decode()
    for phase in ("load", "capture", "warmup"):
        assert f'moeserve:worker_startup_seconds{{phase="{phase}"}}' in text
    assert WATCH.ready
    # The grammar engine's tokenizer is built before ready, not by the first constrained request.
    assert ready_engine.runner.grammars.compiler._tokenizer is not None


def test_burst_after_ready_compiles_nothing_and_a_new_shape_is_counted(ready_engine) -> None:
    metrics = WorkerMetrics()
    before = _scrape(metrics)
    assert set(before) == {"triton", "dynamo", "cuda_graph"}
    variants = sampling_variants(ready_engine.model_config.eos_token_id)
    prompts = [[(7 * i + j) % 200 + 2 for j in range(1 + 37 * i % 300)] for i in range(24)]
    params = [SamplingParams(**{**_fields(variants[i % len(variants)]), "max_tokens": 1 + i % 5})
              for i in range(len(prompts))]
    out = ready_engine.generate(prompts, params)
    assert all(len(o) >= 1 for o in out)
    assert _scrape(metrics) == before  # nothing compiled on the request path

    import torch

    double = torch.compile(lambda x: x * 2, backend="eager", dynamic=False)
    double(torch.ones(3))
    double(torch.ones(5))  # a shape it never saw: a recompile, after ready
    after = _scrape(metrics)
    assert after["dynamo"] >= before["dynamo"] + 2
    assert after["triton"] == before["triton"] and after["cuda_graph"] == before["cuda_graph"]


def _fields(p: SamplingParams) -> dict:
    import dataclasses

    return {f.name: getattr(p, f.name) for f in dataclasses.fields(p)}


def test_triton_cache_misses_are_counted_and_other_hooks_still_run() -> None:
    knobs = pytest.importorskip("triton").knobs
    seen = []
    saved = knobs.runtime.jit_cache_hook
    knobs.runtime.jit_cache_hook = lambda **kw: seen.append(kw["repr"]) or None
    try:
        watch = CompileWatch()
        watch.install()
        watch.mark_ready()
        hook = knobs.runtime.jit_cache_hook
        assert hook(key="k", repr="kernel[num_warps=4](x: *fp32)", fn=None, compile={},
                    is_manual_warmup=False, already_compiled=False) is None
        assert watch.counts_after_ready()["triton"] == 1
        assert seen == ["kernel[num_warps=4](x: *fp32)"]
    finally:
        knobs.runtime.jit_cache_hook = saved


def test_compilations_before_ready_do_not_count() -> None:
    watch = CompileWatch()
    watch.note("cuda_graph", "decode batch 8")
    assert watch.counts_after_ready()["cuda_graph"] == 0
    watch.mark_ready()
    watch.note("cuda_graph", "decode batch 8")
    assert watch.counts_after_ready() == {"triton": 0, "dynamo": 0, "cuda_graph": 1}


def test_no_warmup_says_so_and_runs_nothing(model_dir, caplog) -> None:
    import logging

    with caplog.at_level(logging.INFO, logger="moeserve.worker.warmup"):
        build_ready_engine(EngineConfig(model=str(model_dir), device="cpu", num_kv_blocks=64,
                                        warmup=False))
    assert "warm-up off" in caplog.text and "(0 requests, 0 steps)" in caplog.text


def test_the_gpu_plan_runs_through_the_engine_with_async_scheduling(model_dir) -> None:
    """The plan a CUDA worker runs (chunked prompt, staggered ladder, mixed step, every
    sampling variant), on the CPU at small limits, with the step-ahead scheduling GPUs use."""
    from moeserve.worker.engine import LLMEngine
    from moeserve.worker.warmup import run_warmup

    engine = LLMEngine(EngineConfig(model=str(model_dir), device="cpu", async_scheduling="on",
                                    max_num_batched_tokens=128, max_num_seqs=16,
                                    num_kv_blocks=120, block_size=16))
    plan = plan_warmup(max_num_batched_tokens=128, max_num_seqs=16,
                       max_model_len=engine.max_model_len, block_size=16, num_blocks=120,
                       full=True)
    assert plan.chunked_prompt > 128 and plan.decode_batch == 16 and plan.stagger
    requests, steps = run_warmup(engine, plan)
    assert requests == plan.num_requests
    assert steps >= len(plan.prefill_lengths) + 2 + 16  # the ladder decodes one size a step
    stats = engine.stats()
    assert (stats.num_running, stats.num_waiting, stats.kv_usage) == (0, 0, 0.0)
    assert stats.generation_tokens == 0 and engine.take_kv_events() == []
