"""Typed view of a DeepSeek checkpoint's config.json.

Two layouts exist in the wild: DeepSeek's releases (`rope_theta` + `rope_scaling` with `type`)
and what transformers 5 writes (`rope_parameters` with `rope_type` and `rope_theta`). Both are
read into one `ModelConfig`; nothing else in moeserve parses config.json.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moeserve.common.errors import ConfigError

__all__ = ["ModelConfig", "RopeConfig", "SUPPORTED_ARCHITECTURES", "load_model_config"]

SUPPORTED_ARCHITECTURES = ("DeepseekV2ForCausalLM", "DeepseekV3ForCausalLM")
_REQUIRED = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "kv_lora_rank",
    "qk_nope_head_dim",
    "qk_rope_head_dim",
    "v_head_dim",
    "rms_norm_eps",
    "max_position_embeddings",
)
_INT_FIELDS = _REQUIRED[:-2] + ("max_position_embeddings",)


@dataclass(frozen=True)
class RopeConfig:
    """RoPE parameters; `type` is "default" or "yarn"."""

    theta: float = 10000.0
    type: str = "default"
    factor: float = 1.0
    original_max_position_embeddings: int = 4096
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 0.0

    @property
    def attention_factor(self) -> float:
        """Scale on cos/sin (YaRN's mscale ratio); 1 for default RoPE."""
        if self.type != "yarn":
            return 1.0
        return self.yarn_get_mscale(self.factor, self.mscale) / self.yarn_get_mscale(
            self.factor, self.mscale_all_dim
        )

    @staticmethod
    def yarn_get_mscale(scale: float, mscale: float = 1.0) -> float:
        if scale <= 1:
            return 1.0
        return 0.1 * mscale * math.log(scale) + 1.0


@dataclass(frozen=True)
class ModelConfig:
    """Every config.json field the engine uses, with the DeepSeek defaults per architecture."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    q_lora_rank: int | None = None
    moe_intermediate_size: int = 0
    n_routed_experts: int | None = None
    n_shared_experts: int = 0
    num_experts_per_tok: int = 0
    first_k_dense_replace: int = 0
    moe_layer_freq: int = 1
    n_group: int = 1
    topk_group: int = 1
    topk_method: str = "greedy"
    scoring_func: str = "softmax"
    norm_topk_prob: bool = False
    routed_scaling_factor: float = 1.0
    rope: RopeConfig = field(default_factory=RopeConfig)
    rope_interleave: bool = True
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    torch_dtype: str = "bfloat16"
    # (rows, columns) of one weight_scale_inv block of an fp8 checkpoint; None: not fp8
    fp8_block_size: tuple[int, int] | None = None
    attention_bias: bool = False
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def kv_dim(self) -> int:
        """Width of one cached latent vector: compressed KV plus the shared rotary key."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    @property
    def softmax_scale(self) -> float:
        scale = self.qk_head_dim**-0.5
        if self.rope.type == "yarn" and self.rope.mscale_all_dim:
            m = RopeConfig.yarn_get_mscale(self.rope.factor, self.rope.mscale_all_dim)
            scale *= m * m
        return scale

    @property
    def group_limited_routing(self) -> bool:
        """Whether routing first keeps the best topk_group of n_group expert groups (V2's
        group_limited_greedy, V3's noaux_tc) before picking the top-k experts."""
        return self.topk_method in ("group_limited_greedy", "noaux_tc") and self.n_group > 1

    @property
    def eos_token_id(self) -> int | None:
        return self.eos_token_ids[0] if self.eos_token_ids else None

    def is_moe_layer(self, layer_idx: int) -> bool:
        return (
            self.n_routed_experts is not None
            and layer_idx >= self.first_k_dense_replace
            and layer_idx % self.moe_layer_freq == 0
        )

    @classmethod
    def from_dict(cls, cfg: dict[str, Any]) -> ModelConfig:
        archs = cfg.get("architectures") or []
        arch = archs[0] if archs else _arch_from_model_type(cfg.get("model_type"))
        if arch not in SUPPORTED_ARCHITECTURES:
            raise ConfigError(
                f"unsupported architecture {arch!r} in config.json field 'architectures'; "
                f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        for name in _REQUIRED:
            if cfg.get(name) is None:
                raise ConfigError(f"config.json is missing required field {name!r}")
        for name in _INT_FIELDS:
            _check_int(cfg, name, minimum=1)
        _check_optional_types(cfg)
        is_v3 = arch == "DeepseekV3ForCausalLM"
        n_experts = cfg.get("n_routed_experts")
        if n_experts is not None:
            for name in ("moe_intermediate_size", "num_experts_per_tok"):
                if cfg.get(name) is None:
                    raise ConfigError(f"config.json is missing required MoE field {name!r}")
                _check_int(cfg, name, minimum=1)
        n_group = cfg.get("n_group") or 1
        if n_experts is not None and n_experts % n_group:
            raise ConfigError(f"n_routed_experts={n_experts} is not divisible by n_group={n_group}")
        eos = cfg.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
        fp8_block = _parse_quantization(cfg.get("quantization_config"))
        return cls(
            architecture=arch,
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_hidden_layers=cfg["num_hidden_layers"],
            num_attention_heads=cfg["num_attention_heads"],
            kv_lora_rank=cfg["kv_lora_rank"],
            qk_nope_head_dim=cfg["qk_nope_head_dim"],
            qk_rope_head_dim=cfg["qk_rope_head_dim"],
            v_head_dim=cfg["v_head_dim"],
            rms_norm_eps=float(cfg["rms_norm_eps"]),
            max_position_embeddings=cfg["max_position_embeddings"],
            q_lora_rank=cfg.get("q_lora_rank"),
            moe_intermediate_size=cfg.get("moe_intermediate_size") or 0,
            n_routed_experts=n_experts,
            n_shared_experts=cfg.get("n_shared_experts") or 0,
            num_experts_per_tok=cfg.get("num_experts_per_tok") or 0,
            first_k_dense_replace=cfg.get("first_k_dense_replace") or 0,
            moe_layer_freq=cfg.get("moe_layer_freq") or 1,
            n_group=n_group,
            topk_group=cfg.get("topk_group") or 1,
            topk_method=cfg.get("topk_method") or ("noaux_tc" if is_v3 else "greedy"),
            scoring_func=cfg.get("scoring_func") or ("sigmoid" if is_v3 else "softmax"),
            norm_topk_prob=bool(cfg.get("norm_topk_prob", is_v3)),
            routed_scaling_factor=float(cfg.get("routed_scaling_factor") or 1.0),
            rope=_parse_rope(cfg),
            rope_interleave=bool(cfg.get("rope_interleave", True)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=eos_ids,
            torch_dtype=str(cfg.get("torch_dtype") or cfg.get("dtype") or "bfloat16"),
            fp8_block_size=fp8_block,
            attention_bias=bool(cfg.get("attention_bias", False)),
            raw=cfg,
        )


def _parse_quantization(quant: dict[str, Any] | None) -> tuple[int, int] | None:
    """The fp8 weight block (bn, bk) of `quantization_config`, None without one.

    Only DeepSeek's block-scaled fp8 is served: quant_method "fp8", fmt "e4m3" (DeepSeek's
    releases write it; transformers' fine-grained fp8 configs leave it out) and an explicit
    weight_block_size. Without a block size the scales' shapes cannot be read unambiguously
    (a [576, 7168] weight with 5 x 56 scales could have 116-row or 128-row blocks), and the
    per-tensor fp8 layout that omits it is not served."""
    if not quant:
        return None
    method = quant.get("quant_method")
    if method != "fp8":
        raise ConfigError(f"config.json field 'quantization_config.quant_method' is {method!r}: "
                          "only block-scaled 'fp8' checkpoints are served")
    fmt = quant.get("fmt", "e4m3")
    if fmt != "e4m3":
        raise ConfigError(f"config.json field 'quantization_config.fmt' is {fmt!r}: fp8 "
                          "weights must be e4m3 (float8_e4m3fn)")
    block = quant.get("weight_block_size")
    if block is None:
        raise ConfigError("config.json field 'quantization_config.weight_block_size' is "
                          "missing: block-scaled fp8 needs its [rows, columns] block size "
                          "(DeepSeek-V3/R1: [128, 128]); per-tensor fp8 is not served")
    if (not isinstance(block, list | tuple) or len(block) != 2
            or not all(isinstance(b, int) and not isinstance(b, bool) and b > 0
                       for b in block)):  # fmt: skip
        raise ConfigError("config.json field 'quantization_config.weight_block_size' must be "
                          f"two positive integers [rows, columns], got {block!r}")
    return int(block[0]), int(block[1])


def _arch_from_model_type(model_type: str | None) -> str | None:
    return {"deepseek_v2": "DeepseekV2ForCausalLM", "deepseek_v3": "DeepseekV3ForCausalLM"}.get(
        model_type or ""
    )


def _check_int(cfg: dict[str, Any], name: str, minimum: int) -> None:
    value = cfg[name]
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(
            f"config.json field {name!r} must be an integer >= {minimum}, got {value!r}"
        )


# Optional fields by the JSON type they must have when present (null means "use the default").
_OPTIONAL_INTS = ("q_lora_rank", "moe_intermediate_size", "n_routed_experts", "n_shared_experts",
                  "num_experts_per_tok", "first_k_dense_replace", "moe_layer_freq", "n_group",
                  "topk_group", "bos_token_id", "original_max_position_embeddings")
_NUMBERS = ("rms_norm_eps", "routed_scaling_factor", "rope_theta")
_STRINGS = ("topk_method", "scoring_func", "torch_dtype", "dtype", "model_type")
_OBJECTS = ("rope_scaling", "rope_parameters", "quantization_config")
_ROPE_NUMBERS = ("rope_theta", "factor", "original_max_position_embeddings", "beta_fast",
                 "beta_slow", "mscale", "mscale_all_dim")


def _check_optional_types(cfg: dict[str, Any]) -> None:
    """Wrong JSON types are named here, before a conversion deep inside fails anonymously."""

    def bad(name: str, want: str) -> ConfigError:
        return ConfigError(f"config.json field {name!r} must be {want}, got {cfg[name]!r}")

    def is_int(v: object) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    for name in _OPTIONAL_INTS:
        if cfg.get(name) is not None and not (is_int(cfg[name]) and cfg[name] >= 0):
            raise bad(name, "an integer >= 0")
    for name in _NUMBERS:
        v = cfg.get(name)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int | float)
                              or v != v or v in (float("inf"), float("-inf"))):  # fmt: skip
            raise bad(name, "a finite number")
    for name in _STRINGS:
        if cfg.get(name) is not None and not isinstance(cfg[name], str):
            raise bad(name, "a string")
    for name in _OBJECTS:
        if cfg.get(name) is not None and not isinstance(cfg[name], dict):
            raise bad(name, "an object")
    eos = cfg.get("eos_token_id")
    if eos is not None and not (is_int(eos) or (isinstance(eos, list)
                                                and all(is_int(e) for e in eos))):  # fmt: skip
        raise bad("eos_token_id", "an integer or a list of integers")
    for name in ("rope_scaling", "rope_parameters"):
        for key in _ROPE_NUMBERS:
            value = (cfg.get(name) or {}).get(key)
            if value is not None and (isinstance(value, bool)
                                      or not isinstance(value, int | float)):  # fmt: skip
                raise ConfigError(f"config.json field '{name}.{key}' must be a number, "
                                  f"got {value!r}")  # fmt: skip


def _parse_rope(cfg: dict[str, Any]) -> RopeConfig:
    params = cfg.get("rope_parameters")
    if params is None:  # DeepSeek release layout
        params = dict(cfg.get("rope_scaling") or {})
        if params.get("rope_theta") is None:  # null in config.json means "unset", as in HF
            params["rope_theta"] = cfg.get("rope_theta")
    if params.get("rope_theta") is None:
        params = {**params, "rope_theta": 10000.0}
    kind = params.get("rope_type") or params.get("type") or "default"
    if kind not in ("default", "yarn"):
        raise ConfigError(f"unsupported RoPE type {kind!r} in rope_scaling: use default or yarn")
    if kind == "default":
        return RopeConfig(theta=float(params["rope_theta"]))
    orig = params.get("original_max_position_embeddings")
    if orig is None:
        raise ConfigError("yarn RoPE needs rope_scaling.original_max_position_embeddings")
    if not orig > 0:
        raise ConfigError("config.json field 'rope_scaling.original_max_position_embeddings' "
                          f"must be positive, got {orig!r}")
    factor = params.get("factor") or cfg["max_position_embeddings"] / orig
    return RopeConfig(
        theta=float(params["rope_theta"]),
        type="yarn",
        factor=float(factor),
        original_max_position_embeddings=int(orig),
        beta_fast=float(params.get("beta_fast") or 32),
        beta_slow=float(params.get("beta_slow") or 1),
        mscale=float(params.get("mscale") or 1.0),
        mscale_all_dim=float(params.get("mscale_all_dim") or 0.0),
    )


def load_model_config(model_dir: str | Path) -> ModelConfig:
    """Parse `model_dir/config.json`; errors name the file or the field."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise ConfigError(f"no config.json in model directory {str(model_dir)!r}")
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(cfg, dict):
        raise ConfigError(f"{path} must hold a JSON object")
    return ModelConfig.from_dict(cfg)
