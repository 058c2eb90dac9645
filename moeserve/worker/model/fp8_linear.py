"""Block-scaled fp8 weights as DeepSeek-V3/R1 ship them, kept fp8 in memory (W8A8).

A weight is float8_e4m3fn [N, K] with one float32 `weight_scale_inv` per (bn, bk) block
(`quantization_config.weight_block_size`): w = w_fp8 * scale[n // bn, k // bk]. Activations
are quantized on the fly per token and group of bk channels, as DeepSeek's inference code and
DeepGEMM do, so each bk-wide step of a GEMM multiplies two fp8 tiles.

On CUDA (or under TRITON_INTERPRET) `Fp8Linear` calls `moeserve.kernels.fp8_gemm` (DeepGEMM
when installed, else Triton). Elsewhere the same arithmetic runs in plain torch here (this
module imports no Triton, which CPU installs lack): activations quantized and dequantized per
group, the weight dequantized, a float32 matmul.
"""

from __future__ import annotations

import torch
from torch import nn

from moeserve.common.errors import ConfigError
from moeserve.worker.model.forward_context import kernels_on

__all__ = [
    "FP8_DTYPE", "FP8_MAX", "Fp8Linear", "check_block_supported", "dequantize_blocks",
    "quant_dequant_groups", "scale_shape", "w8a8_linear",
]

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite float8_e4m3fn
# Triton's tl.dot takes K tiles of 16 and more, powers of two; the activation group is the
# weight's K block; 256 keeps a pipelined [16, bk] x [bk, 64] tile pair well inside shared memory.
_BLOCK_RANGE = (16, 256)


def check_block_supported(block: tuple[int, int]) -> None:
    """ConfigError naming the field when the kernels cannot run weights of this block size
    (the dequantized path can: `--quantization dequant`)."""
    lo, hi = _BLOCK_RANGE
    if not all(lo <= b <= hi and b & (b - 1) == 0 for b in block):
        raise ConfigError(
            f"config.json field 'quantization_config.weight_block_size' {list(block)} is not "
            f"supported by the fp8 kernels (each side a power of two from {lo} to {hi}); "
            "serve this checkpoint with --quantization dequant")


def scale_shape(rows: int, cols: int, block: tuple[int, int]) -> tuple[int, int]:
    """[ceil(rows / bn), ceil(cols / bk)]: the weight_scale_inv of a [rows, cols] weight."""
    return -(-rows // block[0]), -(-cols // block[1])


def dequantize_blocks(weight: torch.Tensor, scale_inv: torch.Tensor,
                      block: tuple[int, int]) -> torch.Tensor:
    """fp8 weight [..., N, K] with scales [..., ceil(N/bn), ceil(K/bk)] -> float32 [..., N, K].

    The block size is given, never inferred from the shapes: where N is not a multiple of bn
    the last block is partial (V3's kv_a_proj_with_mqa: 576 rows, 5 scale rows of 128)."""
    n, k = weight.shape[-2:]
    bn, bk = block
    scale = scale_inv.float().repeat_interleave(bn, -2)[..., :n, :]
    return weight.float() * scale.repeat_interleave(bk, -1)[..., :k]


def quant_dequant_groups(x: torch.Tensor, group: int, eps: float = 1e-10) -> torch.Tensor:
    """x [M, K] -> float32 [M, K]: each token's groups of `group` channels scaled to the fp8
    range, rounded to float8_e4m3fn and scaled back (what the W8A8 GEMM multiplies)."""
    m, k = x.shape
    groups = -(-k // group)
    pad = x.new_zeros(m, groups * group, dtype=torch.float32)
    pad[:, :k] = x.float()
    tiles = pad.view(m, groups, group)
    scales = tiles.abs().amax(-1, keepdim=True).clamp_min(eps) / FP8_MAX
    q = (tiles / scales).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return (q.float() * scales).reshape(m, groups * group)[:, :k]  # m may be 0 (an idle rank)


def w8a8_linear(x: torch.Tensor, weight: torch.Tensor, scale_inv: torch.Tensor,
                block: tuple[int, int]) -> torch.Tensor:
    """Plain-torch block-scaled W8A8 GEMM: x [M, K] @ dequant(weight [N, K])^T -> float32."""
    return quant_dequant_groups(x, block[1]) @ dequantize_blocks(weight, scale_inv, block).T


class Fp8Linear(nn.Module):
    """nn.Linear with an fp8 weight and its block scales, named as in the checkpoint
    (`weight`, `weight_scale_inv`, `bias`); output in the input's dtype."""

    def __init__(self, in_features: int, out_features: int, block: tuple[int, int],
                 bias: bool = False):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.block = (int(block[0]), int(block[1]))
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=FP8_DTYPE),
                                   requires_grad=False)
        self.weight_scale_inv = nn.Parameter(
            torch.empty(scale_shape(out_features, in_features, self.block),
                        dtype=torch.float32), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias \
            else None

    @classmethod
    def stacked(cls, first: Fp8Linear, second: Fp8Linear) -> Fp8Linear | None:
        """One module computing both (outputs concatenated), whose weight and scales the two
        then view; None where a scale block would straddle the seam (first's rows not a
        multiple of bn) or the layouts differ."""
        if (first.block != second.block or first.in_features != second.in_features
                or first.out_features % first.block[0]
                or (first.bias is None) != (second.bias is None)):  # fmt: skip
            return None
        both = cls(first.in_features, first.out_features + second.out_features, first.block,
                   bias=first.bias is not None).to(first.weight.device)
        rows, scale_rows = first.out_features, first.weight_scale_inv.shape[0]
        both.weight.data = torch.cat([first.weight.data, second.weight.data])
        both.weight_scale_inv.data = torch.cat([first.weight_scale_inv.data,
                                                second.weight_scale_inv.data])
        if first.bias is not None:
            both.bias.data = torch.cat([first.bias.data, second.bias.data])
        for module, part, spart in ((first, slice(0, rows), slice(0, scale_rows)),
                                    (second, slice(rows, None), slice(scale_rows, None))):
            module.weight = nn.Parameter(both.weight.data[part], requires_grad=False)
            module.weight_scale_inv = nn.Parameter(both.weight_scale_inv.data[spart],
                                                   requires_grad=False)
            if both.bias is not None:
                module.bias = nn.Parameter(both.bias.data[part], requires_grad=False)
        return both

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead, k = x.shape[:-1], x.shape[-1]
        x2 = x.reshape(-1, k)
        if kernels_on(x):
            from moeserve import kernels  # imports triton: only on the kernel path

            if x2.stride(-1) != 1:
                x2 = x2.contiguous()
            y = kernels.fp8_gemm(x2, self.weight, self.weight_scale_inv, x.dtype, self.block)
        else:
            y = w8a8_linear(x2, self.weight, self.weight_scale_inv, self.block).to(x.dtype)
        if self.bias is not None:
            y = y + self.bias
        return y.view(*lead, self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"block={self.block}, bias={self.bias is not None}")
