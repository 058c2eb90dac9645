"""Which GEMMs of moeserve's plain-torch W8A8 path quantize their activations, and what the
model computes on the way (for benchmarks/fp8_accuracy.py).

`quantized_sites(model, sites)` keeps activation quantization (per token and 128-channel
group, `quant_dequant_groups`) on for the GEMMs of `sites` only and makes it exact elsewhere;
every call is attributed to a site or fails, so no GEMM is missed. `Probe` records each
layer's attention and MLP outputs, the final hidden state and the routed experts chosen.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

import moeserve.worker.model.fp8_linear as fp8_linear
import moeserve.worker.model.moe as moe
from moeserve.worker.model.fp8_linear import Fp8Linear
from moeserve.worker.model.moe import Experts, Gate

__all__ = ["SITES", "site_of", "quantized_sites", "Probe", "routing_flips"]

# Every fp8 GEMM of an unfused model (the CPU path), by input: q_a and kv_a read the same
# normed hidden state, gate and up the same MLP input; routed experts run two grouped GEMMs.
SITES = ("q_a + kv_a", "q_b", "o_proj", "dense gate/up", "dense down", "shared gate/up",
         "shared down", "routed gate/up", "routed down")
_LINEAR_SITE = (
    (r"self_attn\.(q_a_proj|kv_a_proj_with_mqa)$", "q_a + kv_a"),
    (r"self_attn\.q_b_proj$", "q_b"),
    (r"self_attn\.o_proj$", "o_proj"),
    (r"mlp\.shared_experts\.(gate|up)_proj$", "shared gate/up"),
    (r"mlp\.shared_experts\.down_proj$", "shared down"),
    (r"mlp\.(gate|up)_proj$", "dense gate/up"),
    (r"mlp\.down_proj$", "dense down"),
)


def site_of(module_name: str) -> str:
    """The site of an Fp8Linear by its module path (model.layers.1.self_attn.o_proj)."""
    for pattern, site in _LINEAR_SITE:
        if re.search(pattern, module_name):
            return site
    raise KeyError(f"no activation site for fp8 GEMM {module_name}")


@contextmanager
def quantized_sites(model: nn.Module, sites: set[str]) -> Iterator[dict[str, int]]:
    """Within the block, only the GEMMs of `sites` quantize activations; yields the number of
    quantizations per site, filled as the model runs."""
    unknown = set(sites) - set(SITES)
    if unknown:
        raise ValueError(f"unknown sites {sorted(unknown)}; known: {SITES}")
    original = fp8_linear.quant_dequant_groups
    state: dict[str, str | int | None] = {"site": None, "calls": 0}
    counts = dict.fromkeys(SITES, 0)

    def enter(site: str):
        def hook(module, args):
            state["site"], state["calls"] = site, 0
        return hook

    def leave(module, args, out):
        state["site"] = None

    def quant(x: torch.Tensor, group: int, eps: float = 1e-10) -> torch.Tensor:
        site = state["site"]
        if site == "routed":  # Experts.forward quantizes gate/up's input, then down's
            state["calls"] = int(state["calls"] or 0) + 1
            site = "routed gate/up" if state["calls"] == 1 else "routed down"
        if site is None:
            raise RuntimeError("activation quantization outside any known fp8 GEMM")
        counts[str(site)] += 1
        return original(x, group, eps) if site in sites else x.float()

    handles = []
    for name, module in model.named_modules():
        site = (site_of(name) if isinstance(module, Fp8Linear)
                else "routed" if isinstance(module, Experts) else None)
        if site:
            handles += [module.register_forward_pre_hook(enter(site)),
                        module.register_forward_hook(leave)]
    fp8_linear.quant_dequant_groups = quant
    moe.quant_dequant_groups = quant
    try:
        yield counts
    finally:
        fp8_linear.quant_dequant_groups = original
        moe.quant_dequant_groups = original
        for h in handles:
            h.remove()


class Probe:
    """Records, per forward, each decoder layer's attention and MLP outputs, the final hidden
    state and each MoE layer's routed experts; `take()` returns them concatenated over the
    forwards since the last take."""

    def __init__(self, model: nn.Module):
        self.records: dict[str, list[torch.Tensor]] = {}
        self.handles = []
        top_k = model.config.num_experts_per_tok
        for i, layer in enumerate(model.model.layers):
            self._watch(layer.self_attn, f"L{i} attn", lambda out: out)
            mlp = layer.mlp
            self._watch(mlp, f"L{i} mlp", lambda out: out)
            gate = getattr(mlp, "gate", None)
            if isinstance(gate, Gate):  # routed ids; shared-expert slots come after top_k
                self._watch(gate, f"L{i} experts",
                            lambda out: out[1][:, :top_k].sort(-1).values)
        self._watch(model.model.norm, "final hidden",
                    lambda out: out[0] if isinstance(out, tuple) else out)

    def _watch(self, module: nn.Module, key: str, pick) -> None:
        def hook(m, args, out):
            self.records.setdefault(key, []).append(pick(out).detach().float().cpu())
        self.handles.append(module.register_forward_hook(hook))

    def take(self) -> dict[str, torch.Tensor]:
        out = {k: torch.cat(v) for k, v in self.records.items()}
        self.records = {}
        return out

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def routing_flips(test: torch.Tensor, ref: torch.Tensor) -> float:
    """Fraction of `ref`'s routed-expert choices [tokens, top_k] that `test` did not make."""
    k = ref.shape[1]
    same = (test.long()[:, :, None] == ref.long()[:, None, :]).any(-1).sum(-1)
    return 1.0 - same.double().mean().item() / k

