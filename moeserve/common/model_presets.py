"""Known DeepSeek model shapes: config.json contents by name, importable without torch.

One table serves `moeserve make-checkpoint --preset` (random checkpoints of these shapes, in
``moeserve.worker.checkpoint``) and the memory plan (``moeserve.common.memory_plan``), which the
operator computes from a manifest without reading the checkpoint: ``spec.model.shape`` names a
shape of :data:`SHAPES`, or the model's HuggingFace id is one of :data:`KNOWN_MODEL_IDS`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, Literal, get_args

from moeserve.common.errors import ConfigError
from moeserve.common.model_config import ModelConfig

__all__ = ["PRESETS", "SHAPES", "KNOWN_MODEL_IDS", "FP8_QUANTIZATION_CONFIG", "ModelShape",
           "shape_config", "shape_for_model_id", "planned_model_config"]

# DeepSeek-V3/R1's release: e4m3 weights, one float32 scale per 128x128 block.
FP8_QUANTIZATION_CONFIG: dict[str, Any] = {
    "quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
    "weight_block_size": [128, 128],
}

_YARN_V3 = {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
            "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}
PRESETS: dict[str, dict[str, Any]] = {
    # Small enough for CPU tests, with every feature of V3 switched on: q_lora, groups, yarn.
    "tiny": {
        "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3",
        "vocab_size": 512, "hidden_size": 64, "intermediate_size": 96,
        "moe_intermediate_size": 32, "num_hidden_layers": 3, "num_attention_heads": 4,
        "num_key_value_heads": 4, "q_lora_rank": 48, "kv_lora_rank": 32,
        "qk_nope_head_dim": 16, "qk_rope_head_dim": 8, "v_head_dim": 16,
        "n_routed_experts": 8, "n_shared_experts": 1, "num_experts_per_tok": 2,
        "first_k_dense_replace": 1, "moe_layer_freq": 1, "n_group": 2, "topk_group": 1,
        "topk_method": "noaux_tc", "scoring_func": "sigmoid", "norm_topk_prob": True,
        "routed_scaling_factor": 2.5, "max_position_embeddings": 4096, "rope_theta": 10000,
        "rope_scaling": {**_YARN_V3, "factor": 4, "original_max_position_embeddings": 1024},
        "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "bos_token_id": 0,
        "eos_token_id": 1, "hidden_act": "silu", "attention_bias": False,
    },
    "v2-lite": {
        "architectures": ["DeepseekV2ForCausalLM"], "model_type": "deepseek_v2",
        "vocab_size": 102400, "hidden_size": 2048, "intermediate_size": 10944,
        "moe_intermediate_size": 1408, "num_hidden_layers": 27, "num_attention_heads": 16,
        "num_key_value_heads": 16, "q_lora_rank": None, "kv_lora_rank": 512,
        "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128,
        "n_routed_experts": 64, "n_shared_experts": 2, "num_experts_per_tok": 6,
        "first_k_dense_replace": 1, "moe_layer_freq": 1, "n_group": 1, "topk_group": 1,
        "topk_method": "greedy", "scoring_func": "softmax", "norm_topk_prob": False,
        "routed_scaling_factor": 1.0, "max_position_embeddings": 163840, "rope_theta": 10000,
        "rope_scaling": {**_YARN_V3, "mscale": 0.707, "mscale_all_dim": 0.707},
        "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "bos_token_id": 100000,
        "eos_token_id": 100001, "hidden_act": "silu", "attention_bias": False,
    },
    "v3": {
        "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3",
        "vocab_size": 129280, "hidden_size": 7168, "intermediate_size": 18432,
        "moe_intermediate_size": 2048, "num_hidden_layers": 61, "num_attention_heads": 128,
        "num_key_value_heads": 128, "q_lora_rank": 1536, "kv_lora_rank": 512,
        "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128,
        "n_routed_experts": 256, "n_shared_experts": 1, "num_experts_per_tok": 8,
        "first_k_dense_replace": 3, "moe_layer_freq": 1, "n_group": 8, "topk_group": 4,
        "topk_method": "noaux_tc", "scoring_func": "sigmoid", "norm_topk_prob": True,
        "routed_scaling_factor": 2.5, "max_position_embeddings": 163840, "rope_theta": 10000,
        "rope_scaling": _YARN_V3, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
        "bos_token_id": 0, "eos_token_id": 1, "hidden_act": "silu", "attention_bias": False,
    },
}

ModelShape = Literal["deepseek-v3", "deepseek-r1", "deepseek-v2-lite", "tiny"]
# Manifest shape name -> (preset, shipped in fp8). R1 has V3's architecture and sizes.
SHAPES: dict[str, tuple[str, bool]] = {
    "deepseek-v3": ("v3", True),
    "deepseek-r1": ("v3", True),
    "deepseek-v2-lite": ("v2-lite", False),
    "tiny": ("tiny", False),
}

# HuggingFace ids (lower case) whose shape the operator knows without a `shape` field.
KNOWN_MODEL_IDS: dict[str, str] = {
    "deepseek-ai/deepseek-v3": "deepseek-v3",
    "deepseek-ai/deepseek-v3-base": "deepseek-v3",
    "deepseek-ai/deepseek-v3-0324": "deepseek-v3",
    "deepseek-ai/deepseek-r1": "deepseek-r1",
    "deepseek-ai/deepseek-r1-zero": "deepseek-r1",
    "deepseek-ai/deepseek-r1-0528": "deepseek-r1",
    "deepseek-ai/deepseek-v2-lite": "deepseek-v2-lite",
    "deepseek-ai/deepseek-v2-lite-chat": "deepseek-v2-lite",
}


def shape_config(shape: str) -> dict[str, Any]:
    """config.json of a manifest shape (a copy), with the fp8 quantization it ships with."""
    if shape not in SHAPES:
        raise ValueError(f"unknown model shape {shape!r}; known: {', '.join(SHAPES)}")
    preset, fp8 = SHAPES[shape]
    cfg = json.loads(json.dumps(PRESETS[preset]))
    if fp8:
        cfg["quantization_config"] = dict(FP8_QUANTIZATION_CONFIG)
    return cfg


def shape_for_model_id(model_id: str) -> str | None:
    return KNOWN_MODEL_IDS.get(model_id.strip().lower())


def planned_model_config(shape: str | None, config: Mapping[str, Any], name: str,
                         source_preset: str | None = None) -> ModelConfig | None:
    """The model a manifest describes: ``config`` (config.json fields) on top of ``shape``, or
    the shape its name or checkpoint preset implies; None when nothing tells. Raises
    ConfigError naming the field that does not make a valid config.json."""
    shape = shape or shape_for_model_id(name) or (source_preset if source_preset in SHAPES
                                                  else None)
    if shape is None and not config:
        return None
    base = shape_config(shape) if shape else {}
    try:
        return ModelConfig.from_dict({**base, **config})
    except (TypeError, ValueError, KeyError, IndexError) as exc:  # a field of the wrong kind
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(f"not a usable config.json: {exc!r}") from None


assert set(get_args(ModelShape)) == set(SHAPES), "ModelShape and SHAPES list the same names"
