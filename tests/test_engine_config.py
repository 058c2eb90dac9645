"""EngineConfig defaults that depend on the device."""

from __future__ import annotations

import pytest

from moeserve.worker.config import CPU_STEP_BUDGET, GPU_STEP_BUDGET, EngineConfig


def test_step_budget_defaults_per_device_and_a_given_one_wins() -> None:
    cfg = EngineConfig(model="/m")
    assert cfg.step_budget("cuda") == GPU_STEP_BUDGET == 8192
    assert cfg.step_budget("cpu") == CPU_STEP_BUDGET == 2048
    given = EngineConfig(model="/m", max_num_batched_tokens=4096)
    assert given.step_budget("cuda") == given.step_budget("cpu") == 4096
    with pytest.raises(ValueError, match="max_num_batched_tokens must be >= 0"):
        EngineConfig(model="/m", max_num_batched_tokens=-1)


def test_engine_resolves_the_budget_for_its_device(tiny_v3) -> None:
    from moeserve.worker.engine import LLMEngine

    engine = LLMEngine(EngineConfig(model=str(tiny_v3), device="cpu", num_kv_blocks=16))
    assert engine.config.max_num_batched_tokens == CPU_STEP_BUDGET
    assert engine.scheduler.config.max_num_batched_tokens == CPU_STEP_BUDGET
    assert engine.runner.config is engine.config  # one config, no stale copy
