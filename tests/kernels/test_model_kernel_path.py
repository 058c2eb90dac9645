"""The whole model on its kernel path (merged weights, Triton kernels; the interpreter on CPU)
computes what its plain-torch path computes, through a prefill and decode steps."""

from __future__ import annotations

import pytest
import torch

from moeserve import kernels
from moeserve.common.model_config import load_model_config
from moeserve.worker.model import AttentionMetadata, DeepseekForCausalLM, moe
from moeserve.worker.model.moe import MoE
from moeserve.worker.weights import load_checkpoint
from tests.kernels.helpers import TF32_TOL, rel_err

BLOCK = 8


def _model(path, device: str, kernels: bool) -> DeepseekForCausalLM:
    model = DeepseekForCausalLM(load_model_config(path), max_positions=256)
    load_checkpoint(model, path)
    model = model.to(device).eval()
    if kernels:
        model.fuse_weights()
    return model


def _counted(fn, op: str, calls: dict[str, int]):
    def wrapper(*args, **kwargs):
        calls[op] += 1
        return fn(*args, **kwargs)

    return wrapper


@pytest.fixture
def tf32_matmul():
    """cuBLAS float32 matmuls as tf32 for one test. Not monkeypatch: torch >= 2.13's
    cuBLASModule answers getattr for allow_tf32 / fp32_precision but monkeypatch cannot undo
    them (AttributeError at teardown), and mixing the legacy and new flags raises."""
    matmul = torch.backends.cuda.matmul
    before = matmul.fp32_precision
    matmul.fp32_precision = "tf32"
    yield
    matmul.fp32_precision = before


@pytest.mark.parametrize("ckpt,shared_apart", [("tiny_v3", False), ("tiny_v2", False),
                                                ("tiny_v2", True)])
def test_kernel_path_matches_torch_path(ckpt, shared_apart, request, device, monkeypatch):
    """shared_apart: the 36-token prefill runs the stacked shared experts as dense GEMMs (as
    prefill-sized batches do), the decode steps in the fused launch."""
    if shared_apart:
        monkeypatch.setattr(moe, "SHARED_APART_MIN_TOKENS", 30)
    # On a GPU the Triton kernels multiply float32 as tf32; a full-float32 torch side then
    # differs by ~1e-3 in the hidden states, enough to flip one token's expert choice (seen:
    # one row off by 0.5 on the H100) and compare two different functions. With tf32 on
    # both sides the routing agrees and the logits within 2e-3 (benchmarks excluded).
    request.getfixturevalue("tf32_matmul")
    path = request.getfixturevalue(ckpt)
    ref, fast = _model(path, device, False), _model(path, device, True)
    # The backend reaches the leaves through the step, not module flags: count the fused
    # norm and the paged MLA kernels, which only the triton step may call.
    calls = {"rmsnorm": 0, "mla_prefill": 0, "mla_decode": 0}
    for op in calls:
        monkeypatch.setattr(kernels, op, _counted(getattr(kernels, op), op, calls))
    moe_layers = [layer.mlp for layer in fast.model.layers if isinstance(layer.mlp, MoE)]
    assert moe_layers and all(m.shared_experts is None and m.experts.num_shared_slots > 0
                              for m in moe_layers)
    assert all(layer.self_attn.fused_input is not None for layer in fast.model.layers)
    cfg = ref.config
    # 20 new tokens take the MHA-form prefill, 5 and 11 the absorbed one; shuffled pages
    prompt_lens = [20, 5, 11]
    tables = [[9, 2, 7, 4], [1, 12], [5, 3, 14]]
    caches = [torch.zeros(16, cfg.num_hidden_layers, BLOCK, cfg.kv_dim, device=device)
              for _ in range(2)]
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(2, cfg.vocab_size, (sum(prompt_lens),), generator=gen).tolist()
    ctx, qlens = [0, 0, 0], prompt_lens
    for step in range(3):  # the prefill, then two decode steps of the three sequences
        meta, pos = AttentionMetadata.build(tables, ctx, qlens, BLOCK, device)
        ids = torch.tensor(tokens, device=device)
        with torch.inference_mode():
            want = ref.compute_logits(ref(ids, pos, caches[0], meta))
            assert not any(calls.values()), "the torch step called a kernel"
            got = fast.compute_logits(fast(ids, pos, caches[1], meta, backend="triton"))
        assert rel_err(got, want) < TF32_TOL, f"step {step}"
        assert rel_err(caches[1], caches[0]) < TF32_TOL, f"step {step}"
        ends = meta.query_start_loc[1:].cpu() - 1
        tokens = want[ends].argmax(-1).tolist()
        ctx, qlens = [c + q for c, q in zip(ctx, qlens, strict=True)], [1, 1, 1]
        assert calls["rmsnorm"] and calls["mla_prefill" if step == 0 else "mla_decode"]
        calls.update(dict.fromkeys(calls, 0))


def test_mixed_steps_match_torch_path(tiny_v2, request, device, monkeypatch):
    """Steps that mix decode rows with prompts, as serving runs them: whole new prompts
    packed into one K/V expansion beside decode rows (the decode kernel), then a step with a
    new prompt and a chunk continuing a cached prefix (attending apart) and whose other
    sequences (decode rows and a short chunk) are not contiguous in the batch (the absorbed
    kernel on gathered rows)."""
    request.getfixturevalue("tf32_matmul")
    ref, fast = _model(tiny_v2, device, False), _model(tiny_v2, device, True)
    calls = {"mla_prefill": 0, "mla_decode": 0, "mla_prefill_mha": 0,
             "mla_prefill_mha_packed": 0}
    for op in calls:
        monkeypatch.setattr(kernels, op, _counted(getattr(kernels, op), op, calls))
    cfg = ref.config
    tables = {"x": [1, 2, 3, 4], "y": [5, 6], "z": [7, 8, 9], "w": [10, 11, 12],
              "v": [13, 14]}
    caches = [torch.zeros(16, cfg.num_hidden_layers, BLOCK, cfg.kv_dim, device=device)
              for _ in range(2)]
    gen = torch.Generator().manual_seed(1)
    ctx = dict.fromkeys(tables, 0)
    # (sequence, new tokens) per step, in batch order; the calls each step must make
    steps = [([("x", 6), ("y", 9)], {"mla_prefill": 1}),
             ([("x", 1), ("y", 1), ("z", 20), ("w", 17)],
              {"mla_prefill_mha_packed": 1, "mla_decode": 1}),
             ([("z", 1), ("x", 18), ("w", 1), ("y", 4), ("v", 16)],
              {"mla_prefill_mha": 1, "mla_prefill_mha_packed": 1, "mla_prefill": 1})]
    for i, (batch, want_calls) in enumerate(steps):
        names, qlens = [n for n, _ in batch], [q for _, q in batch]
        meta, pos = AttentionMetadata.build([tables[n] for n in names], [ctx[n] for n in names],
                                            qlens, BLOCK, device)
        ids = torch.randint(2, cfg.vocab_size, (sum(qlens),), generator=gen).to(device)
        with torch.inference_mode():
            want = ref.compute_logits(ref(ids, pos, caches[0], meta))
            meta.split = None  # the kernel path plans its own split
            calls.update(dict.fromkeys(calls, 0))
            got = fast.compute_logits(fast(ids, pos, caches[1], meta, backend="triton"))
        assert rel_err(got, want) < TF32_TOL, f"step {i}"
        assert rel_err(caches[1], caches[0]) < TF32_TOL, f"step {i}"
        # each kernel once per layer
        layers = cfg.num_hidden_layers
        assert {op: n // layers for op, n in calls.items() if n} == want_calls, f"step {i}"
        for n, q in batch:
            ctx[n] += q
