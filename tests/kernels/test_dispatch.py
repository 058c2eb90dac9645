"""Backend selection and the package-level dispatching functions."""

from __future__ import annotations

import pytest
import torch

import moeserve.kernels as kernels
from moeserve.kernels.fused_moe import fused_moe_ref
from moeserve.kernels.mla_decode import mla_decode_ref
from tests.kernels.helpers import TF32_TOL, paged_cache, rel_err


def test_cpu_tensors_use_the_reference_without_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    for op in ("mla_decode", "mla_prefill", "fused_moe", "fp8_gemm"):
        assert kernels.select_backend(op, "cpu").name == "torch"
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert kernels.select_backend("fused_moe", "cpu").name == "triton"


def test_cuda_prefers_vendor_libraries_or_says_why_not():
    choice = kernels.select_backend("fp8_gemm", "cuda")
    status = kernels.optional_library_status()
    if status["deep_gemm"] == "available":
        assert choice.name == "deep_gemm"
    else:
        assert choice.name == "triton" and "deep_gemm absent" in choice.reason
    assert kernels.select_backend("fused_moe", "cuda").name == "triton"
    assert kernels.select_backend("mla_decode", "cuda", allow_vendor=False).name == "triton"
    with pytest.raises(ValueError):
        kernels.select_backend("softmax", "cuda")


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_dispatched_ops_run_and_record_their_path(backend, device):
    gen = torch.Generator().manual_seed(11)
    cache, tables, lens = paged_cache([9, 30], 16, 24, torch.float32, device, gen)
    q = torch.randn(2, 3, 24, generator=gen).to(device)
    out = kernels.mla_decode(q, cache[:, 0], tables, lens, 0.2, 16, backend=backend)
    assert kernels.last_path("mla_decode") == backend
    assert rel_err(out, mla_decode_ref(q, cache[:, 0], tables, lens, 0.2, 16)) < TF32_TOL

    starts = torch.tensor([0, 1, 2], dtype=torch.int32, device=device)
    pre = kernels.mla_prefill(q, cache[:, 0], tables, lens, starts, 1, 0.2, 16, backend=backend)
    assert kernels.last_path("mla_prefill") == backend
    assert rel_err(pre, out) < TF32_TOL  # one new token per sequence is a decode step

    x = torch.randn(5, 32, generator=gen).to(device)
    w13 = torch.randn(4, 32, 32, generator=gen).to(device) / 6
    w2 = torch.randn(4, 32, 16, generator=gen).to(device) / 4
    ids = torch.tensor([[0, 1], [1, 3], [3, 0], [2, 1], [0, 2]], device=device)
    weights = torch.rand(5, 2, generator=gen).to(device)
    y = kernels.fused_moe(x, w13, w2, weights, ids, backend=backend)
    assert kernels.last_path("fused_moe") == backend
    assert rel_err(y, fused_moe_ref(x, w13, w2, weights, ids)) < TF32_TOL


def test_unknown_backend_is_rejected(device):
    x = torch.zeros(1, 128, device=device)
    with pytest.raises(ValueError):
        kernels.fp8_gemm(x, x.to(torch.float8_e4m3fn), torch.ones(1, 1, device=device),
                         backend="cutlass")
