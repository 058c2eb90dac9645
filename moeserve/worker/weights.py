"""Read a HuggingFace checkpoint directory's safetensors shards into the model."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from moeserve.common.errors import CheckpointError
from moeserve.common.progress import track

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


def dequantize_fp8_blocks(weight: torch.Tensor, scale_inv: torch.Tensor) -> torch.Tensor:
    """fp8 weight [N, K] with per-block scales [ceil(N/bn), ceil(K/bk)] -> float32 [N, K]."""
    n, k = weight.shape
    bn = -(-n // scale_inv.shape[0])
    bk = -(-k // scale_inv.shape[1])
    scale = scale_inv.float().repeat_interleave(bn, 0)[:n].repeat_interleave(bk, 1)[:, :k]
    return weight.float() * scale


def iterate_tensors(model_dir: str | Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) for every weight as stored; fp8 blocks come dequantized (float32).

    Conversion to each parameter's dtype happens in the copy into it, so float32 parameters
    (the routing bias) keep a float32 checkpoint's precision.
    """
    shards, weight_map = checkpoint_shards(model_dir)
    root = Path(model_dir)
    for shard in shards:
        try:
            with safe_open(str(shard), framework="pt") as f:
                for name in f.keys():
                    if name.endswith(_SCALE_SUFFIX):
                        continue
                    tensor = f.get_tensor(name)
                    if tensor.dtype == torch.float8_e4m3fn:
                        scale_name = name + _SCALE_SUFFIX
                        if scale_name in f.keys():
                            scale = f.get_tensor(scale_name)
                        elif scale_name in weight_map:
                            scale = _read_one(root / weight_map[scale_name], scale_name)
                        else:
                            raise CheckpointError(f"fp8 tensor {name!r} has no {scale_name!r}")
                        tensor = dequantize_fp8_blocks(tensor, scale)
                    yield name, tensor
        except SafetensorError as e:
            raise CheckpointError(f"cannot read checkpoint shard {shard.name}: {e}") from e
        except (OSError, RuntimeError) as e:
            raise CheckpointError(f"cannot read checkpoint shard {shard.name}: {e}") from e


def _read_one(path: Path, name: str) -> torch.Tensor:
    with safe_open(str(path), framework="pt") as f:
        return f.get_tensor(name)


def load_checkpoint(model: torch.nn.Module, model_dir: str | Path) -> None:
    """Fill every parameter of `model` from the checkpoint; names what is missing."""
    # Every local EP rank reads the same files: one progress report is enough.
    first_rank = os.environ.get(_ENV_LOCAL_RANK, "0") == "0"
    tensors = track(iterate_tensors(model_dir), _tensor_count(model_dir), "loading weights",
                    unit="tensor", logger=logger, enabled=first_rank)
    filled = model.load_weights(tensors)
    missing = sorted(model.expected_tensor_names() - filled)
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise CheckpointError(f"checkpoint in {model_dir} lacks tensor {missing[0]!r}{more}")


def _tensor_count(model_dir: str | Path) -> int | None:
    """Weights in the checkpoint (scales not counted), for the progress total; None when the
    checkpoint cannot be read, which iterate_tensors then reports with the reason."""
    try:
        shards, weight_map = checkpoint_shards(model_dir)
        if not weight_map:
            with safe_open(str(shards[0]), framework="pt") as f:
                weight_map = dict.fromkeys(f.keys(), shards[0].name)
    except (CheckpointError, SafetensorError, OSError):
        return None
    return sum(not name.endswith(_SCALE_SUFFIX) for name in weight_map)
