"""RMSNorm, optionally fused with the residual add that precedes it in every decoder layer.

Fusing saves a full read and write of the hidden states per norm: the sum is formed in
registers, written once as the new residual, and normalised from the same registers.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["rmsnorm", "rmsnorm_ref", "rmsnorm_kernel"]


@triton.jit
def rmsnorm_kernel(
    x_ptr, residual_ptr, weight_ptr, out_ptr, residual_out_ptr, dim, eps,
    stride_x, stride_r, stride_o, stride_ro,
    HAS_RESIDUAL: tl.constexpr, BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_D)
    ok = offs < dim
    x = tl.load(x_ptr + row * stride_x + offs, mask=ok, other=0.0)
    if HAS_RESIDUAL:
        # Rounded to the activation dtype, as the unfused `x + residual` would be.
        x = (x + tl.load(residual_ptr + row * stride_r + offs, mask=ok, other=0.0))
        x = x.to(residual_out_ptr.dtype.element_ty)
        tl.store(residual_out_ptr + row * stride_ro + offs, x, mask=ok)
    xf = x.to(tl.float32)
    inv_rms = tl.rsqrt(tl.sum(xf * xf, 0) / dim + eps)
    # The normalised value is rounded before the weight multiplies it, like layers.RMSNorm.
    normed = (xf * inv_rms).to(x_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(weight_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_o + offs, (normed * w).to(out_ptr.dtype.element_ty), mask=ok)


def rmsnorm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm over the last dim of x: [T, D] bf16/fp16/fp32 (rows may be strided, last dim
    contiguous); weight: [D] any float dtype. Returns [T, D] in x's dtype.

    With residual ([T, D], x's dtype) the input is x + residual, and the result is the pair
    (normed [T, D], x + residual [T, D]) so the caller keeps the sum as the next residual.
    """
    if x.dim() != 2 or weight.shape != (x.shape[1],) or x.stride(-1) != 1:
        raise ValueError(f"x must be [T, D] with a contiguous last dim and weight [D]; got "
                         f"{tuple(x.shape)} and {tuple(weight.shape)}")
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype
                                 or residual.stride(-1) != 1):
        raise ValueError(f"residual {tuple(residual.shape)} {residual.dtype} does not match x")
    tokens, dim = x.shape
    out = torch.empty_like(x)
    summed = torch.empty_like(x) if residual is not None else out
    res = residual if residual is not None else x
    block_d = triton.next_power_of_2(dim)
    if tokens:
        rmsnorm_kernel[(tokens,)](
            x, res, weight.contiguous(), out, summed, dim, eps,
            x.stride(0), res.stride(0), out.stride(0), summed.stride(0),
            HAS_RESIDUAL=residual is not None, BLOCK_D=block_d,
            num_warps=min(16, max(1, block_d // 512)),
        )
    return out if residual is None else (out, summed)


def rmsnorm_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Plain-torch `rmsnorm` (same arguments and results), layers.RMSNorm's formula."""
    inp = x if residual is None else x + residual
    xf = inp.float()
    normed = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    out = (weight.float() * normed.float()).to(x.dtype)
    return out if residual is None else (out, inp)
