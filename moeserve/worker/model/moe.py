"""DeepSeek Mixture-of-Experts: gate (routing), routed experts, shared experts."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moeserve.common.model_config import ModelConfig
from moeserve.worker.model.layers import MLP

__all__ = ["Gate", "Experts", "MoE", "route"]


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
    if c.topk_method in ("group_limited_greedy", "noaux_tc") and c.n_group > 1:
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

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = F.linear(x.float(), self.weight)
        bias = self.e_score_correction_bias
        return route(logits, self.config, None if bias is None else bias.float())


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

    def forward(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """x: [T, H]; weights/ids: [T, k] with ids in local slot numbering (-1 = not here).

        Token copies are sorted by expert, run through both projections as grouped GEMMs
        (one launch each, whatever the number of experts) and summed back with their weights.
        """
        if self.use_kernels and x.is_cuda:
            from moeserve import kernels  # imports triton: only on the CUDA path

            return kernels.fused_moe(x, self.w13, self.w2, weights, ids)
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.expert_parallel is not None:
            return self.expert_parallel.forward(self, x)
        weights, ids = self.gate(x)
        out = self.experts(x, weights, ids)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        return out
