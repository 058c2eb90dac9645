"""fp8 checkpoints load correctly: the block size comes from config.json, scales are checked
against it, and bad checkpoints fail naming the tensor (issue 19 item 1).

The fp8 checkpoints here are quantized by the test itself, block by block in numpy loops, at
block sizes and dimensions that are not multiples of 128, and every loaded weight is compared
with a dequantization written here, independent of moeserve's."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from moeserve.common.errors import CheckpointError, ConfigError
from moeserve.common.model_config import ModelConfig, load_model_config
from moeserve.common.sampling import SamplingParams
from moeserve.worker.config import EngineConfig
from moeserve.worker.engine import LLMEngine
from moeserve.worker.model import DeepseekForCausalLM
from moeserve.worker.weights import dequantize_fp8_blocks, load_checkpoint
from tests.conftest import make_small_checkpoint

FP8_MAX = 448.0
SKIP = ("embed_tokens", "lm_head", "norm", "mlp.gate.")  # shipped unquantized, as in V3

# Dimensions that are not multiples of the blocks: hidden 200 (columns 128 + 72), the latent
# projection kv_a_proj_with_mqa 136 + 8 = 144 rows (128 + 16, like V3's 576 = 4 x 128 + 64),
# moe_intermediate 96 (routed experts then stay dequantized: a scale row would straddle gate
# and up), q_lora 160.
ODD = {"hidden_size": 200, "intermediate_size": 232, "moe_intermediate_size": 96,
       "q_lora_rank": 160, "kv_lora_rank": 136, "qk_rope_head_dim": 8,
       "qk_nope_head_dim": 16, "v_head_dim": 24, "num_attention_heads": 3,
       "num_key_value_heads": 3}
# Block-aligned where it matters: moe_intermediate 128 (routed experts stay fp8), q_lora 128
# (q_a and kv_a stack with their scales).
ALIGNED = {"hidden_size": 256, "intermediate_size": 256, "moe_intermediate_size": 128,
           "q_lora_rank": 128, "kv_lora_rank": 128, "qk_rope_head_dim": 16}


def quantize_np(w: np.ndarray, block: tuple[int, int]) -> tuple[torch.Tensor, np.ndarray]:
    """Block by block: scale = amax / 448, e4m3 = round(w / scale)."""
    n, k = w.shape
    bn, bk = block
    sn, sk = math.ceil(n / bn), math.ceil(k / bk)
    scales = np.zeros((sn, sk), np.float32)
    scaled = np.zeros_like(w)
    for i in range(sn):
        for j in range(sk):
            tile = w[i * bn:(i + 1) * bn, j * bk:(j + 1) * bk]
            scales[i, j] = max(float(np.abs(tile).max()), 1e-12) / FP8_MAX
            scaled[i * bn:(i + 1) * bn, j * bk:(j + 1) * bk] = tile / scales[i, j]
    return torch.from_numpy(scaled).to(torch.float8_e4m3fn), scales


def dequantize_np(q: torch.Tensor, scales: np.ndarray, block: tuple[int, int]) -> np.ndarray:
    """Element by block: w[r, c] = q[r, c] * scales[r // bn, c // bk]."""
    values = q.float().numpy()
    out = np.empty_like(values)
    bn, bk = block
    for i in range(scales.shape[0]):
        for j in range(scales.shape[1]):
            out[i * bn:(i + 1) * bn, j * bk:(j + 1) * bk] = (
                values[i * bn:(i + 1) * bn, j * bk:(j + 1) * bk] * scales[i, j])
    return out


def quantize_checkpoint(src: Path, block: tuple[int, int] | None) -> Path:
    """Rewrite a float32 checkpoint in place as block-fp8 (DeepSeek's layout: weight e4m3 +
    weight_scale_inv float32, quantization_config in config.json); block None: per-tensor
    style config without weight_block_size (quantized in 128 blocks all the same)."""
    index_path = src / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    for shard in sorted(src.glob("*.safetensors")):
        tensors = load_file(shard)
        out = {}
        for name, t in tensors.items():
            if t.dim() == 2 and name.endswith(".weight") and not any(s in name for s in SKIP):
                q, s = quantize_np(t.float().numpy(), block or (128, 128))
                out[name] = q
                out[name + "_scale_inv"] = torch.from_numpy(s)
                index["weight_map"][name + "_scale_inv"] = shard.name
            else:
                out[name] = t
        save_file(out, str(shard), metadata={"format": "pt"})
    index_path.write_text(json.dumps(index))
    cfg = json.loads((src / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3",
                                  "activation_scheme": "dynamic"}
    if block is not None:
        cfg["quantization_config"]["weight_block_size"] = list(block)
    (src / "config.json").write_text(json.dumps(cfg))
    return src


def dequantized_copy(src: Path, dst: Path) -> Path:
    """The fp8 checkpoint's weights dequantized by `dequantize_np`, as a float32 checkpoint
    without quantization_config (what transformers runs as the reference)."""
    dst.mkdir(parents=True)
    cfg = json.loads((src / "config.json").read_text())
    block = tuple(cfg.pop("quantization_config")["weight_block_size"])
    (dst / "config.json").write_text(json.dumps(cfg))
    tensors: dict[str, torch.Tensor] = {}
    for shard in src.glob("*.safetensors"):
        tensors.update(load_file(shard))
    out = {}
    for name, t in tensors.items():
        if name.endswith("_scale_inv"):
            continue
        if t.dtype == torch.float8_e4m3fn:
            scales = tensors[name + "_scale_inv"].numpy()
            out[name] = torch.from_numpy(dequantize_np(t, scales, block))
        else:
            out[name] = t
    save_file(out, str(dst / "model.safetensors"), metadata={"format": "pt"})
    for f in src.iterdir():
        if f.name.startswith("tokenizer"):
            (dst / f.name).write_bytes(f.read_bytes())
    return dst


def fp8_checkpoint(out: Path, dims: dict, block: tuple[int, int] | None = (128, 128)) -> Path:
    return quantize_checkpoint(make_small_checkpoint(out, "tiny", dims), block)


@pytest.fixture(scope="module")
def odd_fp8(tmp_path_factory) -> Path:
    """Dimensions not multiples of 128, 128x128 blocks."""
    return fp8_checkpoint(tmp_path_factory.mktemp("fp8") / "odd", ODD)


@pytest.fixture(scope="module")
def odd_fp8_small_blocks(tmp_path_factory) -> Path:
    """Non-square 32x64 blocks, several partial: a block size only config.json can tell."""
    return fp8_checkpoint(tmp_path_factory.mktemp("fp8") / "odd32", ODD, (32, 64))


def test_v3_latent_projection_dequantizes_in_128_row_blocks():
    """V3's kv_a_proj_with_mqa: [576, 7168] with 5 x 56 scales. Inferred from the shapes the
    row block would be ceil(576 / 5) = 116; the configured 128 gives a partial last block."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((576, 7168)).astype(np.float32)
    w[128:256] *= 50  # blocks of very different magnitude, so a wrong row block shows
    q, scales = quantize_np(w, (128, 128))
    assert scales.shape == (5, 56)
    got = dequantize_fp8_blocks(q, torch.from_numpy(scales), (128, 128)).numpy()
    np.testing.assert_array_equal(got, dequantize_np(q, scales, (128, 128)))
    # rows 116-127 belong to block 0: scaled with its (small) scale, not block 1's
    np.testing.assert_allclose(got[116:128], w[116:128], rtol=0.07, atol=0.07 * scales[0, 0])


@pytest.mark.parametrize("fixture,block", [("odd_fp8", (128, 128)),
                                           ("odd_fp8_small_blocks", (32, 64))])
def test_loaded_weights_equal_an_independent_dequantization(fixture, block, request):
    path = request.getfixturevalue(fixture)
    cfg = load_model_config(path)
    assert cfg.fp8_block_size == block
    model = DeepseekForCausalLM(cfg, max_positions=64)
    load_checkpoint(model, path)
    tensors: dict[str, torch.Tensor] = {}
    for shard in path.glob("*.safetensors"):
        tensors.update(load_file(shard))
    params = dict(model.named_parameters())
    checked = 0
    for name, t in tensors.items():
        if t.dtype != torch.float8_e4m3fn:
            continue
        want = dequantize_np(t, tensors[name + "_scale_inv"].numpy(), block)
        if ".experts." in name:  # stacked: expert e's gate/up/down are slices of w13 / w2
            prefix, e, proj = name.rsplit(".", 3)[0], int(name.split(".")[-3]), \
                name.split(".")[-2]
            experts = model.get_submodule(prefix)
            inter = experts.intermediate_size
            got = {"gate_proj": experts.w13[e, :inter], "up_proj": experts.w13[e, inter:],
                   "down_proj": experts.w2[e]}[proj]
        else:
            got = params[name]
        np.testing.assert_array_equal(got.detach().numpy(), want, err_msg=name)
        checked += 1
    assert checked > 20


def test_fp8_resident_holds_the_checkpoint_bytes(odd_fp8_small_blocks):
    """fp8 resident: each projection holds the stored e4m3 weight and its float32 scales
    exactly; at 32x64 blocks the moe_intermediate 96 is a multiple of 32, so the routed
    experts stay fp8 here too."""
    path = odd_fp8_small_blocks
    model = DeepseekForCausalLM(load_model_config(path), max_positions=64, fp8=True)
    load_checkpoint(model, path)
    tensors: dict[str, torch.Tensor] = {}
    for shard in path.glob("*.safetensors"):
        tensors.update(load_file(shard))
    params = dict(model.named_parameters())
    attn = "model.layers.1.self_attn.kv_a_proj_with_mqa."
    assert params[attn + "weight"].dtype == torch.float8_e4m3fn
    assert torch.equal(params[attn + "weight"].view(torch.uint8),
                       tensors[attn + "weight"].view(torch.uint8))
    assert torch.equal(params[attn + "weight_scale_inv"], tensors[attn + "weight_scale_inv"])
    experts = model.get_submodule("model.layers.2.mlp.experts")
    down = "model.layers.2.mlp.experts.5.down_proj."
    assert torch.equal(experts.w2[5].view(torch.uint8), tensors[down + "weight"].view(torch.uint8))
    assert torch.equal(experts.w2_scale[5], tensors[down + "weight_scale_inv"])
    up = "model.layers.2.mlp.experts.3.up_proj.weight_scale_inv"
    assert torch.equal(experts.w13_scale[3, experts.w13_scale.shape[1] // 2:], tensors[up])


def test_exact_path_greedy_tokens_equal_transformers(odd_fp8, tmp_path):
    """--quantization dequant: the same greedy tokens as transformers' DeepseekV3ForCausalLM
    on the weights dequantized by the test (float32 both)."""
    transformers = pytest.importorskip("transformers")
    ref_dir = dequantized_copy(odd_fp8, tmp_path / "dequantized")
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        ref_dir, dtype=torch.float32, attn_implementation="eager").eval()
    engine = LLMEngine(EngineConfig(model=str(odd_fp8), block_size=8, num_kv_blocks=64,
                                    quantization="dequant"))
    prompts = [[5, 17, 300, 42, 9, 81, 200], list(range(30, 58))]
    ours = engine.generate(prompts, SamplingParams(max_tokens=16, temperature=0,
                                                   ignore_eos=True))
    for prompt, got in zip(prompts, ours, strict=True):
        with torch.no_grad():
            out = hf.generate(torch.tensor([prompt]), max_new_tokens=16, do_sample=False,
                              eos_token_id=None, pad_token_id=0)
        assert got == out[0, len(prompt):].tolist()


# --- bad input: named errors at load, never wrong output ---------------------------------

def _config(quant: dict | None) -> dict:
    from moeserve.worker.checkpoint import preset_config

    cfg = preset_config("tiny")
    if quant is not None:
        cfg["quantization_config"] = quant
    return cfg


@pytest.mark.parametrize("quant,words", [
    ({"quant_method": "fp8", "fmt": "e4m3"}, "'quantization_config.weight_block_size' is "
     "missing"),
    ({"quant_method": "awq", "weight_block_size": [128, 128]}, "quant_method' is 'awq'"),
    ({"quant_method": "fp8", "fmt": "e5m2", "weight_block_size": [128, 128]}, "fmt' is 'e5m2'"),
    ({"quant_method": "fp8", "weight_block_size": [128]}, "two positive integers"),
    ({"quant_method": "fp8", "weight_block_size": [128, 0]}, "two positive integers"),
])
def test_quantization_config_errors_name_the_field(quant, words):
    with pytest.raises(ConfigError, match=words.replace("(", r"\(")):
        ModelConfig.from_dict(_config(quant))


def test_block_size_the_kernels_cannot_run_is_refused_for_fp8_only():
    cfg = ModelConfig.from_dict(_config({"quant_method": "fp8", "fmt": "e4m3",
                                         "weight_block_size": [96, 128]}))
    with pytest.raises(ConfigError, match=r"weight_block_size' \[96, 128\] is not supported.*"
                                          "--quantization dequant"):
        DeepseekForCausalLM(cfg, max_positions=8, fp8=True)
    DeepseekForCausalLM(cfg, max_positions=8)  # the dequantized path takes any block


def _edit_tensor(path: Path, name: str, fn) -> None:
    index = json.loads((path / "model.safetensors.index.json").read_text())
    shard = path / index["weight_map"][name]
    tensors = load_file(shard)
    result = fn(tensors)
    save_file(tensors if result is None else result, str(shard), metadata={"format": "pt"})


@pytest.fixture
def broken(odd_fp8, tmp_path) -> Path:
    """A fresh copy of the odd-dims fp8 checkpoint to damage."""
    import shutil

    return Path(shutil.copytree(odd_fp8, tmp_path / "broken"))


KV_A = "model.layers.1.self_attn.kv_a_proj_with_mqa.weight"
EXPERT = "model.layers.2.mlp.experts.4.down_proj.weight"


@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("damage,words", [
    ("drop_scale", f"fp8 tensor '{KV_A}' has no scale '{KV_A}_scale_inv'"),
    ("wrong_rows", re.escape(f"scale '{KV_A}_scale_inv' has shape (1, 2); weight '{KV_A}' "
                             "[144, 200] in 128x128 blocks") + r".* needs \(2, 2\)"),
    ("nan_scale", "finite"),
    ("bf16_weight_with_scale", f"'{KV_A}' is bfloat16 but has a scale"),
])
def test_damaged_scales_fail_naming_the_tensor(broken, damage, words, fp8):
    def edit(t):
        scale = KV_A + "_scale_inv"
        if damage == "drop_scale":
            del t[scale]
        elif damage == "wrong_rows":
            t[scale] = t[scale][:1].contiguous()
        elif damage == "nan_scale":
            t[scale][0, 0] = float("nan")
        else:
            t[KV_A] = t[KV_A].float().bfloat16()

    _edit_tensor(broken, KV_A, edit)
    if damage == "drop_scale":
        index_path = broken / "model.safetensors.index.json"
        index = json.loads(index_path.read_text())
        del index["weight_map"][KV_A + "_scale_inv"]
        index_path.write_text(json.dumps(index))
    model = DeepseekForCausalLM(load_model_config(broken), max_positions=8, fp8=fp8)
    with pytest.raises(CheckpointError, match=words):
        load_checkpoint(model, broken)


def test_expert_scale_of_the_wrong_shape_names_the_expert(broken):
    def edit(t):
        t[EXPERT + "_scale_inv"] = torch.ones(3, 3)

    _edit_tensor(broken, EXPERT, edit)
    model = DeepseekForCausalLM(load_model_config(broken), max_positions=8, fp8=True)
    with pytest.raises(CheckpointError, match=f"scale '{EXPERT}_scale_inv' has shape"):
        load_checkpoint(model, broken)


def test_unquantized_tensor_where_fp8_is_held_is_refused(broken):
    """A float tensor into an fp8 parameter would be rounded to e4m3 with no scale."""
    def edit(t):
        t[KV_A] = t[KV_A].float()
        del t[KV_A + "_scale_inv"]

    _edit_tensor(broken, KV_A, edit)
    index_path = broken / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    del index["weight_map"][KV_A + "_scale_inv"]
    index_path.write_text(json.dumps(index))
    model = DeepseekForCausalLM(load_model_config(broken), max_positions=8, fp8=True)
    with pytest.raises(CheckpointError, match=f"'{KV_A}' is float32 where the model holds "
                                              "float8_e4m3fn"):
        load_checkpoint(model, broken)


def test_fp8_tensor_without_quantization_config(broken):
    cfg_path = broken / "config.json"
    cfg = json.loads(cfg_path.read_text())
    del cfg["quantization_config"]
    cfg_path.write_text(json.dumps(cfg))
    model = DeepseekForCausalLM(load_model_config(broken), max_positions=8)
    with pytest.raises(CheckpointError, match="is float8_e4m3fn but config.json has no "
                                              "quantization_config"):
        load_checkpoint(model, broken)


def test_quantization_flag(tiny_v3, odd_fp8):
    with pytest.raises(ValueError, match="quantization must be auto, fp8 or dequant"):
        EngineConfig(model=str(odd_fp8), quantization="int4")
    with pytest.raises(ValueError, match="needs an fp8 checkpoint"):
        LLMEngine(EngineConfig(model=str(tiny_v3), num_kv_blocks=8, quantization="fp8"))
    # auto on the CPU: the exact path (W8A8 runs on the CPU only when asked for)
    engine = LLMEngine(EngineConfig(model=str(odd_fp8), num_kv_blocks=8))
    assert not engine.runner.fp8
    assert all(p.dtype != torch.float8_e4m3fn for p in engine.runner.model.parameters())
