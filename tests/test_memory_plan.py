"""The memory plan's arithmetic against independent counts: the bytes of real random
checkpoints, the parameters the engine's model holds, and the engine's start-up line."""

from __future__ import annotations

import logging
import math
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest
import yaml
from safetensors import safe_open

from moeserve.common.memory_plan import (
    GIB,
    EngineSettings,
    PlanError,
    checkpoint_bytes,
    kv_bytes_per_token,
    model_tensors,
    plan_memory,
    resident_bytes,
)
from moeserve.common.model_config import ModelConfig, load_model_config
from moeserve.common.model_presets import PRESETS, shape_config
from moeserve.common.spec import SpecError, parse_manifest

REPO = Path(__file__).resolve().parents[1]
H200 = 143771 << 20  # nvidia-smi's total on the H200s here (MiB)
_SAFETENSORS_DTYPES = {"F8_E4M3": ("float8_e4m3fn", 1), "BF16": ("bfloat16", 2),
                       "F32": ("float32", 4)}
# tiny with experts whose intermediate size is a whole fp8 block, so they stay fp8
TINY_FP8_EXPERTS = {**PRESETS["tiny"], "moe_intermediate_size": 128, "hidden_size": 128}


def _safetensors_bytes(model_dir: Path) -> dict[str, int]:
    out: dict[str, int] = {}
    for path in model_dir.glob("*.safetensors"):
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                t = f.get_slice(name)
                dtype, size = _SAFETENSORS_DTYPES[t.get_dtype()]
                out[dtype] = out.get(dtype, 0) + math.prod(t.get_shape()) * size
    return out


def _checkpoint(tmp_path: Path, preset: str, cfg: dict | None = None, **kw) -> Path:
    from moeserve.worker import checkpoint as ck

    if cfg is None:
        return ck.make_checkpoint(tmp_path / preset, preset, **kw)
    ck.PRESETS["_plan_test"] = cfg
    try:
        return ck.make_checkpoint(tmp_path / "custom", "_plan_test", **kw)
    finally:
        del ck.PRESETS["_plan_test"]


@pytest.mark.parametrize("case", [
    ("tiny", None, {"fp8": True}),
    ("tiny", None, {}),
    ("tiny", None, {"fp8": True, "layers": 1}),  # no MoE layer at all
    ("custom", TINY_FP8_EXPERTS, {"fp8": True}),
], ids=["tiny-fp8", "tiny-bf16", "tiny-dense-fp8", "fp8-experts"])
def test_checkpoint_bytes_equal_the_safetensors(tmp_path: Path, case) -> None:
    preset, cfg, kw = case
    model_dir = _checkpoint(tmp_path, preset, cfg, **kw)
    config = load_model_config(model_dir)
    assert checkpoint_bytes(config) == _safetensors_bytes(model_dir)


def _meta_model_bytes(config: ModelConfig, local_experts: int | None) -> dict[str, int]:
    """What the engine's model allocates (on the meta device), with ``local_experts`` routed
    experts per MoE layer as ExpertParallel would place them."""
    import torch

    from moeserve.worker.model import DeepseekForCausalLM
    from moeserve.worker.model.moe import MoE

    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("meta"):
            model = DeepseekForCausalLM(config, max_positions=1)
            if local_experts is not None:
                for moe in (m for m in model.modules() if isinstance(m, MoE)):
                    moe.experts.set_placement(list(range(local_experts)))
    finally:
        torch.set_default_dtype(default)
    out: dict[str, int] = {}
    for p in model.parameters():
        kind = str(p.dtype).removeprefix("torch.")
        out[kind] = out.get(kind, 0) + p.nbytes
    return out


@pytest.mark.parametrize("ep,redundant", [(1, 0), (2, 0), (4, 4)])
def test_resident_bytes_equal_the_models_parameters(ep: int, redundant: int) -> None:
    config = ModelConfig.from_dict(PRESETS["tiny"])
    local = None if ep == 1 else (8 + redundant) // ep
    plan, _ = resident_bytes(config, "bfloat16", ep, redundant)
    assert plan == _meta_model_bytes(config, local)


def test_v3_param_count_and_kv_per_token() -> None:
    config = ModelConfig.from_dict(shape_config("deepseek-v3"))
    params = sum(t.numel for t in model_tensors(config))
    assert abs(params - 671.03e9) < 0.01e9  # DeepSeek's 671B, the MTP layer not counted
    assert kv_bytes_per_token(config, "bfloat16") == (512 + 64) * 61 * 2
    # the fp8 checkpoint: 128x128 blocks, embeddings / norms / gate / lm_head in bf16
    ckpt = checkpoint_bytes(config)
    assert 668e9 < ckpt["float8_e4m3fn"] < 670e9 and ckpt["bfloat16"] < 4e9


def test_v3_on_one_8xh200_node_keeps_30gb_of_kv_per_gpu() -> None:
    config = ModelConfig.from_dict(shape_config("deepseek-v3"))
    plan = plan_memory(config, EngineSettings(), ep=8, gpu_bytes=H200)
    assert plan.fits, plan.problems
    assert plan.experts_per_rank == 32
    assert plan.kv_cache_bytes >= 30e9, plan.summary()
    assert plan.kv_blocks == plan.kv_cache_bytes // (70272 * 64)
    assert plan.batch_at_max_len == (plan.kv_blocks - 1) // (32768 // 64)
    # the arithmetic: usable = 0.9 * HBM - runtime, KV = usable - weights
    assert plan.kv_cache_bytes == int(0.9 * H200) - plan.runtime_bytes - plan.weight_bytes


def test_v3_on_one_gpu_does_not_fit_and_says_by_how_much() -> None:
    config = ModelConfig.from_dict(shape_config("deepseek-v3"))
    plan = plan_memory(config, EngineSettings(), ep=1, gpu_bytes=H200)
    assert not plan.fits
    assert plan.problems[0].startswith(f"weights {plan.weight_bytes / GIB:.2f} GiB per GPU > "
                                       "125.36 GiB usable (0.9 of 140.40 GiB")
    dequantized = plan_memory(config, EngineSettings(fp8_weights=False), ep=8, gpu_bytes=H200)
    assert not dequantized.fits  # V3 in bf16 does not fit one 8xH200 node


def test_no_room_for_two_blocks_and_too_many_blocks_are_refused() -> None:
    config = ModelConfig.from_dict(shape_config("deepseek-v3"))
    weights = plan_memory(config, EngineSettings(), ep=8, gpu_bytes=H200).weight_bytes
    tight = (weights + GIB + 100) / 0.9  # weights fit, a block does not
    plan = plan_memory(config, EngineSettings(), ep=8, gpu_bytes=int(tight))
    assert not plan.fits and "less than 2 blocks" in plan.problems[0]
    plan = plan_memory(config, EngineSettings(num_kv_blocks=10**6), ep=8, gpu_bytes=H200)
    assert not plan.fits and "num-kv-blocks 1000000 need" in plan.problems[0]


@pytest.mark.parametrize("kwargs,message", [
    ({"gpu_memory_utilization": 1.5}, "gpu-memory-utilization must be in (0, 1]"),
    ({"dtype": "int8"}, "dtype must be one of float32, bfloat16, float16, got 'int8'"),
    ({"block_size": 0}, "block-size must be >= 1"),
])
def test_bad_engine_settings_are_named(kwargs: dict, message: str) -> None:
    with pytest.raises(PlanError, match=message.replace("(", r"\(").replace("]", r"\]")):
        EngineSettings(**kwargs)


def test_bad_layouts_are_named() -> None:
    config = ModelConfig.from_dict(PRESETS["tiny"])
    with pytest.raises(PlanError, match=r"ep \(3\) must divide n_routed_experts"):
        plan_memory(config, EngineSettings(), ep=3)
    with pytest.raises(PlanError, match="exceeds the model's max_position_embeddings"):
        plan_memory(config, EngineSettings(max_model_len=10**6))
    with pytest.raises(PlanError, match="GPU memory must be positive"):
        plan_memory(config, EngineSettings(), gpu_bytes=0)


def _manifest(**model) -> dict:
    doc = yaml.safe_load((REPO / "examples/tiny-cpu.yaml").read_text())
    doc["spec"]["model"].update(model)
    return doc


@pytest.mark.parametrize("model,field,message", [
    ({"shape": "gpt-4"}, "spec.model.shape", "Input should be"),
    ({"config": {"hidden_size": "big"}}, "spec.model.config", "'hidden_size' must be an int"),
    ({"config": {"quantization_config": {"quant_method": "awq"}}}, "spec.model.config",
     "quant_method"),
    ({"source": {"pvc": {"claimName": "m"}}, "config": {"vocab_size": 10}},
     "spec.model.config", "unsupported architecture"),
])
def test_bad_model_shapes_in_a_manifest_are_named(model: dict, field: str, message: str) -> None:
    with pytest.raises(SpecError) as info:
        parse_manifest(_manifest(**model))
    assert field in info.value.fields, info.value
    assert message in str(info.value)


def test_shape_config_overrides_and_names_resolve() -> None:
    dep = parse_manifest(_manifest(shape="deepseek-v3", config={"num_hidden_layers": 4}))
    config = dep.spec.model.model_config_for_plan()
    assert config.num_hidden_layers == 4 and config.fp8_block_size == (128, 128)
    dep = parse_manifest(_manifest(name="deepseek-ai/DeepSeek-R1",
                                   source={"pvc": {"claimName": "r1"}}))
    assert dep.spec.model.model_config_for_plan().n_routed_experts == 256
    dep = parse_manifest(_manifest(name="someone/unknown", source={"pvc": {"claimName": "x"}}))
    assert dep.spec.model.model_config_for_plan() is None


def test_one_preset_table_and_no_torch_for_the_operator() -> None:
    from moeserve.worker import checkpoint

    assert checkpoint.PRESETS is PRESETS
    code = ("import sys, moeserve.operator.memory_check, moeserve.operator.cli; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


def test_engine_logs_its_memory_as_the_plan_predicts(tmp_path: Path, caplog) -> None:
    from moeserve.worker.config import EngineConfig
    from moeserve.worker.engine import LLMEngine

    model_dir = _checkpoint(tmp_path, "tiny", fp8=True)
    settings = {"quantization": "fp8"} if "quantization" in {
        f.name for f in fields(EngineConfig)} else {}
    with caplog.at_level(logging.INFO, logger="moeserve.worker.runner"):
        engine = LLMEngine(EngineConfig(model=str(model_dir), device="cpu", dtype="bfloat16",
                                        num_kv_blocks=33, **settings))
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("memory:"))
    config = load_model_config(model_dir)
    fp8 = bool(settings)
    planned = sum(resident_bytes(config, "bfloat16", fp8_weights=fp8)[0].values())
    measured = sum(p.nbytes for p in engine.runner.model.parameters())
    assert measured == planned
    assert f"; plan {planned / 1024:.2f} KiB)" in line
    assert f"weights {planned / 1024:.2f} KiB (" in line
    assert "33 blocks of 64 tokens at 240 B/token" in line  # (32 + 8) x 3 layers x 2 B
    assert "max_model_len 4096: 0 (KV 0" in line  # 32 usable blocks hold 2048 tokens


def test_docs_show_the_plan_of_every_example() -> None:
    """docs/memory.md holds `moeserve operator plan -f` of each example, as generated now."""
    from moeserve.operator.memory_check import plan_markdown

    doc = (REPO / "docs/memory.md").read_text()
    examples = sorted(p for p in (REPO / "examples").glob("*.yaml")
                      if "kind: MoEDeployment" in p.read_text())
    for path in examples:
        for body in yaml.safe_load_all(path.read_text()):
            table = plan_markdown(parse_manifest(body))
            assert table in doc, f"docs/memory.md lacks the current plan of {path.name}"
