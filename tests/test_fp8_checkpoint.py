"""fp8 block-quantized checkpoints (weight + weight_scale_inv, 128x128 blocks) load."""

from __future__ import annotations

import torch
from safetensors import safe_open

from moeserve.common.sampling import SamplingParams
from moeserve.worker.checkpoint import checkpoint_tensors
from moeserve.worker.config import EngineConfig
from moeserve.worker.engine import LLMEngine
from moeserve.worker.weights import dequantize_fp8_blocks
from tests.conftest import make_small_checkpoint


def test_dequantize_applies_each_block_scale():
    w = torch.ones(130, 260).to(torch.float8_e4m3fn)
    scale = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    out = dequantize_fp8_blocks(w, scale, (128, 128))
    assert out[0, 0] == 1 and out[0, 128] == 2 and out[0, 259] == 3
    assert out[128, 0] == 4 and out[129, 259] == 6


def test_fp8_checkpoint_close_to_full_precision(tmp_path):
    overrides = {"hidden_size": 256, "moe_intermediate_size": 128, "intermediate_size": 256}
    full = make_small_checkpoint(tmp_path / "full", "tiny", overrides)
    fp8 = make_small_checkpoint(tmp_path / "fp8", "tiny", overrides, fp8=True)
    shard = next(fp8.glob("*.safetensors"))
    with safe_open(str(shard), framework="pt") as f:
        name = "model.layers.0.self_attn.q_b_proj.weight"
        assert f.get_tensor(name).dtype == torch.float8_e4m3fn
        assert f.get_tensor(name + "_scale_inv").shape == (1, 1)
        assert f.get_tensor("model.layers.1.mlp.experts.0.up_proj.weight_scale_inv").shape == (
            1, 2)

    prompt = list(range(10, 40))
    logits = []
    for path in (full, fp8):
        engine = LLMEngine(EngineConfig(model=str(path), block_size=8, num_kv_blocks=16))
        runner = engine.runner
        engine.add_request("r", prompt, SamplingParams(max_tokens=1, temperature=0))
        out = engine.scheduler.schedule()
        from moeserve.worker.model import AttentionMetadata

        meta, pos = AttentionMetadata.build([out.scheduled[0].block_ids], [0], [len(prompt)], 8)
        with torch.no_grad():
            h = runner.model(torch.tensor(prompt), pos, runner.kv_cache, meta, runner.backend)
            logits.append(runner.model.compute_logits(h))
    cos = torch.nn.functional.cosine_similarity(logits[0].flatten(), logits[1].flatten(), dim=0)
    assert cos > 0.99  # e4m3 keeps ~3 significant bits per weight
    assert not torch.equal(logits[0], logits[1])  # the fp8 weights really were used


def test_router_bias_stays_float32_as_v3_ships_it():
    """DeepSeek-V3/R1 store the noaux_tc router's e_score_correction_bias in float32 beside
    bf16 and fp8 weights; a bf16 copy would move expert choices near ties."""
    bias = torch.randn(256) * 0.1
    for fp8 in (False, True):
        stored = checkpoint_tensors("model.layers.3.mlp.gate.e_score_correction_bias", bias,
                                    torch.bfloat16, fp8)
        assert stored["model.layers.3.mlp.gate.e_score_correction_bias"].dtype == torch.float32
    gate = checkpoint_tensors("model.layers.3.mlp.gate.weight", torch.randn(256, 128),
                              torch.bfloat16, True)
    assert gate["model.layers.3.mlp.gate.weight"].dtype == torch.bfloat16  # as shipped
