"""Rotary position embedding with DeepSeek's YaRN scaling."""

from __future__ import annotations

import math

import torch

from moeserve.common.model_config import RopeConfig
from moeserve.ops import rotate

__all__ = ["RotaryEmbedding", "rotate"]


def _yarn_inv_freq(rope: RopeConfig, dim: int) -> torch.Tensor:
    def correction_dim(num_rotations: float) -> float:
        orig = rope.original_max_position_embeddings
        return dim * math.log(orig / (num_rotations * 2 * math.pi)) / (2 * math.log(rope.theta))

    low = max(math.floor(correction_dim(rope.beta_fast)), 0)
    high = min(math.ceil(correction_dim(rope.beta_slow)), dim - 1)
    if low == high:
        high += 0.001  # the ramp below would divide by zero
    pos_freqs = rope.theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    extrapolation = 1.0 / pos_freqs
    interpolation = 1.0 / (rope.factor * pos_freqs)
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    keep_extrapolated = 1 - ramp
    return interpolation * (1 - keep_extrapolated) + extrapolation * keep_extrapolated


class RotaryEmbedding(torch.nn.Module):
    """Rotates the last `dim` features of q/k by position (see `rotate` for interleave)."""

    def __init__(self, dim: int, rope: RopeConfig, max_positions: int, interleave: bool = True):
        super().__init__()
        self.dim = dim
        self.interleave = interleave
        if rope.type == "yarn":
            inv_freq = _yarn_inv_freq(rope, dim)
        else:
            inv_freq = 1.0 / (rope.theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
        freqs = torch.outer(torch.arange(max_positions, dtype=torch.float32), inv_freq)
        scale = rope.attention_factor
        self.register_buffer("cos_cache", freqs.cos() * scale, persistent=False)
        self.register_buffer("sin_cache", freqs.sin() * scale, persistent=False)

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """x: [T, ..., dim] (any heads in between); positions: [T] int64."""
        return rotate(x, self.cos_cache[positions], self.sin_cache[positions], self.interleave)
