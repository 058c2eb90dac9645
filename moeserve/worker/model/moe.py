"""DeepSeek Mixture-of-Experts: gate (routing), routed experts, shared experts."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moeserve.common.model_config import ModelConfig
from moeserve.ops import append_shared, route
from moeserve.worker.model.forward_context import Stages, kernels_on
from moeserve.worker.model.fp8_linear import (
    FP8_DTYPE,
    Fp8Linear,
    dequantize_blocks,
    quant_dequant_groups,
    scale_shape,
    w8a8_linear,
)
from moeserve.worker.model.layers import MLP

__all__ = ["Gate", "Experts", "MoE", "route", "append_shared", "fp8_experts_supported"]


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

    def forward(self, x: torch.Tensor, num_shared: int = 0
                ) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        """(weights, ids) [T, k + num_shared]: the routed experts `route` picks, then
        `num_shared` shared-expert slots (see `append_shared`)."""
        logits = F.linear(x.float(), self.weight)
        bias = self.e_score_correction_bias
        bias = None if bias is None else bias.float()
        if kernels_on(x):
            from moeserve import kernels  # imports triton: only on the kernel path

            return kernels.route_topk(logits, self.config, bias, num_shared)
        weights, ids = route(logits, self.config, bias)
        return append_shared(weights, ids, self.config.n_routed_experts, num_shared)


class Experts(nn.Module):
    """The routed experts this rank holds, stacked so kernels can run them as one grouped GEMM.

    w13: [E_local, 2 * I, H] (gate rows then up rows); w2: [E_local, H, I]. Checkpoint tensors
    `experts.{e}.{gate,up,down}_proj.weight` load into slices (see `load_expert_weight`).
    `expert_ids[e]` is the logical expert held in local slot e.

    With ``fp8_block`` (bn, bk) the weights stay float8_e4m3fn with float32 block scales
    w13_scale [E, 2I / bn, ceil(H / bk)] and w2_scale [E, ceil(H / bn), ceil(I / bk)]
    (`experts.{e}.*.weight_scale_inv`), which needs I % bn == 0: a scale row of the stacked
    w13 must not straddle gate and up (`fp8_experts_supported`).
    """

    def __init__(self, config: ModelConfig, expert_ids: list[int] | None = None,
                 fp8_block: tuple[int, int] | None = None):
        super().__init__()
        ids = list(range(config.n_routed_experts)) if expert_ids is None else expert_ids
        inter, hidden = config.moe_intermediate_size, config.hidden_size
        self.intermediate_size = inter
        self.fp8_block = fp8_block
        dtype = FP8_DTYPE if fp8_block else None
        self.w13 = nn.Parameter(torch.empty(len(ids), 2 * inter, hidden, dtype=dtype),
                                requires_grad=False)
        self.w2 = nn.Parameter(torch.empty(len(ids), hidden, inter, dtype=dtype),
                               requires_grad=False)
        self.w13_scale: nn.Parameter | None = None
        self.w2_scale: nn.Parameter | None = None
        if fp8_block:
            self.w13_scale = nn.Parameter(torch.empty(
                len(ids), *scale_shape(2 * inter, hidden, fp8_block), dtype=torch.float32),
                requires_grad=False)
            self.w2_scale = nn.Parameter(torch.empty(
                len(ids), *scale_shape(hidden, inter, fp8_block), dtype=torch.float32),
                requires_grad=False)
        self.expert_ids = list(ids)
        self.num_logical_experts = config.n_routed_experts
        self.local_slot = {g: i for i, g in enumerate(ids)}
        # Shared experts stacked after the routed ones by MoE.fuse_shared_experts.
        self.num_shared_slots = 0

    def stacked(self) -> dict[str, nn.Parameter]:
        """The tensors held per local slot (dim 0): w13, w2 and, fp8, their block scales.
        What EPLB moves when an expert changes rank: a weight without its scales would be
        read with another expert's."""
        names = ("w13", "w2") + (("w13_scale", "w2_scale") if self.fp8_block else ())
        return {name: getattr(self, name) for name in names}

    def set_placement(self, expert_ids: list[int],
                      tensors: dict[str, torch.Tensor] | None = None) -> None:
        """Hold `expert_ids` (EPLB may list an expert twice) with the given stacked tensors
        (every one of `stacked`, slot-major), or uninitialised ones to be loaded from the
        checkpoint."""
        n = len(expert_ids)
        for name, param in self.stacked().items():
            param.data = (tensors[name] if tensors is not None
                          else param.data.new_empty(n, *param.shape[1:]))
        self.expert_ids = list(expert_ids)
        self.local_slot = {}
        for i, g in enumerate(expert_ids):
            self.local_slot.setdefault(g, i)

    def load_expert_weight(self, expert: int, proj: str, tensor: torch.Tensor) -> bool:
        """Copy one checkpoint tensor into its slice(s); False when this rank does not hold it.
        `proj` is gate_proj / up_proj / down_proj, or the same with ".weight_scale_inv"."""
        slots = [i for i, g in enumerate(self.expert_ids) if g == expert]
        if not slots:
            return False
        proj, _, kind = proj.partition(".")
        is_scale = kind == "weight_scale_inv"
        w13, w2 = (self.w13_scale, self.w2_scale) if is_scale else (self.w13, self.w2)
        if w13 is None:
            raise KeyError(f"{proj}.{kind}")
        rows = w13.shape[1] // 2  # gate / up split of w13 (in scale rows for scales)
        for slot in slots:
            if proj == "gate_proj":
                w13.data[slot, :rows].copy_(tensor)
            elif proj == "up_proj":
                w13.data[slot, rows:].copy_(tensor)
            elif proj == "down_proj":
                w2.data[slot].copy_(tensor)
            else:
                raise KeyError(proj)
        return True

    def expert_tensor_shape(self, proj: str) -> tuple[int, ...]:
        """Shape one checkpoint tensor `{proj}.weight` / `{proj}.weight_scale_inv` must have."""
        proj, _, kind = proj.partition(".")
        src = (self.w13_scale, self.w2_scale) if kind == "weight_scale_inv" else (self.w13,
                                                                                   self.w2)
        if src[0] is None:
            raise KeyError(f"{proj}.{kind}")
        if proj == "down_proj":
            return tuple(src[1].shape[1:])
        return (src[0].shape[1] // 2, src[0].shape[2])

    def shared_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The stacked shared experts (slots past the routed ones) as one dense SwiGLU MLP."""
        n, inter = self.num_logical_experts, self.intermediate_size
        shared, hidden = self.num_shared_slots, x.shape[1]
        if self.fp8_block:
            h = _fp8_linear(x, self.w13[n:].reshape(-1, hidden),
                            self.w13_scale[n:].reshape(-1, self.w13_scale.shape[2]),
                            self.fp8_block)
            h = h.view(-1, shared, 2, inter)
            act = F.silu(h[:, :, 0]) * h[:, :, 1]
            out = _fp8_linear(act[:, 0].contiguous(), self.w2[n], self.w2_scale[n],
                              self.fp8_block)
            for s in range(1, shared):
                out = out + _fp8_linear(act[:, s].contiguous(), self.w2[n + s],
                                        self.w2_scale[n + s], self.fp8_block)
            return out
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
        fp8: activations quantized per token and group of bk channels before each projection
        (in the kernel on CUDA; here quantized and dequantized, the weight dequantized).
        """
        if kernels_on(x):
            from moeserve import kernels  # imports triton: only on the kernel path

            if self.fp8_block:
                return kernels.fused_moe(x, self.w13, self.w2, weights, ids,
                                         num_shared=num_shared, w13_scale=self.w13_scale,
                                         w2_scale=self.w2_scale, block_shape=self.fp8_block)
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
        if self.fp8_block:
            h = _grouped_linear_fp8(x[tokens], self.w13, self.w13_scale, counts, self.fp8_block)
        else:
            h = _grouped_linear(x[tokens], self.w13, counts)
        h = F.silu(h[:, : self.intermediate_size]) * h[:, self.intermediate_size :]
        if self.fp8_block:
            y = _grouped_linear_fp8(h, self.w2, self.w2_scale, counts, self.fp8_block).float()
        else:
            y = _grouped_linear(h, self.w2, counts).float()
        y = y * weights.flatten()[order, None]
        out = torch.zeros_like(x, dtype=torch.float32).index_add_(0, tokens, y)
        return out.to(x.dtype)


def fp8_experts_supported(config: ModelConfig) -> bool:
    """Whether routed experts can stay fp8: each scale row of the stacked [gate; up] must lie
    within gate or within up (V3: moe_intermediate_size 2048 of 128-row blocks)."""
    block = config.fp8_block_size
    return block is not None and config.moe_intermediate_size % block[0] == 0


def _fp8_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                block: tuple[int, int]) -> torch.Tensor:
    """x [M, K] @ dequant(weight [N, K])^T in x's dtype: the fp8 GEMM kernel on the kernel
    path, the same W8A8 arithmetic in torch elsewhere."""
    if kernels_on(x):
        from moeserve import kernels

        return kernels.fp8_gemm(x, weight, scale, x.dtype, block)
    return w8a8_linear(x, weight, scale, block).to(x.dtype)


def _grouped_linear_fp8(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor,
                        counts: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """`_grouped_linear` over fp8 experts (scales [E, N / bn, K / bk]): activations quantized
    per token and group, one expert's weight dequantized at a time (never the whole stack:
    V3's is 30 GB in float32)."""
    xq = quant_dequant_groups(x, block[1])
    out = x.new_empty(x.shape[0], w.shape[1])
    start = 0
    for g, n in enumerate(counts.tolist()):
        if n:
            wg = dequantize_blocks(w[g], scale[g], block)
            out[start : start + n] = (xq[start : start + n] @ wg.T).to(x.dtype)
            start += n
    return out


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
    """``fp8``: shared experts keep the checkpoint's fp8 weights, routed experts too where
    `fp8_experts_supported` (else they are dequantized at load); the gate stays as shipped."""

    def __init__(self, config: ModelConfig, fp8: bool = False):
        super().__init__()
        block = config.fp8_block_size if fp8 else None
        self.gate = Gate(config)
        self.experts = Experts(config, fp8_block=block if fp8_experts_supported(config)
                               and fp8 else None)
        self.shared_experts = (
            MLP(config.hidden_size, config.moe_intermediate_size * config.n_shared_experts,
                fp8_block=block)
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
        fp8 = isinstance(mlp.gate_proj, Fp8Linear)
        if fp8 != (experts.fp8_block is not None):
            return  # fp8 shared experts beside dequantized routed ones: no common layout
        if fp8 and shared > 1 and inter % experts.fp8_block[1]:
            return  # a down_proj scale column would straddle two shared experts
        gate_up = torch.cat([mlp.gate_proj.weight.data.view(shared, inter, hidden),
                             mlp.up_proj.weight.data.view(shared, inter, hidden)], dim=1)
        down = mlp.down_proj.weight.data.view(hidden, shared, inter).transpose(0, 1)
        if fp8:  # the scales stack like the weights, in blocks (inter % bn == 0 for fp8)
            gs, us, ds = (p.weight_scale_inv.data for p in (mlp.gate_proj, mlp.up_proj,
                                                            mlp.down_proj))
            scale_gate_up = torch.cat([gs.view(shared, -1, gs.shape[1]),
                                       us.view(shared, -1, us.shape[1])], dim=1)
            scale_down = ds.view(ds.shape[0], shared, -1).transpose(0, 1)
            experts.w13_scale.data = torch.cat([experts.w13_scale.data[:n], scale_gate_up])
            experts.w2_scale.data = torch.cat([experts.w2_scale.data[:n], scale_down])
        experts.w13.data = torch.cat([experts.w13.data[:n], gate_up])
        experts.w2.data = torch.cat([experts.w2.data[:n], down])
        experts.num_shared_slots = shared
        self.shared_experts = None

    def stages(self, x: torch.Tensor) -> Stages:
        """`forward` as a generator: with expert parallelism it yields while its all-to-all
        is in flight (so DBO can run the other micro-batch meanwhile); else it never yields."""
        if self.expert_parallel is not None:
            return (yield from self.expert_parallel.stages(self, x))
        return self(x)

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
