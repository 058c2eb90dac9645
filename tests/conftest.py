"""Shared fixtures: random checkpoints in the real HuggingFace layout, made once per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Two cores are shared by everything in CI; one intra-op thread per process keeps
# multi-process tests from oversubscribing them.
os.environ.setdefault("OMP_NUM_THREADS", "1")

# A V2-Lite-shaped config at odd sizes: no q_lora, softmax + group-limited routing with
# groups > 1, two shared experts, yarn with mscale, odd head and vocab sizes.
V2_LITE_SMALL = {
    "vocab_size": 515, "hidden_size": 72, "intermediate_size": 100,
    "moe_intermediate_size": 24, "num_hidden_layers": 3, "num_attention_heads": 3,
    "num_key_value_heads": 3, "kv_lora_rank": 20, "qk_nope_head_dim": 12,
    "qk_rope_head_dim": 6, "v_head_dim": 10, "n_routed_experts": 12, "n_shared_experts": 2,
    "num_experts_per_tok": 3, "n_group": 3, "topk_group": 2,
    "topk_method": "group_limited_greedy", "bos_token_id": 0, "eos_token_id": 1,
    "max_position_embeddings": 2048,
}


def make_small_checkpoint(out: Path, preset: str, overrides: dict | None = None, **kw) -> Path:
    from moeserve.worker import checkpoint as ck

    if overrides:
        cfg = ck.preset_config(preset)
        cfg.update(overrides)
        if "rope_scaling" in cfg:  # make yarn matter at test lengths
            cfg["rope_scaling"] = {**cfg["rope_scaling"], "factor": 8,
                                   "original_max_position_embeddings": 16}
        name = f"_test_{out.name}"
        ck.PRESETS[name] = cfg
        try:
            return ck.make_checkpoint(out, name, dtype="float32", **kw)
        finally:
            del ck.PRESETS[name]
    return ck.make_checkpoint(out, preset, dtype="float32", **kw)


@pytest.fixture(scope="session")
def tiny_v3(tmp_path_factory) -> Path:
    """The embedded tiny preset (V3 architecture) in float32."""
    return make_small_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-v3", "tiny")


@pytest.fixture(scope="session")
def tiny_v2(tmp_path_factory) -> Path:
    return make_small_checkpoint(
        tmp_path_factory.mktemp("ckpt") / "tiny-v2", "v2-lite", V2_LITE_SMALL
    )


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> Path:
    """The embedded tiny checkpoint, as `moeserve up` creates it (read-only for tests)."""
    from moeserve.worker.checkpoint import ensure_tiny_checkpoint

    return ensure_tiny_checkpoint(tmp_path_factory.mktemp("ckpt"))


@pytest.fixture(scope="session")
def reference(model_dir: Path):
    """Greedy tokens of the engine run in-process, as `moeserve generate` computes them."""
    from moeserve.common.sampling import SamplingParams
    from moeserve.worker.config import EngineConfig
    from moeserve.worker.engine import LLMEngine

    engine = LLMEngine(EngineConfig(model=str(model_dir), num_kv_blocks=96))

    def run(prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        return [engine.generate([p], params)[0] for p in prompts]

    return run
