"""Read a HuggingFace checkpoint directory's safetensors shards into the model."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from moeserve.common.errors import CheckpointError
from moeserve.common.progress import track
from moeserve.worker.model.fp8_linear import FP8_DTYPE, dequantize_blocks, scale_shape

__all__ = ["checkpoint_shards", "iterate_tensors", "dequantize_fp8_blocks", "load_checkpoint"]

_SCALE_SUFFIX = "_scale_inv"
# Set on each EP rank process (worker/parallel/group.py ENV_LOCAL_RANK); not imported from there
# because that module pulls in torch.distributed.
_ENV_LOCAL_RANK = "MOESERVE_LOCAL_RANK"

logger = logging.getLogger(__name__)


def checkpoint_shards(model_dir: str | Path) -> tuple[list[Path], dict[str, str]]:
    """Shard files and the tensor -> shard map; a shard the index names must exist."""
    root = Path(model_dir)
    index = root / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index} is not a valid safetensors index: {e}") from e
        names = sorted(set(weight_map.values()))
        missing = [n for n in names if not (root / n).is_file()]
        if missing:
            raise CheckpointError(
                f"checkpoint shard {missing[0]!r} listed in {index.name} is missing from {root}"
                + (f" ({len(missing)} shards missing)" if len(missing) > 1 else "")
            )
        return [root / n for n in names], weight_map
    single = root / "model.safetensors"
    if single.is_file():
        return [single], {}
    raise CheckpointError(f"no model.safetensors or model.safetensors.index.json in {root}")


def dequantize_fp8_blocks(weight: torch.Tensor, scale_inv: torch.Tensor,
                          block_size: tuple[int, int]) -> torch.Tensor:
    """fp8 weight [N, K] with per-block scales [ceil(N/bn), ceil(K/bk)] -> float32 [N, K].

    (bn, bk) = block_size, config.json's quantization_config.weight_block_size: never
    inferred from the shapes, which cannot tell a partial last block from smaller blocks."""
    return dequantize_blocks(weight, scale_inv, block_size)


def iterate_tensors(
    model_dir: str | Path,
    block_size: tuple[int, int] | None = None,
    keep_fp8: Callable[[str], bool] | None = None,
    device: torch.device | str | None = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) for every weight of the checkpoint.

    fp8 weights (float8_e4m3fn with `<name>_scale_inv`) need `block_size`, the config's
    weight_block_size; each scale's shape is checked against it. Those for which
    `keep_fp8(name)` holds come as stored, each followed by its scale (float32); the others
    dequantized (float32, on `device` when given: a GPU does it faster than the host).
    Conversion to each parameter's dtype happens in the copy into it, so float32 parameters
    (the routing bias) keep a float32 checkpoint's precision.
    """
    shards, weight_map = checkpoint_shards(model_dir)
    root = Path(model_dir)
    for shard in shards:
        try:
            with safe_open(str(shard), framework="pt") as f:
                keys = set(f.keys())
                for name in sorted(keys):
                    if name.endswith(_SCALE_SUFFIX):
                        weight_name = name[: -len(_SCALE_SUFFIX)]
                        if weight_name not in keys and weight_name not in weight_map:
                            raise CheckpointError(f"scale {name!r} has no weight "
                                                  f"{weight_name!r} in {root}")
                        continue
                    tensor = f.get_tensor(name)
                    scale_name = name + _SCALE_SUFFIX
                    has_scale = scale_name in keys or scale_name in weight_map
                    if not tensor.dtype.is_floating_point or tensor.dtype.itemsize != 1:
                        if has_scale:
                            raise CheckpointError(
                                f"checkpoint tensor {name!r} is {_dtype_name(tensor)} but has "
                                f"a scale {scale_name!r}: only float8_e4m3fn weights are "
                                "block-scaled")
                        yield name, tensor
                        continue
                    if tensor.dtype != FP8_DTYPE:
                        raise CheckpointError(
                            f"checkpoint tensor {name!r} is {_dtype_name(tensor)}; fp8 "
                            "checkpoints must be e4m3 (float8_e4m3fn)")
                    if block_size is None:
                        raise CheckpointError(
                            f"checkpoint tensor {name!r} is float8_e4m3fn but config.json has "
                            "no quantization_config (its weight_block_size says how "
                            f"{scale_name!r} applies)")
                    if not has_scale:
                        raise CheckpointError(f"fp8 tensor {name!r} has no scale {scale_name!r}")
                    if scale_name in keys:
                        scale = f.get_tensor(scale_name)
                    else:
                        scale = _read_one(root / weight_map[scale_name], scale_name)
                    _check_scale(name, tensor, scale, block_size)
                    scale = scale.float()
                    if keep_fp8 is not None and keep_fp8(name):
                        yield name, tensor
                        yield scale_name, scale
                    else:
                        if device is not None:
                            tensor, scale = tensor.to(device), scale.to(device)
                        yield name, dequantize_fp8_blocks(tensor, scale, block_size)
        except SafetensorError as e:
            raise CheckpointError(f"cannot read checkpoint shard {shard.name}: {e}") from e
        except (OSError, RuntimeError) as e:
            raise CheckpointError(f"cannot read checkpoint shard {shard.name}: {e}") from e


def _dtype_name(t: torch.Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


def _check_scale(name: str, weight: torch.Tensor, scale: torch.Tensor,
                 block: tuple[int, int]) -> None:
    """A scale that does not match the weight in the configured blocks is an error naming
    both, never a silently mis-scaled weight."""
    if weight.dim() != 2:
        raise CheckpointError(f"fp8 tensor {name!r} has shape {tuple(weight.shape)}: "
                              "block-scaled weights must be 2-D [rows, columns]")
    want = scale_shape(*weight.shape, block)
    if tuple(scale.shape) != want:
        raise CheckpointError(
            f"scale {name + _SCALE_SUFFIX!r} has shape {tuple(scale.shape)}; weight {name!r} "
            f"{list(weight.shape)} in {block[0]}x{block[1]} blocks "
            f"(quantization_config.weight_block_size) needs {want}")
    if not scale.dtype.is_floating_point or not bool(torch.isfinite(scale).all()):
        raise CheckpointError(f"scale {name + _SCALE_SUFFIX!r} must hold finite floating-point "
                              f"values ({_dtype_name(scale)})")


def _read_one(path: Path, name: str) -> torch.Tensor:
    with safe_open(str(path), framework="pt") as f:
        return f.get_tensor(name)


def load_checkpoint(model: torch.nn.Module, model_dir: str | Path) -> None:
    """Fill every parameter of `model` from the checkpoint; names what is missing."""
    # Every local EP rank reads the same files: one progress report is enough.
    first_rank = os.environ.get(_ENV_LOCAL_RANK, "0") == "0"
    block = model.config.fp8_block_size
    keep_fp8 = getattr(model, "keeps_fp8", None)
    device = next(model.parameters()).device
    tensors = track(iterate_tensors(model_dir, block, keep_fp8, device),
                    _tensor_count(model_dir, keep_fp8), "loading weights",
                    unit="tensor", logger=logger, enabled=first_rank)
    filled = model.load_weights(tensors)
    missing = sorted(model.expected_tensor_names() - filled)
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise CheckpointError(f"checkpoint in {model_dir} lacks tensor {missing[0]!r}{more}")


def _tensor_count(model_dir: str | Path, keep_fp8: Callable[[str], bool] | None = None
                  ) -> int | None:  # fmt: skip
    """Tensors iterate_tensors yields (weights, and the scales of those kept fp8), for the
    progress total; None when the checkpoint cannot be read, which iterate_tensors then
    reports with the reason."""
    try:
        shards, weight_map = checkpoint_shards(model_dir)
        if not weight_map:
            with safe_open(str(shards[0]), framework="pt") as f:
                weight_map = dict.fromkeys(f.keys(), shards[0].name)
    except (CheckpointError, SafetensorError, OSError):
        return None
    def counted(name: str) -> bool:
        if not name.endswith(_SCALE_SUFFIX):
            return True
        return keep_fp8 is not None and keep_fp8(name[: -len(_SCALE_SUFFIX)])

    return sum(counted(name) for name in weight_map)
