"""Plain-torch math the model runs and the Triton kernels are checked against: expert routing
(`route`, `append_shared`) and rotary rotation (`rotate`); and `kernels_run_on`, the model's
test for taking a kernel's path.

It sits below both moeserve.kernels and moeserve.worker.model: a kernel's ``*_ref`` calls it
without knowing the model, and the model calls it without importing Triton (moeserve.kernels'
package imports Triton). Imports torch and moeserve.common only.
"""

from __future__ import annotations

import os

import torch

from moeserve.common.model_config import ModelConfig

__all__ = ["append_shared", "kernels_run_on", "rotate", "route"]


def route(
    logits: torch.Tensor,
    config: ModelConfig,
    correction_bias: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick experts for each token. logits: [T, E] float32.

    Returns (weights [T, k] float32, expert ids [T, k] int64). softmax scoring with greedy or
    group_limited_greedy (V2) or sigmoid scoring with noaux_tc and a score-correction bias
    that steers selection only (V3).
    """
    c = config
    n_experts, k = logits.shape[-1], c.num_experts_per_tok
    if c.scoring_func == "softmax":
        scores = logits.softmax(dim=-1)
    elif c.scoring_func == "sigmoid":
        scores = logits.sigmoid()
    else:
        raise ValueError(f"unsupported scoring_func {c.scoring_func!r}")
    choice = scores if correction_bias is None else scores + correction_bias
    if c.group_limited_routing:
        grouped = choice.view(-1, c.n_group, n_experts // c.n_group)
        if c.topk_method == "noaux_tc":
            group_scores = grouped.topk(2, dim=-1)[0].sum(dim=-1)
        else:
            group_scores = grouped.amax(dim=-1)
        top_groups = group_scores.topk(c.topk_group, dim=-1, sorted=False)[1]
        group_mask = torch.zeros_like(group_scores).scatter_(1, top_groups, 1).bool()
        expert_mask = group_mask.unsqueeze(-1).expand_as(grouped).reshape(-1, n_experts)
        # V2 zeroes masked scores; V3 excludes them with -inf (its biased scores can be < 0).
        fill = float("-inf") if c.topk_method == "noaux_tc" else 0.0
        choice = choice.masked_fill(~expert_mask, fill)
    ids = choice.topk(k, dim=-1, sorted=False)[1]
    weights = scores.gather(1, ids)
    if c.norm_topk_prob and k > 1:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        if c.scoring_func == "sigmoid":
            weights = weights * c.routed_scaling_factor
    else:
        weights = weights * c.routed_scaling_factor
    return weights, ids


def append_shared(weights: torch.Tensor, ids: torch.Tensor, num_experts: int,
                  num_shared: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Routing of the shared experts stacked after the routed ones (slots num_experts...):
    every token takes each of them with weight 1 (MoE adds shared experts unscaled)."""
    if not num_shared:
        return weights, ids
    t = ids.shape[0]
    shared = torch.arange(num_experts, num_experts + num_shared, device=ids.device)
    return (torch.cat([weights, weights.new_ones(t, num_shared)], dim=1),
            torch.cat([ids, shared.to(ids.dtype).expand(t, -1)], dim=1))


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleave: bool
           ) -> torch.Tensor:  # fmt: skip
    """Rotate x [T, ..., dim] by per-token cos/sin [T, dim/2] in float32, back in x's dtype.

    interleave=True rotates adjacent pairs (x0, x1), (x2, x3)... as DeepSeek's checkpoints
    expect; False rotates halves (x_i, x_{i+dim/2}) as NeoX-style checkpoints do.
    """
    shape = (x.shape[0],) + (1,) * (x.dim() - 2) + (cos.shape[-1],)
    cos, sin = cos.view(shape), sin.view(shape)
    xf = x.float()
    if interleave:
        x1, x2 = xf[..., 0::2], xf[..., 1::2]
        out = torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)
    else:
        x1, x2 = xf.chunk(2, dim=-1)
        out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return out.to(x.dtype)


def kernels_run_on(x: torch.Tensor) -> bool:
    """Whether an op of a step on the triton backend (`forward_context.kernels_on`) takes its
    Triton path for x: CUDA tensors, or CPU tensors under Triton's interpreter (how CI
    checks the kernel path of the whole model)."""
    return x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"
