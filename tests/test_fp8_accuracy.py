"""benchmarks/fp8_accuracy.py's machinery, on a tiny model trained for a few seconds: the
checkpoint it writes is the model it trained, and its per-GEMM activation switch quantizes
exactly what moeserve's W8A8 path does, no more and no less (the resident-fp8 arithmetic
itself is tests/test_fp8_resident.py's)."""

from __future__ import annotations

import pytest
import torch

from benchmarks.activation_sites import SITES, Probe, quantized_sites, routing_flips
from benchmarks.fp8_accuracy import open_engine
from benchmarks.logit_compare import all_logits, compare_logits
from benchmarks.trained_tiny_v3 import (
    export_fp8,
    hf_logits,
    hf_model,
    load_corpus,
    model_config,
    next_token_loss,
    round_to_checkpoint,
    train,
)

pytest.importorskip("transformers")

# 128-wide where fp8 needs it (routed experts and q_a stay fp8); kv_a has 144 rows, a partial
# scale block like V3's 576.
TINY = {"hidden_size": 128, "intermediate_size": 256, "moe_intermediate_size": 128,
        "num_hidden_layers": 2, "first_k_dense_replace": 1, "num_attention_heads": 2,
        "num_key_value_heads": 2, "q_lora_rank": 128, "kv_lora_rank": 128,
        "qk_nope_head_dim": 32, "qk_rope_head_dim": 16, "v_head_dim": 64,
        "n_routed_experts": 8, "num_experts_per_tok": 2, "n_group": 2, "topk_group": 1,
        "n_shared_experts": 1}
SEQ = 64


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    corpus = load_corpus(512, max_files=32)
    cfg = model_config(512, TINY)
    model = hf_model(cfg, seed=0)
    losses = train(model, corpus.train, steps=60, batch=4, seq_len=SEQ, lr=3e-3, seed=0)
    windows = corpus.windows(2, SEQ)
    float_logits = hf_logits(model, windows)
    round_to_checkpoint(model, cfg)
    rounded_logits = hf_logits(model, windows)
    ckpt = export_fp8(model, cfg, tmp_path_factory.mktemp("fp8acc") / "trained")
    return {"ckpt": ckpt, "losses": losses, "windows": windows, "float_logits": float_logits,
            "rounded_logits": rounded_logits}


def _logits(engine, windows) -> torch.Tensor:
    return torch.cat([all_logits(engine, w) for w in windows])


def test_checkpoint_is_the_trained_model(trained):
    """Training lowers the loss; moeserve's exact path on the written fp8 checkpoint computes
    what transformers computes with its weights rounded to the checkpoint's values, and
    predicts held-out text about as well as the float weights did."""
    losses, windows = trained["losses"], trained["windows"]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5, losses
    exact = _logits(open_engine(trained["ckpt"], "dequant", SEQ, 1), windows)
    torch.testing.assert_close(exact, trained["rounded_logits"], atol=2e-5, rtol=1e-5)
    float_loss = next_token_loss(trained["float_logits"], windows)
    assert abs(next_token_loss(exact, windows) - float_loss) < 0.05


def test_activation_sites_cover_every_quantization(trained):
    """No site quantized: the exact path's logits and routing. Every site: bit for bit the
    unpatched W8A8 path, each site reached. One site alone: different logits, each."""
    ckpt, windows = trained["ckpt"], trained["windows"]
    exact_engine = open_engine(ckpt, "dequant", SEQ, 1)
    exact_probe = Probe(exact_engine.runner.model)
    exact = _logits(exact_engine, windows)
    exact_experts = exact_probe.take()["L1 experts"]
    engine = open_engine(ckpt, "fp8", SEQ, 1)
    model = engine.runner.model
    probe = Probe(model)
    w8a8 = _logits(engine, windows)
    assert routing_flips(probe.take()["L1 experts"], exact_experts) < 0.2
    cmp = compare_logits(w8a8, exact)
    assert not torch.equal(w8a8, exact)
    assert cmp["cosine"] > 0.99, cmp
    with quantized_sites(model, set()) as calls:
        off = _logits(engine, windows)
    assert sum(calls.values()) > 0
    cmp = compare_logits(off, exact)
    assert cmp["cosine"] > 1 - 1e-9 and cmp["top1_agreement"] == 1.0, cmp
    assert routing_flips(probe.take()["L1 experts"], exact_experts) == 0.0
    with quantized_sites(model, set(SITES)) as calls:
        assert torch.equal(_logits(engine, windows), w8a8)
    assert all(calls[s] > 0 for s in SITES), calls
    for site in SITES:
        with quantized_sites(model, {site}):
            assert not torch.equal(_logits(engine, windows), off), site


def test_unknown_site_is_refused(trained):
    engine = open_engine(trained["ckpt"], "fp8", SEQ, 1)
    with pytest.raises(ValueError, match="unknown sites"):
        with quantized_sites(engine.runner.model, {"lm_head"}):
            pass


def test_corpus_split_is_by_file_and_windows_are_held_out():
    corpus = load_corpus(300, max_files=20)
    assert corpus.files == (19, 1)
    windows = corpus.windows(3, 32)
    assert [len(w) for w in windows] == [32, 32, 32]
    assert windows[0] == corpus.held_out[:32].tolist()
    assert windows[-1] == corpus.held_out[-32:].tolist()
    with pytest.raises(ValueError, match="held-out text"):
        corpus.windows(1, len(corpus.held_out) + 1)

