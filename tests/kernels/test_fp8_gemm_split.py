"""Split-K of the block-fp8 GEMM (decode-sized launches with few output tiles): the same
result as one pass over K, for K not a multiple of the split or of the block."""

from __future__ import annotations

import pytest
import torch

from moeserve.kernels.fp8_gemm import (
    _split_k,
    fp8_gemm_ref,
    per_token_group_quant,
    w8a8_block_fp8_matmul,
)
from tests.kernels.conftest import DEVICE
from tests.kernels.helpers import rel_err
from tests.kernels.test_fp8_gemm import _quantized_weight


@pytest.mark.parametrize("m,n,k,block,split", [(1, 72, 1000, 32, 3), (4, 40, 512, 64, None),
                                               (17, 130, 384, 128, 2)])
def test_split_k_matches_one_pass(m, n, k, block, split):
    gen = torch.Generator().manual_seed(m + n)
    w, s = _quantized_weight(n, k, block, gen)
    x = torch.randn(m, k, generator=gen).to(DEVICE)
    w, s = w.to(DEVICE), s.to(DEVICE)
    a_q, a_s = per_token_group_quant(x, block)
    args = (a_q, a_s, w, s, torch.float32, (block, block))
    one = w8a8_block_fp8_matmul(*args, split_k=1)
    split_out = w8a8_block_fp8_matmul(*args, split_k=split)
    assert split_out.shape == (m, n) and split_out.dtype == torch.float32
    assert rel_err(split_out, one) < 1e-5
    assert rel_err(split_out.cpu(), fp8_gemm_ref(x.cpu(), w.cpu(), s.cpu(), torch.float32,
                                                 (block, block))) < 1e-2


def test_split_k_choice():
    assert _split_k(33, 56) == 8  # V3 q_a + kv_a at batch 1: 33 tiles, 56 K steps
    assert _split_k(112, 128) == 3  # o_proj: 112 tiles
    assert _split_k(384, 12) == 1  # q_b: enough tiles
    assert _split_k(10, 6) == 1  # too few K steps to split


@pytest.mark.parametrize("group_m", [2, 3])
def test_banded_launch_order_covers_every_tile(group_m):
    # 5 row tiles of 16 in bands of 2 or 3 (the last band short), 3 column tiles of 32.
    gen = torch.Generator().manual_seed(group_m)
    w, s = _quantized_weight(70, 256, 128, gen)
    x = torch.randn(75, 256, generator=gen).to(DEVICE)
    w, s = w.to(DEVICE), s.to(DEVICE)
    a_q, a_s = per_token_group_quant(x, 128)
    args = (a_q, a_s, w, s, torch.float32, (128, 128), (16, 32, 4, 2))
    plain = w8a8_block_fp8_matmul(*args, group_m=1)
    banded = w8a8_block_fp8_matmul(*args, group_m=group_m)
    assert torch.equal(banded, plain)
    assert rel_err(plain.cpu(), fp8_gemm_ref(x.cpu(), w.cpu(), s.cpu(), torch.float32)) < 1e-2
