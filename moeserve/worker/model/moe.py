"""DeepSeek Mixture-of-Experts: gate (routing), routed experts, shared experts."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moeserve.common.model_config import ModelConfig
from moeserve.worker.model.layers import MLP, kernels_run_on

__all__ = ["Gate", "Experts", "MoE", "route", "append_shared"]


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


class Gate(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        n = config.n_routed_experts
        # float32 as in transformers (and DeepSeek's reference): routing decisions are
        # sensitive to the gate's precision, and a bf16 copy would be cast every step anyway
        self.weight = nn.Parameter(torch.empty(n, config.hidden_size, dtype=torch.float32))
        if config.topk_method == "noaux_tc":
            # float32 like the released checkpoints: it only shifts selection, by small amounts
            self.e_score_correction_bias = nn.Parameter(
                torch.zeros(n, dtype=torch.float32), requires_grad=False
            )
        else:
            self.e_score_correction_bias = None
        self.use_kernels = False  # set by the runner: routing in one Triton launch

    def forward(self, x: torch.Tensor, num_shared: int = 0
                ) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        """(weights, ids) [T, k + num_shared]: the routed experts `route` picks, then
        `num_shared` shared-expert slots (see `append_shared`)."""
        logits = F.linear(x.float(), self.weight)
        bias = self.e_score_correction_bias
        bias = None if bias is None else bias.float()
        if self.use_kernels and kernels_run_on(x):
            from moeserve import kernels  # imports triton: only on the kernel path

            return kernels.route_topk(logits, self.config, bias, num_shared)
        weights, ids = route(logits, self.config, bias)
        return append_shared(weights, ids, self.config.n_routed_experts, num_shared)


class Experts(nn.Module):
    """The routed experts this rank holds, stacked so kernels can run them as one grouped GEMM.

    w13: [E_local, 2 * I, H] (gate rows then up rows); w2: [E_local, H, I]. Checkpoint tensors
    `experts.{e}.{gate,up,down}_proj.weight` load into slices (see `load_expert_weight`).
    `expert_ids[e]` is the logical expert held in local slot e.
    """

    def __init__(self, config: ModelConfig, expert_ids: list[int] | None = None):
        super().__init__()
        ids = list(range(config.n_routed_experts)) if expert_ids is None else expert_ids
        inter, hidden = config.moe_intermediate_size, config.hidden_size
        self.intermediate_size = inter
        self.w13 = nn.Parameter(torch.empty(len(ids), 2 * inter, hidden))
        self.w2 = nn.Parameter(torch.empty(len(ids), hidden, inter))
        self.expert_ids = list(ids)
        self.num_logical_experts = config.n_routed_experts
        self.use_kernels = False  # set by the runner (EngineConfig.kernel_backend)
        self.local_slot = {g: i for i, g in enumerate(ids)}
        # Shared experts stacked after the routed ones by MoE.fuse_shared_experts.
        self.num_shared_slots = 0

    def set_placement(self, expert_ids: list[int], w13: torch.Tensor | None = None,
                      w2: torch.Tensor | None = None) -> None:
        """Hold `expert_ids` (EPLB may list an expert twice) with the given stacked weights, or
        uninitialised ones to be loaded from the checkpoint."""
        n = len(expert_ids)
        self.w13.data = w13 if w13 is not None else self.w13.data.new_empty(
            n, *self.w13.shape[1:])
        self.w2.data = w2 if w2 is not None else self.w2.data.new_empty(n, *self.w2.shape[1:])
        self.expert_ids = list(expert_ids)
        self.local_slot = {}
        for i, g in enumerate(expert_ids):
            self.local_slot.setdefault(g, i)

    def load_expert_weight(self, expert: int, proj: str, tensor: torch.Tensor) -> bool:
        """Copy one checkpoint tensor into its slice(s); False when this rank does not hold it."""
        slots = [i for i, g in enumerate(self.expert_ids) if g == expert]
        if not slots:
            return False
        inter = self.intermediate_size
        for slot in slots:
            if proj == "gate_proj":
                self.w13.data[slot, :inter].copy_(tensor)
            elif proj == "up_proj":
                self.w13.data[slot, inter:].copy_(tensor)
            elif proj == "down_proj":
                self.w2.data[slot].copy_(tensor)
            else:
                raise KeyError(proj)
        return True

    def shared_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The stacked shared experts (slots past the routed ones) as one dense SwiGLU MLP."""
        n, inter = self.num_logical_experts, self.intermediate_size
        shared, hidden = self.num_shared_slots, x.shape[1]
        h = F.linear(x, self.w13[n:].reshape(-1, hidden)).view(-1, shared, 2, inter)
        act = (F.silu(h[:, :, 0]) * h[:, :, 1]).flatten(1)
        # [shared, H, I] -> [H, shared * I]: a copy of two experts' down weights, ~1% of the
        # GEMM's time at prefill sizes
        down = self.w2[n:].transpose(0, 1).reshape(hidden, -1)
        return F.linear(act, down)

    def forward(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor,
                num_shared: int = 0) -> torch.Tensor:
        """x: [T, H]; weights/ids: [T, k] with ids in local slot numbering (-1 = not here);
        num_shared: the last columns are the stacked shared experts (`append_shared`).

        Token copies are sorted by expert, run through both projections as grouped GEMMs
        (one launch each, whatever the number of experts) and summed back with their weights.
        """
        if self.use_kernels and kernels_run_on(x):
            from moeserve import kernels  # imports triton: only on the kernel path

            return kernels.fused_moe(x, self.w13, self.w2, weights, ids, num_shared=num_shared)
        top_k = ids.shape[1]
        flat_ids = ids.flatten()
        order = flat_ids.argsort(stable=True)
        if len(self.expert_ids) < self.num_logical_experts:  # expert-parallel: skip the -1s
            order = order[int((flat_ids < 0).sum()) :]
        # index_add rather than bincount: bincount reads the max id back to the host, which
        # would stall every step and cannot be captured in a CUDA graph.
        sorted_ids = flat_ids[order]
        counts = torch.zeros(self.w13.shape[0], dtype=torch.int64, device=x.device)
        counts.index_add_(0, sorted_ids, torch.ones_like(sorted_ids))
        tokens = order // top_k
        h = _grouped_linear(x[tokens], self.w13, counts)
        h = F.silu(h[:, : self.intermediate_size]) * h[:, self.intermediate_size :]
        y = _grouped_linear(h, self.w2, counts).float() * weights.flatten()[order, None]
        out = torch.zeros_like(x, dtype=torch.float32).index_add_(0, tokens, y)
        return out.to(x.dtype)


def _grouped_linear(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Rows of x sorted by group (counts[g] rows for group g) times w[g]^T: [N, K] -> [N, O]."""
    if _GROUPED_MM is not None and x.dtype == w.dtype:
        offsets = counts.cumsum(0).to(torch.int32)
        try:
            return _GROUPED_MM(x, w.transpose(1, 2), offs=offsets)
        except RuntimeError:  # shape or dtype this build's kernel does not take
            pass
    out = x.new_empty(x.shape[0], w.shape[1])
    start = 0
    for g, n in enumerate(counts.tolist()):
        if n:
            out[start : start + n] = F.linear(x[start : start + n], w[g])
            start += n
    return out


# torch's grouped GEMM (CUTLASS on Hopper, a reference loop on the CPU) where this build has it.
_GROUPED_MM = getattr(torch, "_grouped_mm", None)


# Batches of at least this many tokens run stacked shared experts as dense GEMMs.
SHARED_APART_MIN_TOKENS = 1024


class MoE(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.gate = Gate(config)
        self.experts = Experts(config)
        self.shared_experts = (
            MLP(config.hidden_size, config.moe_intermediate_size * config.n_shared_experts)
            if config.n_shared_experts
            else None
        )
        # Set by use_expert_parallel (moeserve.worker.parallel) when experts span ranks.
        self.expert_parallel = None
        self.layer_index = -1

    def use_expert_parallel(self, expert_parallel, layer_index: int) -> None:
        """Route tokens through `expert_parallel` (an ExpertParallel) as MoE layer
        `layer_index`; it decides which experts this rank keeps."""
        self.expert_parallel = expert_parallel
        self.layer_index = layer_index

    def fuse_shared_experts(self) -> None:
        """Stack the shared experts after the routed ones (each shared expert's slice of the
        shared MLP is an expert of moe_intermediate_size), so one fused-MoE launch runs both:
        ~5 launches fewer per layer and step. Not with expert parallelism, whose dispatch
        moves routed experts only."""
        mlp, experts = self.shared_experts, self.experts
        if mlp is None or self.expert_parallel is not None:
            return
        n, (hidden, inter) = experts.num_logical_experts, experts.w2.shape[1:]
        shared = mlp.gate_proj.weight.shape[0] // inter
        gate_up = torch.cat([mlp.gate_proj.weight.data.view(shared, inter, hidden),
                             mlp.up_proj.weight.data.view(shared, inter, hidden)], dim=1)
        down = mlp.down_proj.weight.data.view(hidden, shared, inter).transpose(0, 1)
        experts.w13.data = torch.cat([experts.w13.data[:n], gate_up])
        experts.w2.data = torch.cat([experts.w2.data[:n], down])
        experts.num_shared_slots = shared
        self.shared_experts = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.expert_parallel is not None:
            return self.expert_parallel.forward(self, x)
        shared = self.experts.num_shared_slots
        if shared and x.shape[0] >= SHARED_APART_MIN_TOKENS:
            # Prefill-sized: the shared experts are one dense GEMM pair each (cuBLAS beats the
            # grouped Triton kernel there); launch counts only matter for decode.
            return self.experts(x, *self.gate(x)) + self.experts.shared_forward(x)
        weights, ids = self.gate(x, shared)
        out = self.experts(x, weights, ids, shared)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        return out
