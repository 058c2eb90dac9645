"""Block-fp8 GEMM and per-token-group quantization (Triton) against their torch references."""

from __future__ import annotations

import pytest
import torch

from moeserve.kernels.fp8_gemm import (
    fp8_gemm,
    fp8_gemm_ref,
    per_token_group_quant,
    per_token_group_quant_ref,
    w8a8_block_fp8_matmul,
)
from tests.kernels.helpers import rel_err


def _quantized_weight(n: int, k: int, block: int, gen: torch.Generator):
    """([n, k] float8_e4m3fn, [ceil(n/block), ceil(k/block)] float32), blocks of different
    magnitude so a misplaced scale shows."""
    w = torch.randn(n, k, generator=gen)
    sn, sk = -(-n // block), -(-k // block)
    magnitude = torch.rand(sn, sk, generator=gen) * 4 + 0.1
    w = w * magnitude.repeat_interleave(block, 0)[:n].repeat_interleave(block, 1)[:, :k]
    pad = torch.zeros(sn * block, sk * block)
    pad[:n, :k] = w
    scales = pad.view(sn, block, sk, block).abs().amax((1, 3)) / 448.0
    q = (pad.view(sn, block, sk, block) / scales[:, None, :, None]).view_as(pad)[:n, :k]
    return q.to(torch.float8_e4m3fn), scales


# (m, n, k, block, x dtype, seed)
CASES = [
    (5, 72, 96, 32, torch.bfloat16, 0),
    (33, 40, 80, 32, torch.float32, 1),  # K not a multiple of the block
    (1, 130, 256, 128, torch.bfloat16, 2),
    (20, 64, 128, 64, torch.float16, 3),
]


@pytest.mark.parametrize("m,n,k,block,dtype,seed", CASES)
def test_fp8_gemm_matches_ref(m, n, k, block, dtype, seed, device):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(m, k, generator=gen) * torch.rand(m, 1, generator=gen) * 3).to(dtype)
    w, w_s = _quantized_weight(n, k, block, gen)
    x, w, w_s = x.to(device), w.to(device), w_s.to(device)
    out = fp8_gemm(x, w, w_s, block_size=(block, block))
    ref = fp8_gemm_ref(x, w, w_s, block_size=(block, block))
    assert out.shape == (m, n) and out.dtype == torch.bfloat16
    assert rel_err(out, ref) < 1e-2


def test_w8a8_matmul_exact_inputs(device):
    """From the same quantized inputs only accumulation order differs from the reference."""
    gen = torch.Generator().manual_seed(4)
    a, a_s = per_token_group_quant_ref(torch.randn(9, 96, generator=gen), 32)
    w, w_s = _quantized_weight(48, 96, 32, gen)
    out = w8a8_block_fp8_matmul(a.to(device), a_s.to(device), w.to(device), w_s.to(device),
                                torch.float32, (32, 32))
    a_deq = a.float() * a_s.repeat_interleave(32, 1)
    w_deq = w.float() * w_s.repeat_interleave(32, 0)[:48].repeat_interleave(32, 1)
    assert rel_err(out.cpu(), a_deq @ w_deq.T) < 1e-5


def test_per_token_group_quant_matches_ref(device):
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(7, 200, generator=gen) * 10
    x[2, :64] = 0  # an all-zero group
    q, s = per_token_group_quant(x.to(device), 64)
    q_ref, s_ref = per_token_group_quant_ref(x, 64)
    assert q.dtype == torch.float8_e4m3fn and s.shape == (7, 4)
    torch.testing.assert_close(s.cpu(), s_ref)
    deq = q.float().cpu() * s.cpu().repeat_interleave(64, 1)[:, :200]
    assert rel_err(deq, x) < 0.05  # e4m3 keeps 3 mantissa bits
    # The GPU's approximate fp32 division may tip a value by one e4m3 step (1/8).
    torch.testing.assert_close(q.float().cpu(), q_ref.float(), rtol=0.13, atol=0)
    q_t, s_t = per_token_group_quant(x.to(device), 64, mn_major=True)  # cuBLAS's layout
    assert s_t.stride() == (1, 7) and torch.equal(s_t.cpu(), s.cpu())
    assert torch.equal(q_t.float().cpu(), q.float().cpu())


def test_fp8_gemm_shape_errors(device):
    w, w_s = _quantized_weight(32, 64, 32, torch.Generator().manual_seed(6))
    a, a_s = per_token_group_quant_ref(torch.randn(3, 64), 32)
    with pytest.raises(ValueError):
        w8a8_block_fp8_matmul(a.to(device), a_s[:, :1].to(device), w.to(device),
                              w_s.to(device), block_size=(32, 32))
    with pytest.raises(ValueError):  # scales made for 32x32 blocks, default 128x128
        w8a8_block_fp8_matmul(a.to(device), a_s.to(device), w.to(device), w_s.to(device))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="cuBLAS block-wise GEMM: CUDA only")
# 130 rows: padded to 132 for the scales' stride; N = 272 is not a whole number of blocks. K =
# 384 gives rows of 3 weight scales (12 bytes): cuBLAS misread them, so the Triton kernel runs.
@pytest.mark.parametrize("m,n,k", [(130, 384, 512), (256, 272, 512), (256, 384, 384)])
def test_cublas_blockwise_path_matches_ref(m, n, k):
    from moeserve.kernels.fp8_gemm import cublas_blockwise

    gen = torch.Generator().manual_seed(m + n + k)
    w, s = _quantized_weight(n, k, 128, gen)
    x = torch.randn(m, k, generator=gen)
    out = fp8_gemm(x.cuda().bfloat16(), w.cuda(), s.cuda(), torch.float32)
    ref = fp8_gemm_ref(x.bfloat16(), w, s, torch.float32)
    assert out.shape == (m, n)
    assert rel_err(out.cpu(), ref) < 1e-2
    on_cublas = cublas_blockwise(x.cuda(), w.cuda(), s.cuda(), (128, 128))
    if k == 384:
        assert not on_cublas
    elif not on_cublas:
        pytest.skip("this torch / cuBLAS has no block-wise fp8 GEMM: the Triton kernel ran")
