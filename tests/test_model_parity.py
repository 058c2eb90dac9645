"""Same logits and greedy tokens as HuggingFace transformers on the same random weights."""

from __future__ import annotations

import json

import pytest
import torch

from moeserve.common.model_config import load_model_config
from moeserve.common.sampling import SamplingParams
from moeserve.worker.config import EngineConfig
from moeserve.worker.engine import LLMEngine
from moeserve.worker.model import AttentionMetadata, DeepseekForCausalLM
from moeserve.worker.weights import load_checkpoint

transformers = pytest.importorskip("transformers")

# float32 end to end; differences come from summation order only.
LOGIT_ATOL = 1e-4


def _hf_model(path):
    return transformers.AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, attn_implementation="eager"
    ).eval()


def _prompt(n: int, seed: int = 0) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(2, 380, (n,), generator=g).tolist()


def _our_logits(path, impl: str, ids: list[int], block_size: int = 8) -> torch.Tensor:
    cfg = load_model_config(path)
    model = DeepseekForCausalLM(cfg, mla_impl=impl, max_positions=512)
    load_checkpoint(model, path)
    num_blocks = -(-len(ids) // block_size)
    # Non-contiguous, shuffled block ids: the block table must really be followed.
    table = list(range(2 * num_blocks, 0, -2))
    cache = torch.zeros(2 * num_blocks + 1, cfg.num_hidden_layers, block_size, cfg.kv_dim)
    meta, pos = AttentionMetadata.build([table], [0], [len(ids)], block_size)
    with torch.no_grad():
        return model.compute_logits(model(torch.tensor(ids), pos, cache, meta))


@pytest.mark.parametrize("ckpt", ["tiny_v3", "tiny_v2"])
@pytest.mark.parametrize("impl", ["absorbed", "naive"])
def test_logits_match_transformers(ckpt, impl, request):
    path = request.getfixturevalue(ckpt)
    ids = _prompt(45)
    with torch.no_grad():
        ref = _hf_model(path)(torch.tensor([ids])).logits[0]
    ours = _our_logits(path, impl, ids)
    assert ref.abs().max() > 1.0  # logits are not trivially small
    torch.testing.assert_close(ours, ref, atol=LOGIT_ATOL, rtol=0)


@pytest.mark.parametrize("ckpt", ["tiny_v3", "tiny_v2"])
def test_greedy_tokens_match_transformers(ckpt, request):
    path = request.getfixturevalue(ckpt)
    prompts = [_prompt(13, seed=1), _prompt(30, seed=2)]
    hf = _hf_model(path)
    engine = LLMEngine(EngineConfig(model=str(path), block_size=8, num_kv_blocks=64))
    ours = engine.generate(prompts, SamplingParams(max_tokens=20, temperature=0, ignore_eos=True))
    for prompt, got in zip(prompts, ours, strict=True):
        with torch.no_grad():
            out = hf.generate(torch.tensor([prompt]), max_new_tokens=20, do_sample=False,
                              eos_token_id=None, pad_token_id=0)
        assert got == out[0, len(prompt):].tolist()


def test_both_config_layouts_read_alike(tmp_path, tiny_v3):
    """DeepSeek's release config.json and transformers 5's rope_parameters layout."""
    raw = json.loads((tiny_v3 / "config.json").read_text())
    scaling = dict(raw.pop("rope_scaling"))
    scaling["rope_type"] = scaling.pop("type")
    raw["rope_parameters"] = {"rope_theta": raw.pop("rope_theta"), **scaling}
    (tmp_path / "config.json").write_text(json.dumps(raw))
    assert load_model_config(tmp_path) == load_model_config(tiny_v3)
    assert load_model_config(tmp_path).rope.type == "yarn"
