"""Building blocks shared by the attention and MoE modules."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moeserve.worker.model.forward_context import kernels_on

__all__ = ["RMSNorm", "MLP", "linear", "make_linear"]


def linear(in_features: int, out_features: int, bias: bool = False) -> nn.Linear:
    # Parameters are created empty: the checkpoint loader or make-checkpoint fills them.
    return nn.Linear(in_features, out_features, bias=bias)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """norm(x), or with ``residual`` the pair (norm(x + residual), x + residual): the
        decoder's residual add, fused into the same kernel on the triton backend (one kernel
        instead of ~7 ops)."""
        if kernels_on(x):
            from moeserve import kernels  # imports triton: only on the CUDA path

            return kernels.rmsnorm(x, self.weight, self.eps, residual=residual)
        if residual is not None:
            x = x + residual
            return self._norm(x), x
        return self._norm(x)

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def make_linear(in_features: int, out_features: int, bias: bool = False,
                fp8_block: tuple[int, int] | None = None) -> nn.Module:
    """nn.Linear, or with ``fp8_block`` an Fp8Linear keeping the checkpoint's fp8 weight and
    block scales (same parameter names plus ``weight_scale_inv``)."""
    if fp8_block is None:
        return linear(in_features, out_features, bias)
    from moeserve.worker.model.fp8_linear import Fp8Linear

    return Fp8Linear(in_features, out_features, fp8_block, bias=bias)


class MLP(nn.Module):
    """SwiGLU feed-forward: dense layers and shared experts."""

    def __init__(self, hidden_size: int, intermediate_size: int,
                 fp8_block: tuple[int, int] | None = None):
        super().__init__()
        self.gate_proj = make_linear(hidden_size, intermediate_size, fp8_block=fp8_block)
        self.up_proj = make_linear(hidden_size, intermediate_size, fp8_block=fp8_block)
        self.down_proj = make_linear(intermediate_size, hidden_size, fp8_block=fp8_block)
        # (module computing [gate; up]) once fuse_gate_up ran; a tuple: not registered
        self.gate_up: tuple[nn.Module] | None = None

    def fuse_gate_up(self) -> None:
        """fp8: gate and up as one GEMM whose weight and scales the two view, so the input
        is quantized once and read once (V3's dense layers: 18432 rows each, whole blocks).
        bf16 keeps two cuBLAS calls."""
        from moeserve.worker.model.fp8_linear import Fp8Linear

        if self.gate_up is None and isinstance(self.gate_proj, Fp8Linear):
            both = Fp8Linear.stacked(self.gate_proj, self.up_proj)
            if both is not None:
                self.gate_up = (both,)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up is not None:
            gate, up = self.gate_up[0](x).chunk(2, dim=-1)
            return self.down_proj(F.silu(gate) * up)
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
