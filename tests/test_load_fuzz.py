"""Load-time fuzz: every damaged checkpoint file is a named error (CheckpointError /
ConfigError naming the file or field), never a raw json / safetensors / tokenizers exception.

Complements tests/test_engine_errors.py (missing and truncated shards, one mistyped field).
"""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moeserve.common.errors import CheckpointError, ConfigError
from moeserve.common.model_config import load_model_config
from moeserve.router.tokenizer import load_tokenizer
from moeserve.worker.config import EngineConfig
from moeserve.worker.engine import LLMEngine

pytestmark = pytest.mark.timeout(120)
SHARD = "model-00001-of-00001.safetensors"


@pytest.fixture()
def ckpt(tmp_path: Path, tiny_v3: Path) -> Path:
    return Path(shutil.copytree(tiny_v3, tmp_path / "m"))


@pytest.mark.parametrize("content", [b"", b"{", b"\xff\xfe\x00", b"[1, 2]", b'{"model": 3}',
                                     b'{"version": "1.0", "model": {"type": "Nope"}}'])
def test_tokenizer_file_that_does_not_parse_is_named(ckpt: Path, content: bytes) -> None:
    (ckpt / "tokenizer.json").write_bytes(content)
    with pytest.raises(CheckpointError, match="tokenizer.json"):
        load_tokenizer(ckpt)


@pytest.mark.parametrize("content", [b"{not json", b"[]", b"\xff"])
def test_tokenizer_config_that_does_not_parse_is_named(ckpt: Path, content: bytes) -> None:
    (ckpt / "tokenizer_config.json").write_bytes(content)
    with pytest.raises(CheckpointError, match="tokenizer_config.json"):
        load_tokenizer(ckpt)


def _shard_header(path: Path, header: bytes) -> None:
    """Replace the shard's JSON header (8-byte little-endian length, then JSON)."""
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    path.write_bytes(struct.pack("<Q", len(header)) + header + data[8 + n:])


@pytest.mark.parametrize("damage", ["huge length", "garbage header", "bad offsets", "bad dtype",
                                    "zeros"])  # fmt: skip
def test_corrupt_shard_is_named(ckpt: Path, damage: str) -> None:
    shard = ckpt / SHARD
    data = shard.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    name = next(k for k in header if k != "__metadata__")
    if damage == "huge length":
        shard.write_bytes(struct.pack("<Q", 1 << 60) + data[8:])
    elif damage == "garbage header":
        _shard_header(shard, b"\x00not json at all" + b" " * 32)
    elif damage == "bad offsets":
        header[name]["data_offsets"] = [0, 1 << 40]
        _shard_header(shard, json.dumps(header).encode())
    elif damage == "bad dtype":
        header[name]["dtype"] = "Q7"
        _shard_header(shard, json.dumps(header).encode())
    else:
        shard.write_bytes(b"\x00" * len(data))
    with pytest.raises(CheckpointError, match=SHARD):
        LLMEngine(EngineConfig(model=str(ckpt), num_kv_blocks=16))


_JSON = st.recursive(st.none() | st.booleans() | st.integers(-3, 1 << 40) | st.floats()
                     | st.text(max_size=5), lambda c: st.lists(c, max_size=3)
                     | st.dictionaries(st.text(max_size=5), c, max_size=3), max_leaves=6)


@settings(max_examples=60, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])  # fmt: skip
@given(field=st.sampled_from(["hidden_size", "num_hidden_layers", "vocab_size", "n_routed_experts",
                              "num_experts_per_tok", "kv_lora_rank", "rope_theta", "rms_norm_eps",
                              "rope_scaling", "first_k_dense_replace", "topk_method",
                              "max_position_embeddings", "eos_token_id"]),
       value=_JSON)  # fmt: skip
def test_config_with_wrong_types_is_a_named_error_or_loads(tiny_v3: Path, tmp_path: Path,
                                                           field: str, value: object) -> None:
    cfg = json.loads((tiny_v3 / "config.json").read_text())
    cfg[field] = value
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    try:
        load_model_config(tmp_path)
    except ConfigError as e:
        assert field in str(e) or "rope_scaling" in str(e), (field, value, str(e))


@pytest.mark.parametrize("field,value", [
    ("rope_theta", None), ("rope_theta", "x"), ("rope_theta", True),
    ("rope_scaling", {"type": "yarn", "original_max_position_embeddings": 0}),
])  # fmt: skip
def test_rope_fields_found_by_fuzzing(tiny_v3: Path, tmp_path: Path, field: str,
                                      value: object) -> None:
    """Cases the fuzz test above once drew: null rope_theta loads with the default; the others
    are ConfigErrors naming the field (were TypeError / ZeroDivisionError)."""
    cfg = json.loads((tiny_v3 / "config.json").read_text())
    cfg[field] = value
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    if value is None:
        assert load_model_config(tmp_path).rope.theta == 10000.0
        return
    with pytest.raises(ConfigError, match=field):
        load_model_config(tmp_path)
