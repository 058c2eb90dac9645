"""`moeserve make-checkpoint`: random DeepSeek checkpoints in the real HuggingFace layout.

Weights go through exactly the loader a downloaded checkpoint does: config.json in DeepSeek's
release layout, sharded safetensors with model.safetensors.index.json, tokenizer.json and
tokenizer_config.json with a chat template. Each tensor is drawn from a generator seeded by
(seed, tensor name), so output is deterministic and independent of shard order.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from moeserve.common.model_config import ModelConfig
from moeserve.common.model_presets import FP8_QUANTIZATION_CONFIG, PRESETS
from moeserve.common.progress import progress
from moeserve.worker.model.deepseek import DeepseekForCausalLM
from moeserve.worker.tokenizer_files import refresh_tokenizer, write_tokenizer

__all__ = [
    "PRESETS", "preset_config", "make_checkpoint", "random_tensors", "ensure_tiny_checkpoint",
    "default_cache_dir", "checkpoint_tensors", "write_checkpoint",
]

logger = logging.getLogger(__name__)


def preset_config(
    preset: str, layers: int | None = None, experts: int | None = None, dtype: str = "bfloat16"
) -> dict[str, Any]:
    """config.json contents for a preset, optionally with fewer layers or routed experts."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    cfg = json.loads(json.dumps(PRESETS[preset]))
    if layers is not None:
        if layers < 1:
            raise ValueError(f"--layers must be >= 1, got {layers}")
        cfg["num_hidden_layers"] = layers
        cfg["first_k_dense_replace"] = min(cfg["first_k_dense_replace"], max(layers - 1, 0))
    if experts is not None:
        if experts < cfg["num_experts_per_tok"] or experts % cfg["n_group"]:
            raise ValueError(
                f"--experts {experts} must be >= num_experts_per_tok "
                f"({cfg['num_experts_per_tok']}) and divisible by n_group ({cfg['n_group']})"
            )
        cfg["n_routed_experts"] = experts
    cfg["torch_dtype"] = dtype
    return cfg


def _tensor_shapes(config: ModelConfig) -> Iterator[tuple[str, tuple[int, ...]]]:
    with torch.device("meta"):
        model = DeepseekForCausalLM(config, max_positions=1)
    params = dict(model.named_parameters())
    for name in sorted(model.expected_tensor_names()):
        if name in params:
            yield name, tuple(params[name].shape)
        else:  # a per-expert tensor of the stacked experts
            prefix, proj = name.rsplit(".", 3)[0], name.split(".")[-2]
            experts = model.get_submodule(prefix)
            inter, hidden = experts.intermediate_size, config.hidden_size
            yield name, (hidden, inter) if proj == "down_proj" else (inter, hidden)


def _generator(seed: int, name: str, device: str) -> torch.Generator:
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return torch.Generator(device=device).manual_seed(int.from_bytes(digest[:8], "big") >> 1)


def random_tensors(
    config: ModelConfig, seed: int, device: str = "cpu"
) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, float32 tensor) for every weight of a random model of `config`."""
    for name, shape in _tensor_shapes(config):
        g = _generator(seed, name, device)
        if name.endswith("norm.weight"):
            t = 1.0 + 0.1 * torch.randn(shape, generator=g, device=device)
        elif name.endswith("e_score_correction_bias"):
            t = 0.1 * torch.randn(shape, generator=g, device=device)
        elif name.endswith("embed_tokens.weight"):
            t = torch.randn(shape, generator=g, device=device)
        else:  # 1/sqrt(fan_in) keeps activations O(1) so attention is not uniform
            t = torch.randn(shape, generator=g, device=device) * shape[-1] ** -0.5
        yield name, t


def _quantize_fp8(w: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    n, k = w.shape
    bn, bk = block
    pad = torch.zeros(-(-n // bn) * bn, -(-k // bk) * bk, device=w.device)
    pad[:n, :k] = w
    tiles = pad.view(pad.shape[0] // bn, bn, pad.shape[1] // bk, bk)
    amax = tiles.abs().amax(dim=(1, 3)).clamp(min=1e-12)
    scale_inv = amax / torch.finfo(torch.float8_e4m3fn).max
    q = (tiles / scale_inv[:, None, :, None]).view_as(pad)[:n, :k]
    return q.to(torch.float8_e4m3fn), scale_inv.float()


def _is_fp8_target(name: str, t: torch.Tensor) -> bool:
    skip = ("embed_tokens", "lm_head", "norm", "mlp.gate.")
    return t.dim() == 2 and name.endswith(".weight") and not any(s in name for s in skip)


def checkpoint_tensors(name: str, t: torch.Tensor, dtype: torch.dtype,
                       fp8: bool) -> dict[str, torch.Tensor]:
    """What a checkpoint stores for weight `name`: with `fp8`, the tensors DeepSeek-V3's
    release quantizes (projection, dense MLP and expert weights) as float8_e4m3fn with float32
    `weight_scale_inv` per block of FP8_QUANTIZATION_CONFIG's size; everything else (and every
    tensor without `fp8`) in `dtype`, except the router's `e_score_correction_bias`, which
    DeepSeek-V3/R1 ship in float32 (a bf16 copy moves expert choices near ties)."""
    if name.endswith("e_score_correction_bias"):
        return {name: t.float()}
    if fp8 and _is_fp8_target(name, t):
        block = FP8_QUANTIZATION_CONFIG["weight_block_size"]
        q, s = _quantize_fp8(t.float(), (block[0], block[1]))
        return {name: q, name + "_scale_inv": s}
    return {name: t.to(dtype)}


def make_checkpoint(
    out_dir: str | Path,
    preset: str = "tiny",
    *,
    layers: int | None = None,
    experts: int | None = None,
    dtype: str = "bfloat16",
    fp8: bool = False,
    seed: int = 0,
    shard_bytes: int = 2 << 30,
    device: str = "cpu",
    config_layout: str = "deepseek",
) -> Path:
    """Write a random checkpoint to `out_dir`; returns the directory."""
    cfg = preset_config(preset, layers, experts, dtype)
    if fp8:
        cfg["quantization_config"] = dict(FP8_QUANTIZATION_CONFIG)
    out = write_checkpoint(out_dir, cfg, random_tensors(ModelConfig.from_dict(cfg), seed, device),
                           shard_bytes=shard_bytes, config_layout=config_layout)
    write_tokenizer(out, vocab_size=cfg["vocab_size"], bos_id=cfg["bos_token_id"],
                    eos_id=cfg["eos_token_id"])
    return out


def write_checkpoint(
    out_dir: str | Path,
    cfg: dict[str, Any],
    tensors: Iterable[tuple[str, torch.Tensor]],
    *,
    shard_bytes: int = 2 << 30,
    config_layout: str = "deepseek",
) -> Path:
    """Write (name, float tensor) weights of the model `cfg` (config.json contents) in the
    HuggingFace layout: fp8 as `checkpoint_tensors` stores them when `cfg` has a
    quantization_config, the rest in cfg["torch_dtype"]; safetensors shards with their index
    and config.json (no tokenizer). Returns the directory."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = ModelConfig.from_dict(cfg)
    fp8 = cfg.get("quantization_config") is not None
    torch_dtype = getattr(torch, cfg.get("torch_dtype") or "bfloat16")
    weight_map: dict[str, str] = {}
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    # Counted in parameters: one embedding of V3 weighs as much as a thousand norms.
    params = sum(math.prod(shape) for _, shape in _tensor_shapes(config))
    with progress(params, "drawing weights", unit="param", unit_scale=True,
                  logger=logger) as bar:  # fmt: skip
        for name, t in tensors:
            group = checkpoint_tensors(name, t, torch_dtype, fp8)
            nbytes = sum(v.numel() * v.element_size() for v in group.values())
            if size and size + nbytes > shard_bytes:
                shards.append({})
                size = 0
            shards[-1].update({k: v.cpu().contiguous() for k, v in group.items()})
            size += nbytes
            bar.update(t.numel())
    total = sum(v.numel() * v.element_size() for shard in shards for v in shard.values())
    with progress(total, f"writing {out}", unit="B", unit_scale=True, logger=logger) as bar:
        for i, shard in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(out / fname), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(shard, fname))
            bar.update(sum(v.numel() * v.element_size() for v in shard.values()))
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (out / "config.json").write_text(json.dumps(_layout(cfg, config_layout), indent=2))
    return out


def _layout(cfg: dict[str, Any], layout: str) -> dict[str, Any]:
    """DeepSeek's release layout, or transformers 5's `rope_parameters` layout."""
    if layout == "deepseek":
        return cfg
    if layout != "transformers":
        raise ValueError(f"config layout must be deepseek or transformers, got {layout!r}")
    cfg = dict(cfg)
    scaling = dict(cfg.pop("rope_scaling") or {})
    kind = scaling.pop("type", "default")
    cfg["rope_parameters"] = {"rope_type": kind, "rope_theta": cfg.pop("rope_theta"), **scaling}
    return cfg


def default_cache_dir() -> Path:
    """Where `moeserve up` and `moeserve generate` keep the embedded tiny model."""
    base = os.environ.get("MOESERVE_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "moeserve"
    )
    return Path(base)


def ensure_tiny_checkpoint(cache_dir: Path | None = None) -> Path:
    """The tiny random checkpoint, created once; written to a temp dir then renamed so that
    concurrent callers never see a half-written checkpoint."""
    target = (cache_dir or default_cache_dir()) / "tiny-deepseek-v3"
    if (target / "config.json").is_file():
        refresh_tokenizer(target)  # cached by an older moeserve: today's tokens and template
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tiny-", dir=target.parent))
    make_checkpoint(tmp, "tiny", dtype="float32")
    try:
        tmp.rename(target)
    except OSError:  # another process won the race
        shutil.rmtree(tmp, ignore_errors=True)
    return target
