"""Tiles of the fused MoE's grouped GEMMs (bf16 and fp8) and the argument shapes both check."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

__all__ = ["MoeConfig", "moe_config", "moe_config_fp8", "fit_shared_memory",
           "SHARED_MEMORY_BUDGET", "check_moe_shapes"]


@dataclass(frozen=True)
class MoeConfig:
    """Tile sizes of one grouped GEMM launch (BLOCK_N is per projection: gate and up each)."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    # N tile of the gated (gate + up) launch; None: block_n // 2 (two accumulators)
    gate_block_n: int | None = None

    def gate_n(self) -> int:
        return self.gate_block_n or max(32, self.block_n // 2)


def moe_config(num_copies: int, num_experts: int) -> MoeConfig:
    """Tiles for H100 (benchmarks/tune_fused_moe.py, V2-Lite sizes, replayed from graphs).

    Decode is weight-bandwidth bound: what matters is that each expert's weights are read
    once, i.e. that one BLOCK_M covers the tokens an expert gets. Routing is often skewed (the
    random V2-Lite checkpoint sends batch 128 to 14 of 64 experts, ~55 tokens each), so from a
    few hundred copies on 64-row tiles are used: 0.116 ms at batch 128 with skewed routing
    against 0.164 ms for 16-row tiles, and within 2% of the best with uniform routing. Large M
    (prefill) is compute bound: 128-wide tiles for tensor-core reuse.
    """
    rows = num_copies / max(num_experts, 1)
    if num_copies < 384:
        return MoeConfig(16, 64, 128, 4, 4)
    if rows <= 64:
        return MoeConfig(64, 128, 128, 4, 4)
    # 8k tokens 2.08 ms (409 TFLOP/s) against 2.53 with 64-row tiles (H100). From ~100 rows
    # an expert on, 256-wide N tiles too (H200, all 64 experts hit): 1k tokens 0.383 ms
    # against 0.393 with 128 x 128, 2k tokens 0.626 against 0.673.
    return MoeConfig(128, 256, 64, 8, 4)



def moe_config_fp8(num_copies: int, num_experts: int, block_k: int = 128) -> MoeConfig:
    """Tiles of the fp8 path (H200, V3 sizes, benchmarks/tune_fused_moe.py --fp8).

    BLOCK_K is the checkpoint's K block (one scale per step). A gated N tile equal to the
    activation group lets the first GEMM quantize h in its epilogue; below a few hundred
    copies a 64-wide one (more programs for 9 experts' weights, h quantized by a separate
    launch) is faster: batch 1 0.129 ms against 0.142 (floor 0.095). Batch 64 / 256: 2.48 /
    3.09 ms, 1.04x / 1.14x the fp8 weight-read floor. The gated launch keeps four [BLOCK_M,
    N] float32 tiles live (two accumulators, two scaled dot results), so 128 x 128 tiles
    spill at 8 warps: 8k tokens take 34 ms with them, 14.8 ms with 64 x 256 (437 TFLOP/s).
    """
    rows = num_copies / max(num_experts, 1)
    if rows <= 32:
        gate_n = 64 if num_copies < 384 else block_k
        return MoeConfig(16, 64, block_k, 4, 4, gate_block_n=gate_n)
    return MoeConfig(64, 256, block_k, 8, 3, gate_block_n=block_k)


# Hopper has 227 KiB of shared memory a block; Triton's pipeline needs a little beside the tiles.
SHARED_MEMORY_BUDGET = 200 * 1024


def fit_shared_memory(cfg: MoeConfig, elem_size: int,
                      budget: int = SHARED_MEMORY_BUDGET) -> MoeConfig:
    """The tiles (tuned for bf16) shrunk until a launch's pipelined tiles fit ``budget``.

    Each stage holds an activation tile [BLOCK_M, BLOCK_K] and weight tiles [BLOCK_K, BLOCK_N]
    (the gated launch splits BLOCK_N between gate and up). float32 weights (the parity tests,
    CPU-made checkpoints) need twice the bytes: fewer stages first, then a shorter BLOCK_K.
    """

    def need(c: MoeConfig) -> int:
        return (c.block_m * c.block_k + c.block_k * c.block_n) * elem_size * c.num_stages

    while need(cfg) > budget and cfg.num_stages > 2:
        cfg = dataclasses.replace(cfg, num_stages=cfg.num_stages - 1)
    while need(cfg) > budget and cfg.block_k > 32:
        cfg = dataclasses.replace(cfg, block_k=cfg.block_k // 2)
    return cfg


def check_moe_shapes(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
                     topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> tuple[int, int]:
    """ValueError naming what does not fit [T, H], [E, 2I, H], [E, H, I] and [T, k] routing;
    returns (T, I)."""
    if x.dim() != 2 or w13.dim() != 3 or w2.dim() != 3:
        raise ValueError(f"x {tuple(x.shape)}, w13 {tuple(w13.shape)}, w2 {tuple(w2.shape)} "
                         "must be [T, H], [E, 2I, H], [E, H, I]")
    num_tokens, hidden = x.shape
    num_experts, two_inter, w13_hidden = w13.shape
    inter = two_inter // 2
    if w13_hidden != hidden or two_inter % 2 or w2.shape != (num_experts, hidden, inter):
        raise ValueError(f"x {tuple(x.shape)}, w13 {tuple(w13.shape)}, w2 {tuple(w2.shape)} "
                         "do not fit [T, H], [E, 2I, H], [E, H, I]")
    if topk_ids.shape != topk_weights.shape or topk_ids.shape[0] != num_tokens:
        raise ValueError(f"topk_ids {tuple(topk_ids.shape)} / topk_weights "
                         f"{tuple(topk_weights.shape)} must both be [{num_tokens}, k]")
    return num_tokens, inter
