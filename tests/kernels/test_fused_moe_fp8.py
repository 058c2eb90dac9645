"""fp8 (W8A8, block-scaled) fused MoE: the Triton kernel against fused_moe_ref with scales, and
that reference against an independent dequantize / quantize-dequantize computation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moeserve.kernels.fused_moe import fused_moe, fused_moe_ref
from moeserve.kernels.moe_config import MoeConfig
from tests.kernels.helpers import rel_err

E4M3 = torch.float8_e4m3fn


def _quantize_experts(w: torch.Tensor, block: tuple[int, int], gen: torch.Generator):
    """[E, N, K] float -> (e4m3 [E, N, K], float32 scales [E, ceil(N/bn), ceil(K/bk)]).

    Blocks get magnitudes spread over 40x first, so a scale applied to the wrong block (or
    one scale for all) shows as an O(1) error."""
    e, n, k = w.shape
    bn, bk = block
    sn, sk = -(-n // bn), -(-k // bk)
    magnitude = torch.rand(e, sn, sk, generator=gen) * 4 + 0.1
    w = w * magnitude.repeat_interleave(bn, 1)[:, :n].repeat_interleave(bk, 2)[:, :, :k]
    scales = torch.empty(e, sn, sk)
    q = torch.empty(e, n, k)
    for i in range(sn):
        for j in range(sk):
            tile = w[:, i * bn:(i + 1) * bn, j * bk:(j + 1) * bk]
            s = tile.abs().amax((1, 2)) / 448.0
            scales[:, i, j] = s
            q[:, i * bn:(i + 1) * bn, j * bk:(j + 1) * bk] = tile / s[:, None, None]
    return q.to(E4M3), scales


def _dequantize(q: torch.Tensor, scales: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """Block by block, independently of the library's repeat_interleave."""
    out = q.float().clone()
    bn, bk = block
    for i in range(scales.shape[1]):
        for j in range(scales.shape[2]):
            out[:, i * bn:(i + 1) * bn, j * bk:(j + 1) * bk] *= scales[:, i, j, None, None]
    return out


def _qdq_rows(x: torch.Tensor, group: int) -> torch.Tensor:
    """Each row's channels in groups of `group`: scaled so the group's max is 448, rounded to
    e4m3, scaled back (DeepSeek's per-token-group activation quantization)."""
    x = x.float()
    out = torch.empty_like(x)
    for g0 in range(0, x.shape[1], group):
        part = x[:, g0:g0 + group]
        s = part.abs().amax(1, keepdim=True).clamp_min(1e-10) / 448.0
        out[:, g0:g0 + group] = (part / s).clamp(-448, 448).to(E4M3).float() * s
    return out


def _independent_moe(x, w13_q, w13_s, w2_q, w2_s, weights, ids, block):
    """Token by token, copy by copy: the W8A8 MoE written out from its definition."""
    w13 = _dequantize(w13_q, w13_s, block)
    w2 = _dequantize(w2_q, w2_s, block)
    inter = w13.shape[1] // 2
    xq = _qdq_rows(x, block[1])
    out = torch.zeros(x.shape, dtype=torch.float32)
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            if e < 0:
                continue
            gu = w13[e] @ xq[t]
            h = F.silu(gu[:inter]) * gu[inter:]
            h = _qdq_rows(h[None], block[1])[0]
            out[t] += float(weights[t, j]) * (w2[e] @ h)
    return out


def _problem(tokens, hidden, inter, routed, used, top_k, shared, block, dtype, seed,
             remote=0.0):
    """Routing over the first `used` of `routed` experts (the rest get no tokens), `shared`
    shared experts stacked after them (`append_shared`), a fraction `remote` of ids -1."""
    from moeserve.worker.model.moe import append_shared

    gen = torch.Generator().manual_seed(seed)
    experts = routed + shared
    x = (torch.randn(tokens, hidden, generator=gen)
         * (torch.rand(tokens, 1, generator=gen) * 3 + 0.2)).to(dtype)  # fmt: skip
    w13, w13_s = _quantize_experts(torch.randn(experts, 2 * inter, hidden, generator=gen)
                                   / hidden**0.5, block, gen)  # fmt: skip
    w2, w2_s = _quantize_experts(torch.randn(experts, hidden, inter, generator=gen)
                                 / inter**0.5, block, gen)  # fmt: skip
    scores = torch.rand(tokens, routed, generator=gen)
    scores[:, used:] = -1.0
    weights, ids = scores.topk(top_k, dim=-1)
    if remote:
        ids = torch.where(torch.rand(ids.shape, generator=gen) < remote, -1, ids)
    weights, ids = append_shared(weights, ids, routed, shared)
    return x, w13, w2, weights, ids.to(torch.int32), w13_s, w2_s


# (tokens, hidden, inter, routed, used, top_k, shared, block, x dtype, config, remote, seed)
CASES = [
    # H and I not multiples of 128: masked K tails, w13's up rows start inside scale block 0
    (7, 200, 72, 6, 4, 2, 0, (128, 128), torch.bfloat16, None, 0.0, 0),
    # unfused h quantization (gated N tile 64 < the group), one shared expert, remote ids
    (13, 160, 136, 5, 5, 3, 1, (128, 128), torch.bfloat16,
     MoeConfig(16, 32, 128, 4, 2, gate_block_n=64), 0.2, 1),
    # 32x32 blocks: several scale blocks along N and K in every tile, 2 shared experts
    (20, 96, 48, 8, 3, 2, 2, (32, 32), torch.float32,
     MoeConfig(16, 32, 32, 4, 2, gate_block_n=32), 0.0, 2),
    # bn != bk (32 x 64 blocks), BLOCK_N (16) a proper divisor of bn, 32-row tiles, fp16
    (40, 64, 40, 4, 4, 1, 0, (32, 64), torch.float16,
     MoeConfig(32, 16, 64, 4, 2, gate_block_n=64), 0.1, 3),
]
IDS = ["odd-sizes", "unfused-quant-shared-remote", "32x32-blocks", "narrow-n"]


@pytest.mark.parametrize("tokens,hidden,inter,routed,used,top_k,shared,block,dtype,config,"
                         "remote,seed", CASES, ids=IDS)
def test_fp8_kernel_matches_ref(tokens, hidden, inter, routed, used, top_k, shared, block,
                                dtype, config, remote, seed, device):  # fmt: skip
    x, w13, w2, weights, ids, w13_s, w2_s = _problem(tokens, hidden, inter, routed, used,
                                                     top_k, shared, block, dtype, seed, remote)
    args = [t.to(device) for t in (x, w13, w2, weights, ids)]
    scales = {"w13_scale": w13_s.to(device), "w2_scale": w2_s.to(device), "block_shape": block}
    out = fused_moe(*args, config, num_shared=shared, **scales)
    ref = fused_moe_ref(*args, num_shared=shared, **scales)
    assert out.shape == x.shape and out.dtype == dtype
    # Same quantized operands; only accumulation order (which can tip an h element by one e4m3
    # step) and y's rounding to x's dtype differ. A misplaced scale errs by O(1).
    assert rel_err(out, ref) < 1e-2
    if remote and not shared:  # tokens whose experts all live on other ranks get zero
        gone = (ids < 0).all(1).to(device)
        assert gone.any() and out[gone].abs().max().item() == 0


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_fp8_ref_matches_independent_computation(case):
    tokens, hidden, inter, routed, used, top_k, shared, block, _, _, remote, seed = case
    x, w13, w2, weights, ids, w13_s, w2_s = _problem(tokens, hidden, inter, routed, used,
                                                     top_k, shared, block, torch.float32, seed,
                                                     remote)
    ref = fused_moe_ref(x, w13, w2, weights, ids, num_shared=shared, w13_scale=w13_s,
                        w2_scale=w2_s, block_shape=block)
    want = _independent_moe(x, w13, w13_s, w2, w2_s, weights, ids, block)
    # Both in float32 from the same e4m3 values: only summation order differs. Skipping the
    # activation quantization alone would err by ~3%.
    assert rel_err(ref, want) < 1e-5
    without_act_quant = fused_moe_ref(x, _dequantize(w13, w13_s, block),
                                      _dequantize(w2, w2_s, block), weights, ids)
    assert rel_err(without_act_quant, want) > 1e-3  # the check above can tell them apart


def test_fp8_all_tokens_remote_or_unrouted_experts(device):
    """Expert-parallel: a token whose experts all live elsewhere gets exactly zero; experts
    that get no token launch nothing (their blocks are unused)."""
    x, w13, w2, weights, ids, w13_s, w2_s = _problem(9, 136, 40, 6, 2, 2, 0, (128, 128),
                                                     torch.bfloat16, 4)
    ids[3] = -1
    ids[5, 0] = -1
    args = [t.to(device) for t in (x, w13, w2, weights, ids)]
    out = fused_moe(*args, w13_scale=w13_s.to(device), w2_scale=w2_s.to(device))
    ref = fused_moe_ref(*args, w13_scale=w13_s.to(device), w2_scale=w2_s.to(device))
    assert out[3].abs().max().item() == 0
    assert rel_err(out, ref) < 1e-2


def test_fp8_bad_arguments_name_the_problem(device):
    x, w13, w2, weights, ids, w13_s, w2_s = _problem(3, 136, 40, 4, 4, 2, 0, (128, 128),
                                                     torch.bfloat16, 5)
    x, w13, w2, weights, ids = (t.to(device) for t in (x, w13, w2, weights, ids))
    w13_s, w2_s = w13_s.to(device), w2_s.to(device)
    with pytest.raises(ValueError, match="w13_scale"):
        fused_moe(x, w13, w2, weights, ids, w13_scale=w13_s[..., :1], w2_scale=w2_s)
    with pytest.raises(ValueError, match="w2_scale"):
        fused_moe(x, w13, w2, weights, ids, w13_scale=w13_s, w2_scale=w2_s.double())
    with pytest.raises(ValueError, match="both"):
        fused_moe(x, w13, w2, weights, ids, w13_scale=w13_s)
    with pytest.raises(ValueError, match="float8_e4m3fn"):
        fused_moe(x, w13.bfloat16(), w2, weights, ids, w13_scale=w13_s, w2_scale=w2_s)
    with pytest.raises(ValueError, match="scale"):  # scales made for 128 blocks, told 64
        fused_moe(x, w13, w2, weights, ids, w13_scale=w13_s, w2_scale=w2_s,
                  block_shape=(64, 64))
    with pytest.raises(ValueError, match="BLOCK_K"):
        fused_moe(x, w13, w2, weights, ids, MoeConfig(16, 64, 64, 4, 2), w13_scale=w13_s,
                  w2_scale=w2_s)
    with pytest.raises(ValueError, match="both"):
        fused_moe_ref(x, w13, w2, weights, ids, w2_scale=w2_s)


class _FakeDeepGemm:
    """DeepGEMM's m-grouped fp8 GEMMs as documented (shapes, dtypes, -1 rows skipped), computed
    in torch: checks the dispatcher's layouts without the library."""

    def __init__(self, v1: bool = False, fail: bool = False):
        self.calls: list[str] = []
        self.fail = fail
        names = ("m_grouped_gemm_fp8_fp8_bf16_nt_contiguous",
                 "m_grouped_gemm_fp8_fp8_bf16_nt_masked") if v1 else \
            ("m_grouped_fp8_gemm_nt_contiguous", "m_grouped_fp8_gemm_nt_masked")
        setattr(self, names[0], self._contiguous)
        setattr(self, names[1], self._masked)

    @staticmethod
    def _check(a, a_s, b, b_s, out):
        assert a.dtype == b.dtype == E4M3 and out.dtype == torch.bfloat16
        assert a_s.dtype == b_s.dtype == torch.float32
        k, n = a.shape[-1], b.shape[1]
        assert a_s.shape[-1] == -(-k // 128) and b_s.shape[1:] == (-(-n // 128), -(-k // 128))
        assert a.is_contiguous() and b.is_contiguous() and out.is_contiguous()

    def _contiguous(self, lhs, rhs, out, m_indices):
        (a, a_s), (b, b_s) = lhs, rhs
        self._check(a, a_s, b, b_s, out)
        self.calls.append("contiguous")
        if self.fail:
            raise RuntimeError("no kernel for this shape")
        assert m_indices.dtype == torch.int32 and m_indices.shape == (a.shape[0],)
        assert (m_indices.view(-1, 128) == m_indices.view(-1, 128)[:, :1]).all()
        w = _dequantize(b.cpu(), b_s.cpu(), (128, 128))
        a_deq = a.float().cpu() * a_s.cpu().repeat_interleave(128, 1)[:, :a.shape[1]]
        groups = m_indices.cpu()
        for e in range(w.shape[0]):
            rows = groups == e
            out[rows.to(out.device)] = (a_deq[rows] @ w[e].T).to(out.dtype).to(out.device)

    def _masked(self, lhs, rhs, out, masked_m, expected_m):
        (a, a_s), (b, b_s) = lhs, rhs
        self._check(a, a_s, b, b_s, out)
        self.calls.append("masked")
        assert masked_m.dtype == torch.int32 and isinstance(expected_m, int) and expected_m > 0
        w = _dequantize(b.cpu(), b_s.cpu(), (128, 128))
        for e, m in enumerate(masked_m.tolist()):
            a_deq = a[e, :m].float().cpu() * a_s[e, :m].cpu().repeat_interleave(128, 1)[
                :, :a.shape[2]]
            out[e, :m] = (a_deq @ w[e].T).to(out.dtype).to(out.device)


@pytest.mark.parametrize("layout", ["masked", "contiguous"])
@pytest.mark.parametrize("v1", [False, True])
def test_deep_gemm_layouts_match_ref(layout, v1, device, monkeypatch):
    import moeserve.kernels as kernels
    from moeserve.kernels import dispatch
    from moeserve.kernels import fused_moe_deep_gemm as dg

    fake = _FakeDeepGemm(v1=v1)
    monkeypatch.setitem(dispatch._REGISTRY.modules, "deep_gemm", fake)
    if layout == "contiguous":
        monkeypatch.setattr(dg, "MASKED_MAX_TOKENS", 0)
    # few experts: the contiguous layout pads each to 128 rows, slow in the interpreter
    x, w13, w2, weights, ids, w13_s, w2_s = _problem(11, 200, 72, 3, 3, 2, 1, (128, 128),
                                                     torch.bfloat16, 6, remote=0.2)
    args = [t.to(device) for t in (x, w13, w2, weights, ids)]
    scales = {"w13_scale": w13_s.to(device), "w2_scale": w2_s.to(device)}
    out = kernels.fused_moe(*args, backend="deep_gemm", num_shared=1, **scales)
    assert kernels.last_path("fused_moe") == "deep_gemm"
    assert fake.calls == [layout, layout]
    # h is rounded to bf16 by DeepGEMM before its quantization: a little looser than Triton
    assert rel_err(out, fused_moe_ref(*args, **scales)) < 2e-2


def test_deep_gemm_failure_falls_back_to_triton(device, monkeypatch):
    import moeserve.kernels as kernels
    from moeserve.kernels import dispatch

    fake = _FakeDeepGemm(fail=True)
    monkeypatch.setitem(dispatch._REGISTRY.modules, "deep_gemm", fake)
    monkeypatch.setattr(dispatch._REGISTRY, "warned", set())
    from moeserve.kernels import fused_moe_deep_gemm as dg

    monkeypatch.setattr(dg, "MASKED_MAX_TOKENS", 0)
    x, w13, w2, weights, ids, w13_s, w2_s = _problem(5, 136, 40, 2, 2, 2, 0, (128, 128),
                                                     torch.bfloat16, 7)
    args = [t.to(device) for t in (x, w13, w2, weights, ids)]
    scales = {"w13_scale": w13_s.to(device), "w2_scale": w2_s.to(device)}
    out = kernels.fused_moe(*args, backend="deep_gemm", **scales)
    assert fake.calls == ["contiguous"]
    assert kernels.last_path("fused_moe") == "triton"
    assert rel_err(out, fused_moe_ref(*args, **scales)) < 1e-2
    # bf16 weights never go to DeepGEMM
    kernels.fused_moe(args[0], w13.bfloat16().to(device), w2.bfloat16().to(device), *args[3:],
                      backend="deep_gemm")
    assert kernels.last_path("fused_moe") == "triton" and fake.calls == ["contiguous"]


def test_deep_gemm_absent_is_reported(device, monkeypatch):
    import moeserve.kernels as kernels
    from moeserve.kernels import dispatch

    monkeypatch.setitem(dispatch._REGISTRY.modules, "deep_gemm", None)
    monkeypatch.setitem(dispatch._REGISTRY.import_errors, "deep_gemm",
                        "ModuleNotFoundError: No module named 'deep_gemm'")
    choice = kernels.select_backend("fused_moe", "cuda")
    assert choice.name == "triton" and "deep_gemm absent" in choice.reason
    assert kernels.optional_library_status()["deep_gemm"].startswith("absent")


@pytest.mark.parametrize("copies", [9, 576, 2304, 16384, 73728])
def test_fp8_tiles_keep_the_gated_launch_out_of_spills(copies):
    """The gated fp8 launch holds four [BLOCK_M, gate N] float32 tiles; past 128 registers a
    thread they spill (8k tokens on the H200: 34 ms instead of 14.8)."""
    from moeserve.kernels.moe_config import moe_config_fp8

    cfg = moe_config_fp8(copies, 257)
    assert cfg.block_k == 128
    assert 4 * cfg.block_m * cfg.gate_n() // (32 * cfg.num_warps) <= 128
    assert 2 * cfg.block_m * cfg.block_n // (32 * cfg.num_warps) <= 128
