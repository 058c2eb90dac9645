"""DeepSeek-V2 / V2-Lite / V3 / R1 for causal LM, in checkpoint order and naming.

Module paths equal the HuggingFace tensor names (`model.layers.3.self_attn.kv_b_proj.weight`),
so loading is a lookup by name; only the routed experts are stacked (see `Experts`).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Generator, Iterable

import torch
from torch import nn

from moeserve.common.errors import CheckpointError, ConfigError
from moeserve.common.model_config import ModelConfig
from moeserve.worker.model.attention_metadata import AttentionMetadata
from moeserve.worker.model.forward_context import (
    ForwardContext,
    KernelBackend,
    Stages,
    run_stages,
)
from moeserve.worker.model.fp8_linear import FP8_DTYPE, check_block_supported
from moeserve.worker.model.layers import MLP, RMSNorm
from moeserve.worker.model.mla import MLAttention
from moeserve.worker.model.moe import MoE, fp8_experts_supported
from moeserve.worker.model.rotary import RotaryEmbedding

__all__ = ["DecoderLayer", "DeepseekModel", "DeepseekForCausalLM"]

_EXPERT = re.compile(
    r"^(model\.layers\.\d+\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)"
    r"\.(weight|weight_scale_inv)$"
)
_LAYER = re.compile(r"^model\.layers\.(\d+)\.")
# Stacked expert parameters -> the per-expert checkpoint tensors they hold.
_EXPERT_PARAMS = {"w13": "weight", "w2": "weight", "w13_scale": "weight_scale_inv",
                  "w2_scale": "weight_scale_inv"}

logger = logging.getLogger(__name__)


class DecoderLayer(nn.Module):
    """One decoder layer, the only definition of its forward: eager steps, CUDA graph capture
    and DBO micro-batches all run `stages` (see DeepseekForCausalLM.stages)."""

    def __init__(self, config: ModelConfig, layer_idx: int, mla_impl: str, fp8: bool = False):
        super().__init__()
        self.layer_idx = layer_idx
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = MLAttention(config, impl=mla_impl, fp8=fp8)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        if config.is_moe_layer(layer_idx):
            self.mlp: nn.Module = MoE(config, fp8=fp8)
        else:
            self.mlp = MLP(config.hidden_size, config.intermediate_size,
                           fp8_block=config.fp8_block_size if fp8 else None)

    def stages(self, x: torch.Tensor, residual: torch.Tensor | None, ctx: ForwardContext
               ) -> Generator[None, None, tuple[torch.Tensor, torch.Tensor]]:  # fmt: skip
        """(x, residual) -> (mlp output, residual): the residual stream is carried beside the
        layer output so each add happens inside the next RMSNorm (one kernel on the triton
        backend). The first layer gets residual None; the sum x + residual is the usual
        hidden state. Yields while an expert-parallel all-to-all is in flight."""
        if residual is None:
            residual, h = x, self.input_layernorm(x)
        else:
            h, residual = self.input_layernorm(x, residual)
        if ctx.meta is not None:  # an idle EP rank's empty batch has no attention to run
            h = self.self_attn(h, ctx.positions, ctx.rotary, ctx.layer_cache(self.layer_idx),
                               ctx.meta)
        h, residual = self.post_attention_layernorm(h, residual)
        if isinstance(self.mlp, MoE):
            return (yield from self.mlp.stages(h)), residual
        return self.mlp(h), residual


class DeepseekModel(nn.Module):
    def __init__(self, config: ModelConfig, mla_impl: str, fp8: bool = False):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            DecoderLayer(config, i, mla_impl, fp8) for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class DeepseekForCausalLM(nn.Module):
    """``fp8``: an fp8 checkpoint's projections, dense MLPs and experts stay float8_e4m3fn
    with their block scales (W8A8 GEMMs); embeddings, norms, router gate, lm_head and
    kv_b_proj (see MLAttention) are in the default dtype. Without it an fp8 checkpoint is
    dequantized at load (the exact path)."""

    def __init__(self, config: ModelConfig, mla_impl: str = "absorbed", max_positions: int = 0,
                 fp8: bool = False):
        super().__init__()
        if fp8:
            if config.fp8_block_size is None:
                raise ConfigError("fp8 weights need an fp8 checkpoint (config.json has no "
                                  "quantization_config)")
            check_block_supported(config.fp8_block_size)
            if config.n_routed_experts and not fp8_experts_supported(config):
                logger.info(
                    "routed experts dequantized at load: moe_intermediate_size %d is not a "
                    "multiple of the fp8 block's %d rows, so a scale row of the stacked gate "
                    "and up weights would straddle both", config.moe_intermediate_size,
                    config.fp8_block_size[0])
        self.config = config
        self.fp8 = fp8
        self.model = DeepseekModel(config, mla_impl, fp8)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.rotary = RotaryEmbedding(
            config.qk_rope_head_dim,
            config.rope,
            max_positions or config.max_position_embeddings,
            interleave=config.rope_interleave,
        )

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
        backend: KernelBackend = "torch",
    ) -> torch.Tensor:
        """input_ids/positions: [T]; kv_cache: [num_blocks, num_layers, block_size, kv_dim].

        Returns final hidden states [T, hidden]; `compute_logits` turns chosen rows into logits.
        backend "triton" runs attention, routing, experts, norms and fp8 GEMMs through
        moeserve.kernels where they can (`kernels_on`); call `fuse_weights` first.
        """
        ctx = ForwardContext(positions, kv_cache, meta, self.rotary)
        return run_stages([self.stages(input_ids, ctx)], backend)[0]

    def stages(self, input_ids: torch.Tensor, ctx: ForwardContext) -> Stages:
        """The forward of one batch as a generator (the one layer loop): run alone by
        `forward`, interleaved with a second micro-batch's by dual-batch overlap."""
        x, residual = self.model.embed_tokens(input_ids), None
        for layer in self.model.layers:
            x, residual = yield from layer.stages(x, residual, ctx)
        if residual is None:  # no layers
            return self.model.norm(x)
        return self.model.norm(x, residual)[0]

    def fuse_weights(self) -> None:
        """Merge weights for fewer launches per step on the triton backend (call it after
        loading): both input projections of attention into one GEMM, the shared experts into
        the fused-MoE launch, fp8 gate and up into one GEMM. The merged layouts compute the
        same function on either backend."""
        for layer in self.model.layers:
            layer.self_attn.fuse_input_projections()
            if isinstance(layer.mlp, MoE):
                layer.mlp.fuse_shared_experts()
                if layer.mlp.shared_experts is not None:
                    layer.mlp.shared_experts.fuse_gate_up()
            else:
                layer.mlp.fuse_gate_up()

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [N, hidden] -> float32 logits [N, vocab]."""
        return self.lm_head(hidden).float()

    def load_weights(self, tensors: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Copy checkpoint tensors in by name; returns the names of the parameters filled.

        Tensors of layers past num_hidden_layers (the V3 multi-token-prediction layer) are
        skipped; an unknown name or a shape mismatch is a CheckpointError naming the tensor.
        """
        params = dict(self.named_parameters())
        filled: set[str] = set()
        for name, tensor in tensors:
            layer = _LAYER.match(name)
            if layer and int(layer.group(1)) >= self.config.num_hidden_layers:
                continue
            expert = _EXPERT.match(name)
            if expert:
                prefix, idx, proj, kind = expert.groups()
                experts = self.get_submodule(prefix)
                part = proj if kind == "weight" else f"{proj}.{kind}"
                try:
                    want = experts.expert_tensor_shape(part)
                except KeyError:
                    raise CheckpointError(f"checkpoint tensor {name!r} matches no model "
                                          "parameter (experts are not fp8 here)") from None
                _check_tensor(name, tensor, want, experts.w13.dtype if kind == "weight"
                              else torch.float32)
                if experts.load_expert_weight(int(idx), part, tensor):
                    filled.add(name)
                continue
            if name.endswith("rotary_emb.inv_freq"):
                continue
            param = params.get(name)
            if param is None:
                raise CheckpointError(f"checkpoint tensor {name!r} matches no model parameter")
            _check_tensor(name, tensor, tuple(param.shape), param.dtype)
            param.data.copy_(tensor)
            filled.add(name)
        return filled

    def keeps_fp8(self, name: str) -> bool:
        """Whether checkpoint tensor `name` (an fp8 weight) is loaded as stored, with its
        scale; the loader dequantizes the others. Layers past num_hidden_layers (V3's
        multi-token-prediction layer) are skipped by load_weights: passed through as is."""
        layer = _LAYER.match(name)
        if layer and int(layer.group(1)) >= self.config.num_hidden_layers:
            return True
        expert = _EXPERT.match(name)
        if expert:
            return self.get_submodule(expert.group(1)).fp8_block is not None
        param = self._params().get(name)
        return param is not None and param.dtype == FP8_DTYPE

    def _params(self) -> dict[str, torch.nn.Parameter]:
        return dict(self.named_parameters())

    def expected_tensor_names(self) -> set[str]:
        """Every tensor name a complete checkpoint must provide for this rank."""
        names = set()
        for name, _ in self.named_parameters():
            prefix, _, leaf = name.rpartition(".")
            if prefix.endswith(".experts") and leaf in _EXPERT_PARAMS:
                experts = self.get_submodule(prefix)
                for g in experts.expert_ids:
                    for proj in ("gate_proj", "up_proj", "down_proj"):
                        names.add(f"{prefix}.{g}.{proj}.{_EXPERT_PARAMS[leaf]}")
            elif not (name == "lm_head.weight" and self.config.tie_word_embeddings):
                names.add(name)
        return names


def _check_tensor(name: str, tensor: torch.Tensor, shape: tuple[int, ...],
                  dtype: torch.dtype) -> None:
    """Shape, and fp8-ness both ways: a copy into an fp8 parameter would round a wider
    tensor to e4m3 with no scale, a copy out of one would drop its scale."""
    if tuple(tensor.shape) != tuple(shape):
        raise CheckpointError(f"checkpoint tensor {name!r} has shape {tuple(tensor.shape)}, "
                              f"model expects {tuple(shape)}")
    if (tensor.dtype == FP8_DTYPE) != (dtype == FP8_DTYPE):
        raise CheckpointError(
            f"checkpoint tensor {name!r} is {str(tensor.dtype).removeprefix('torch.')} where "
            f"the model holds {str(dtype).removeprefix('torch.')}: an fp8 checkpoint must "
            "quantize every projection and expert weight (with its weight_scale_inv)")
