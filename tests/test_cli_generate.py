"""`moeserve generate` and `moeserve make-checkpoint` as a user runs them."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

from moeserve.common.sampling import SamplingParams
from moeserve.worker.config import EngineConfig
from moeserve.worker.engine import LLMEngine


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "moeserve.cli", *args, "--log-level", "WARNING"],
                          capture_output=True, text=True, timeout=120)


def test_make_checkpoint_is_deterministic_and_hf_layout(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for out in (a, b):
        r = _run("make-checkpoint", "--preset", "tiny", "--out", str(out), "--seed", "3")
        assert r.returncode == 0, r.stderr
    for name in ("config.json", "model.safetensors.index.json", "tokenizer.json",
                 "tokenizer_config.json", "model-00001-of-00001.safetensors"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    index = json.loads((a / "model.safetensors.index.json").read_text())
    assert "model.layers.2.mlp.experts.7.down_proj.weight" in index["weight_map"]
    assert "model.layers.0.mlp.gate_proj.weight" in index["weight_map"]  # dense first layer


def test_generate_json_matches_engine(tiny_v3):
    r = _run("generate", "--model", str(tiny_v3), "--prompt-token-ids", "5,6,7",
             "--prompt-token-ids", "9,10", "--max-tokens", "6", "--ignore-eos", "--json")
    assert r.returncode == 0, r.stderr
    records = [json.loads(line) for line in r.stdout.splitlines()]
    engine = LLMEngine(EngineConfig(model=str(tiny_v3)))
    ref = engine.generate([[5, 6, 7], [9, 10]],
                          SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))
    assert [rec["token_ids"] for rec in records] == ref
    assert all(isinstance(rec["text"], str) for rec in records)


def test_generate_text_prompt(tiny_v3):
    r = _run("generate", "--model", str(tiny_v3), "--prompt", "Hello, world", "--json",
             "--max-tokens", "4", "--ignore-eos")
    assert r.returncode == 0, r.stderr
    rec = json.loads(r.stdout)
    assert len(rec["token_ids"]) == 4 and rec["prompt_token_ids"]


def test_token_ids_work_without_a_tokenizer(tmp_path, tiny_v3):
    path = tmp_path / "m"
    shutil.copytree(tiny_v3, path)
    (path / "tokenizer.json").unlink()
    r = _run("generate", "--model", str(path), "--prompt-token-ids", "5,6", "--json",
             "--max-tokens", "3")
    assert r.returncode == 0, r.stderr
    assert "text" not in json.loads(r.stdout)
    r = _run("generate", "--model", str(path), "--prompt", "hi")
    assert r.returncode == 2
    assert "no tokenizer.json" in r.stderr and "Traceback" not in r.stderr


def test_bad_flags_are_named_without_traceback(tiny_v3):
    r = _run("generate", "--model", str(tiny_v3), "--prompt-token-ids", "5,x")
    assert r.returncode == 2 and "--prompt-token-ids must be comma-separated" in r.stderr
    r = _run("generate", "--model", str(tiny_v3), "--prompt-token-ids", "5", "--top-p", "2")
    assert r.returncode == 2 and "top_p" in r.stderr and "Traceback" not in r.stderr
