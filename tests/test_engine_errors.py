"""Bad input gets an error that names the problem; the engine keeps serving others."""

from __future__ import annotations

import json
import math
import shutil

import pytest

from moeserve.common.errors import CheckpointError, ConfigError, InvalidRequestError
from moeserve.common.sampling import SamplingParams
from moeserve.worker.config import EngineConfig
from moeserve.worker.engine import LLMEngine

GREEDY = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)


@pytest.fixture()
def engine(tiny_v3) -> LLMEngine:
    return LLMEngine(EngineConfig(model=str(tiny_v3), block_size=4, num_kv_blocks=64,
                                  max_model_len=64))


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _edit_config(path, **changes):
    cfg = json.loads((path / "config.json").read_text())
    for k, v in changes.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    (path / "config.json").write_text(json.dumps(cfg))


def test_unsupported_architecture(tmp_path, tiny_v3):
    path = _copy(tiny_v3, tmp_path / "m")
    _edit_config(path, architectures=["LlamaForCausalLM"])
    with pytest.raises(ConfigError, match="unsupported architecture 'LlamaForCausalLM'"):
        LLMEngine(EngineConfig(model=str(path)))


def test_missing_config_field(tmp_path, tiny_v3):
    path = _copy(tiny_v3, tmp_path / "m")
    _edit_config(path, kv_lora_rank=None)
    with pytest.raises(ConfigError, match="missing required field 'kv_lora_rank'"):
        LLMEngine(EngineConfig(model=str(path)))


def test_wrongly_typed_config_field(tmp_path, tiny_v3):
    path = _copy(tiny_v3, tmp_path / "m")
    _edit_config(path, hidden_size="64")
    with pytest.raises(ConfigError, match="'hidden_size' must be an integer"):
        LLMEngine(EngineConfig(model=str(path)))


def test_missing_shard_names_the_file(tmp_path, tiny_v3):
    path = _copy(tiny_v3, tmp_path / "m")
    (path / "model-00001-of-00001.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model-00001-of-00001.safetensors"):
        LLMEngine(EngineConfig(model=str(path)))


def test_truncated_shard_names_the_file(tmp_path, tiny_v3):
    path = _copy(tiny_v3, tmp_path / "m")
    shard = path / "model-00001-of-00001.safetensors"
    shard.write_bytes(shard.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="model-00001-of-00001.safetensors"):
        LLMEngine(EngineConfig(model=str(path)))


def test_missing_tensor_is_named(tmp_path, tiny_v3):
    path = _copy(tiny_v3, tmp_path / "m")
    index = json.loads((path / "model.safetensors.index.json").read_text())
    from safetensors.torch import load_file, save_file

    shard = path / "model-00001-of-00001.safetensors"
    tensors = load_file(str(shard))
    del tensors["model.layers.1.mlp.experts.3.up_proj.weight"]
    save_file(tensors, str(shard))
    del index["weight_map"]["model.layers.1.mlp.experts.3.up_proj.weight"]
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.mlp\.experts\.3\.up_proj"):
        LLMEngine(EngineConfig(model=str(path)))


def test_prompt_longer_than_context(engine):
    with pytest.raises(InvalidRequestError, match="maximum context length is 64") as e:
        engine.add_request("long", list(range(2, 70)), GREEDY)
    assert e.value.param == "prompt"
    with pytest.raises(InvalidRequestError, match="60 prompt \\+ 10 max_tokens") as e:
        engine.add_request("long2", list(range(2, 62)),
                           SamplingParams(max_tokens=10, temperature=0))
    assert e.value.param == "max_tokens"


@pytest.mark.parametrize(
    "kwargs, param",
    [
        ({"max_tokens": -1}, "max_tokens"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"temperature": math.nan}, "temperature"),
        ({"top_k": -5}, "top_k"),
    ],
)
def test_invalid_sampling_values(kwargs, param):
    with pytest.raises(InvalidRequestError) as e:
        SamplingParams(**kwargs)
    assert e.value.param == param
    assert param in str(e.value)


def test_unknown_token_ids(engine):
    with pytest.raises(InvalidRequestError, match="token id 512 is outside the vocabulary"):
        engine.add_request("bad", [5, 512], GREEDY)
    with pytest.raises(InvalidRequestError, match="token id -1"):
        engine.add_request("neg", [-1], GREEDY)
    with pytest.raises(InvalidRequestError, match="at least one token"):
        engine.add_request("empty", [], GREEDY)


def test_bad_requests_do_not_disturb_others(engine, tiny_v3):
    ref = LLMEngine(EngineConfig(model=str(tiny_v3), block_size=4, num_kv_blocks=64)).generate(
        [[5, 6, 7], [9, 10, 11, 12]], GREEDY)
    engine.add_request("a", [5, 6, 7], GREEDY)
    engine.step()
    for bad in ([999], [], list(range(2, 100))):
        with pytest.raises(InvalidRequestError):
            engine.add_request("bad", bad, GREEDY)
    engine.add_request("b", [9, 10, 11, 12], GREEDY)
    got: dict[str, list[int]] = {"a": []}
    # the first step's token of "a" was consumed above; rerun from scratch to compare
    while engine.has_unfinished_requests():
        for o in engine.step():
            got.setdefault(o.request_id, []).extend(o.new_token_ids)
    assert got["b"] == ref[1]
    assert got["a"] == ref[0][1:]


def test_cpu_thread_default_is_one_unless_asked(monkeypatch):
    from moeserve.worker.runner import cpu_threads

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert cpu_threads(0) == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert cpu_threads(0) == 3
    assert cpu_threads(2) == 2
