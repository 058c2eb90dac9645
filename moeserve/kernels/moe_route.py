"""DeepSeek MoE routing (scores, group-limited selection, top-k, normalise, scale) in one launch.

`moe.route` is about six small torch launches per MoE layer; at decode batch sizes each costs
more in launch overhead than in work, so the whole gate epilogue runs here as one program per
token. Shared experts are appended as extra columns (ids E, E+1, ...; weight 1.0) so the
fused-MoE kernel can run them in the same launch as the routed ones.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moeserve.common.model_config import ModelConfig
from moeserve.ops import append_shared, route

__all__ = ["route_topk", "route_topk_ref", "moe_route_kernel"]

# Group modes of the kernel: none, V2 (group score = max), V3 (group score = sum of top 2).
_NO_GROUPS, _GROUP_MAX, _GROUP_TOP2 = 0, 1, 2


@triton.jit
def moe_route_kernel(
    logits_ptr, bias_ptr, weights_ptr, ids_ptr, stride_l, n_experts, n_group, group_size,
    scaling,
    K: tl.constexpr, NUM_SHARED: tl.constexpr, TOPK_GROUP: tl.constexpr,
    SIGMOID: tl.constexpr, HAS_BIAS: tl.constexpr, GROUP_MODE: tl.constexpr,
    RENORM: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_GS: tl.constexpr, BLOCK_OUT: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    g = tl.arange(0, BLOCK_G)[:, None]
    e = g * group_size + tl.arange(0, BLOCK_GS)[None, :]
    valid = (g < n_group) & (tl.arange(0, BLOCK_GS)[None, :] < group_size)
    x = tl.load(logits_ptr + row * stride_l + e, mask=valid, other=float("-inf"))
    if SIGMOID:
        scores = tl.sigmoid(x)
    else:
        p = tl.exp(x - tl.max(tl.max(x, 1), 0))  # padding: exp(-inf) = 0
        scores = p / tl.sum(tl.sum(p, 1), 0)
    scores = tl.where(valid, scores, 0.0)
    choice = scores
    if HAS_BIAS:
        choice += tl.load(bias_ptr + e, mask=valid, other=0.0)
    choice = tl.where(valid, choice, float("-inf"))

    if GROUP_MODE != 0:
        best = tl.max(choice, 1)
        if GROUP_MODE == 2:
            # Knock out one copy of the max only, so a tie counts twice like torch.topk(2).
            first = tl.argmax(choice, 1)
            cols = tl.arange(0, BLOCK_GS)[None, :]
            best += tl.max(tl.where(cols == first[:, None], float("-inf"), choice), 1)
        gidx = tl.arange(0, BLOCK_G)
        keep = gidx < 0
        for _ in tl.static_range(TOPK_GROUP):
            win = tl.argmax(best, 0)
            keep = keep | (gidx == win)
            best = tl.where(gidx == win, float("-inf"), best)
        # V2 zeroes the losing groups; V3 uses -inf because its biased scores can be < 0.
        fill = float("-inf") if GROUP_MODE == 2 else 0.0
        choice = tl.where(keep[:, None], choice, tl.where(valid, fill, float("-inf")))

    flat_choice = tl.reshape(choice, [BLOCK_G * BLOCK_GS])
    flat_scores = tl.reshape(scores, [BLOCK_G * BLOCK_GS])
    flat_e = tl.reshape(e, [BLOCK_G * BLOCK_GS])
    pos = tl.arange(0, BLOCK_G * BLOCK_GS)
    col = tl.arange(0, BLOCK_OUT)
    routed = col < K
    out_w = tl.where(routed, 0.0, 1.0)
    out_id = n_experts + col - K  # the shared experts' columns
    for i in tl.static_range(K):
        pick = tl.argmax(flat_choice, 0)
        hit = pos == pick
        out_w = tl.where(col == i, tl.sum(tl.where(hit, flat_scores, 0.0), 0), out_w)
        out_id = tl.where(col == i, tl.sum(tl.where(hit, flat_e, 0), 0), out_id)
        flat_choice = tl.where(hit, float("-inf"), flat_choice)

    if RENORM:
        w = out_w / (tl.sum(tl.where(routed, out_w, 0.0), 0) + 1e-20)
        if SIGMOID:  # route() scales softmax weights only when it does not renormalise
            w = w * scaling
    else:
        w = out_w * scaling
    out_w = tl.where(routed, w, out_w)
    width = K + NUM_SHARED
    tl.store(weights_ptr + row * width + col, out_w, mask=col < width)
    tl.store(ids_ptr + row * width + col, out_id.to(ids_ptr.dtype.element_ty), mask=col < width)


def _check(logits: torch.Tensor, config: ModelConfig, bias: torch.Tensor | None,
           num_shared: int) -> bool:
    """Validate the arguments; True when route() would take its group-limited path."""
    if logits.dim() != 2 or logits.dtype != torch.float32:
        raise ValueError(f"logits must be a 2-D float32 tensor [T, E]; got shape "
                         f"{tuple(logits.shape)} dtype {logits.dtype}")
    n = logits.shape[1]
    if n != config.n_routed_experts:
        raise ValueError(f"logits have {n} experts but config.n_routed_experts is "
                         f"{config.n_routed_experts}")
    if bias is not None and tuple(bias.shape) != (n,):
        raise ValueError(f"correction_bias must have shape ({n},); got {tuple(bias.shape)}")
    if config.scoring_func not in ("softmax", "sigmoid"):
        raise ValueError(f"unsupported scoring_func {config.scoring_func!r}")
    if not 1 <= config.num_experts_per_tok <= n or num_shared < 0:
        raise ValueError(f"need 1 <= num_experts_per_tok <= {n} and num_shared >= 0; got "
                         f"{config.num_experts_per_tok} and {num_shared}")
    grouped = config.group_limited_routing
    if grouped and n % config.n_group:
        raise ValueError(f"{n} experts are not divisible by n_group={config.n_group}")
    if grouped and not 1 <= config.topk_group <= config.n_group:
        raise ValueError(f"topk_group={config.topk_group} must be in 1..n_group="
                         f"{config.n_group}")
    return grouped


def route_topk(
    logits: torch.Tensor,
    config: ModelConfig,
    correction_bias: torch.Tensor | None = None,
    num_shared: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [T, E] float32 -> (weights [T, k + num_shared] float32, ids int64, same shape).

    Columns 0..k-1 hold the experts `moe.route` picks (same set, any order) with its weights;
    columns k.. hold the shared experts as ids E, E+1, ... with weight 1.0 (MoE adds them
    unscaled).
    """
    grouped = _check(logits, config, correction_bias, num_shared)
    tokens, n = logits.shape
    k = config.num_experts_per_tok
    weights = logits.new_empty(tokens, k + num_shared)
    ids = torch.empty(tokens, k + num_shared, dtype=torch.int64, device=logits.device)
    if tokens == 0:
        return weights, ids
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    # Ungrouped configs (V2-Lite's greedy) use one "group" so n_group need not divide E.
    n_group = config.n_group if grouped else 1
    group_size = n // n_group
    bias = correction_bias.float().contiguous() if correction_bias is not None else logits
    mode = _NO_GROUPS if not grouped else (
        _GROUP_TOP2 if config.topk_method == "noaux_tc" else _GROUP_MAX)
    block_g, block_gs = triton.next_power_of_2(n_group), triton.next_power_of_2(group_size)
    moe_route_kernel[(tokens,)](
        logits, bias, weights, ids, logits.stride(0), n, n_group, group_size,
        float(config.routed_scaling_factor),
        K=k, NUM_SHARED=num_shared, TOPK_GROUP=config.topk_group if grouped else 1,
        SIGMOID=config.scoring_func == "sigmoid", HAS_BIAS=correction_bias is not None,
        GROUP_MODE=mode, RENORM=config.norm_topk_prob and k > 1,
        BLOCK_G=block_g, BLOCK_GS=block_gs, BLOCK_OUT=triton.next_power_of_2(k + num_shared),
        # A warp reduces a few hundred experts in registers; more warps would add shared-memory
        # round trips to each of the k sequential argmaxes.
        num_warps=1 if block_g * block_gs <= 512 else 4,
    )
    return weights, ids


def route_topk_ref(
    logits: torch.Tensor,
    config: ModelConfig,
    correction_bias: torch.Tensor | None = None,
    num_shared: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain-torch `route_topk`: `ops.route` with the shared-expert columns appended."""
    _check(logits, config, correction_bias, num_shared)
    weights, ids = route(logits, config, correction_bias)
    return append_shared(weights, ids, logits.shape[1], num_shared)
