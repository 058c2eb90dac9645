"""DeepSeek-V2 / V2-Lite / V3 / R1 for causal LM, in checkpoint order and naming.

Module paths equal the HuggingFace tensor names (`model.layers.3.self_attn.kv_b_proj.weight`),
so loading is a lookup by name; only the routed experts are stacked (see `Experts`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import torch
from torch import nn

from moeserve.common.errors import CheckpointError
from moeserve.common.model_config import ModelConfig
from moeserve.worker.model.attention_metadata import AttentionMetadata
from moeserve.worker.model.layers import MLP, RMSNorm
from moeserve.worker.model.mla import MLAttention
from moeserve.worker.model.moe import MoE
from moeserve.worker.model.rotary import RotaryEmbedding

__all__ = ["DecoderLayer", "DeepseekModel", "DeepseekForCausalLM"]

_EXPERT = re.compile(
    r"^(model\.layers\.\d+\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$"
)
_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int, mla_impl: str):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = MLAttention(config, impl=mla_impl)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        if config.is_moe_layer(layer_idx):
            self.mlp: nn.Module = MoE(config)
        else:
            self.mlp = MLP(config.hidden_size, config.intermediate_size)

    def forward(self, x, residual, positions, rotary, layer_cache, meta
                ) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        """(x, residual) -> (mlp output, residual): the residual stream is carried beside the
        layer output so each add happens inside the next RMSNorm (one kernel on CUDA). The
        first layer gets residual None; the sum x + residual is the usual hidden state."""
        if residual is None:
            residual, h = x, self.input_layernorm(x)
        else:
            h, residual = self.input_layernorm(x, residual)
        h = self.self_attn(h, positions, rotary, layer_cache, meta)
        h, residual = self.post_attention_layernorm(h, residual)
        return self.mlp(h), residual


class DeepseekModel(nn.Module):
    def __init__(self, config: ModelConfig, mla_impl: str):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            DecoderLayer(config, i, mla_impl) for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class DeepseekForCausalLM(nn.Module):
    def __init__(self, config: ModelConfig, mla_impl: str = "absorbed", max_positions: int = 0):
        super().__init__()
        self.config = config
        self.model = DeepseekModel(config, mla_impl)
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
    ) -> torch.Tensor:
        """input_ids/positions: [T]; kv_cache: [num_blocks, num_layers, block_size, kv_dim].

        Returns final hidden states [T, hidden]; `compute_logits` turns chosen rows into logits.
        """
        x, residual = self.model.embed_tokens(input_ids), None
        for i, layer in enumerate(self.model.layers):
            x, residual = layer(x, residual, positions, self.rotary, kv_cache[:, i], meta)
        return self.model.norm(x, residual)[0]

    def use_kernels(self, enabled: bool) -> None:
        """Route attention, routing and experts through moeserve.kernels on CUDA tensors.

        Enabling also merges weights for fewer launches per step (call it after loading):
        both input projections of attention into one GEMM, the shared experts into the
        fused-MoE launch. The merged layouts compute the same function on either path."""
        for module in self.modules():
            if hasattr(module, "use_kernels") and module is not self:
                module.use_kernels = enabled
        if enabled:
            for layer in self.model.layers:
                layer.self_attn.fuse_input_projections()
                if isinstance(layer.mlp, MoE):
                    layer.mlp.fuse_shared_experts()

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
                prefix, idx, proj = expert.groups()
                experts = self.get_submodule(prefix)
                if experts.load_expert_weight(int(idx), proj, tensor):
                    filled.add(f"{name}")
                continue
            if name.endswith("rotary_emb.inv_freq"):
                continue
            param = params.get(name)
            if param is None:
                raise CheckpointError(f"checkpoint tensor {name!r} matches no model parameter")
            if param.shape != tensor.shape:
                raise CheckpointError(
                    f"checkpoint tensor {name!r} has shape {tuple(tensor.shape)}, "
                    f"model expects {tuple(param.shape)}"
                )
            param.data.copy_(tensor)
            filled.add(name)
        return filled

    def expected_tensor_names(self) -> set[str]:
        """Every tensor name a complete checkpoint must provide for this rank."""
        names = set()
        for name, _ in self.named_parameters():
            if name.endswith(".experts.w13") or name.endswith(".experts.w2"):
                prefix = name.rsplit(".", 1)[0]
                experts = self.get_submodule(prefix)
                for g in experts.expert_ids:
                    for proj in ("gate_proj", "up_proj", "down_proj"):
                        names.add(f"{prefix}.{g}.{proj}.weight")
            elif not (name == "lm_head.weight" and self.config.tie_word_embeddings):
                names.add(name)
        return names
