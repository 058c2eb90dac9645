"""One served model name for the same input on every target (moeserve.common.served_name).

Fast: the rule itself, and what each target hands its workers and router for a manifest
(local processes, Ray rank plans, the operator's rendered objects resolved the way the router
and the workers resolve them). Slow: `moeserve up` reporting the name at /v1/models and serving
requests that name it (the Ray counterpart is tests/ray/test_ray_clean_stop.py).
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import yaml

from moeserve.common import spec as s
from moeserve.common.errors import ConfigError
from moeserve.common.served_name import TINY_MODEL_NAME, served_model_name, with_served_name
from moeserve.deploy.manifest_local import cluster_spec_from_manifest, load_manifest
from moeserve.deploy.ray_app import load_deployment, pool_plan
from moeserve.operator.render import render
from moeserve.router.config import resolve_router_config
from moeserve.router.server import add_router_parser
from moeserve.worker.env_defaults import env_defaults

ROOT = Path(__file__).resolve().parents[1]
MANIFEST = ROOT / "examples" / "tiny-cpu.yaml"


def test_rule_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    dep = load_manifest(MANIFEST)
    assert served_model_name("org/x", manifest=dep, model="/m/y") == "org/x"
    assert served_model_name(manifest=dep, model="/m/y") == "moeserve/tiny-deepseek"
    assert served_model_name(model=str(tmp_path / "ckpt" / "deepseek-v3")) == "deepseek-v3"
    # The directory's name, however the path is written.
    (tmp_path / "ckpt").mkdir()
    monkeypatch.chdir(tmp_path)
    assert served_model_name(model="ckpt/") == served_model_name(model=str(tmp_path / "ckpt"))
    assert served_model_name() == TINY_MODEL_NAME


@pytest.mark.parametrize("bad", ["", "   ", "x" * 254])
def test_bad_explicit_name_is_a_config_error(bad: str) -> None:
    with pytest.raises(ConfigError, match="--served-model-name"):
        served_model_name(bad)


def _router_args(config_text: str, tmp_path: Path, *flags: str) -> argparse.Namespace:
    path = tmp_path / "router.yaml"
    path.write_text(config_text)
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    add_router_parser(sub)
    args = parser.parse_args(["router", "--config", str(path), *flags])
    resolve_router_config(args)
    return args


def _worker_model_id(env: dict[str, str]) -> str:
    """The workers' --model-id as `moeserve worker` resolves it from the rendered pod env."""
    return env_defaults(env)["model_id"]


@pytest.mark.parametrize("explicit", [None, "acme/tiny-prod"])
def test_every_target_serves_the_same_name_for_a_manifest(tmp_path: Path, explicit) -> None:
    dep = with_served_name(load_manifest(MANIFEST), explicit)
    want = explicit or "moeserve/tiny-deepseek"
    # Local processes (`up -f FILE --local`): workers get it as --model-id.
    local = cluster_spec_from_manifest(load_manifest(MANIFEST), served_name=explicit)
    assert local.served_model_name == want
    # Ray (`up --ray -f FILE`): the rank plans' model id, i.e. the workers' --model-id.
    ray_dep = with_served_name(load_deployment(str(MANIFEST)), explicit)
    assert {pool_plan(ray_dep, r, "/m").launch.served_name for r in s.ROLES} == {want}
    # Kubernetes: the router's ConfigMap (model.name is its --served-model-name) and the
    # workers' MOESERVE_MODEL, both resolved as the processes resolve them.
    objs = render(dep)
    config = next(o for o in objs if o["kind"] == "ConfigMap" and "router.yaml" in o["data"])
    router = _router_args(config["data"]["router.yaml"], tmp_path)
    assert router.served_model_name == want
    pods = [o["spec"]["template"]["spec"] for o in objs if o["kind"] == "StatefulSet"]
    assert pods
    for pod in pods:
        env = {e["name"]: e["value"] for c in pod["containers"] for e in c.get("env", [])
               if "value" in e}  # fmt: skip
        assert _worker_model_id(env) == want


def test_router_flag_wins_over_its_config_file(tmp_path: Path) -> None:
    text = yaml.safe_dump({"model": {"name": "from-file", "path": "/m"},
                           "workers": {"decode": ["127.0.0.1:1"]}})  # fmt: skip
    assert _router_args(text, tmp_path).served_model_name == "from-file"
    args = _router_args(text, tmp_path, "--served-model-name", "from-flag")
    assert args.served_model_name == "from-flag"


# ------------------------------------------------------------------ end to end


def _up(*argv: str) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "moeserve.cli", "up", "--port", "0", *argv],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
    )  # fmt: skip
    url: list[str] = []
    ready = threading.Event()

    def pump() -> None:
        for line in proc.stdout:
            if line.startswith("moeserve is up: "):
                url.append(line.split()[3])
                ready.set()
        ready.set()

    threading.Thread(target=pump, daemon=True).start()
    if not ready.wait(240) or not url:
        proc.kill()
        raise AssertionError("moeserve up did not come up")
    return proc, url[0]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_up_serves_the_flag_name_and_only_it() -> None:
    proc, url = _up("--served-model-name", "acme/tiny-prod")
    try:
        models = httpx.get(f"{url}/v1/models", timeout=10).json()["data"]
        assert [m["id"] for m in models] == ["acme/tiny-prod"]
        ok = httpx.post(f"{url}/v1/completions", timeout=60, json={
            "model": "acme/tiny-prod", "prompt": "Hello", "max_tokens": 2})  # fmt: skip
        assert ok.status_code == 200 and ok.json()["model"] == "acme/tiny-prod"
        other = httpx.post(f"{url}/v1/completions", timeout=60, json={
            "model": TINY_MODEL_NAME, "prompt": "Hello", "max_tokens": 2})  # fmt: skip
        assert other.status_code == 404
    finally:
        proc.send_signal(signal.SIGTERM)
        start = time.monotonic()
        assert proc.wait(30) == 0 and time.monotonic() - start < 15
