"""`moeserve up -f FILE --local`: a manifest's topology as local processes."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from moeserve.cli import build_parser
from moeserve.common import spec as s
from moeserve.common.errors import ConfigError
from moeserve.common.spec import SpecError
from moeserve.deploy.local import local_launch
from moeserve.deploy.manifest_local import cluster_spec_from_manifest, load_manifest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_tiny_manifest_becomes_pools_with_their_parallelism():
    spec = cluster_spec_from_manifest(load_manifest(EXAMPLES / "tiny-cpu.yaml"))
    assert (spec.prefill, spec.decode) == (1, 1)
    assert spec.role_ranks == {"prefill": 1, "decode": 2}
    assert spec.model is None  # preset tiny: the embedded model
    for role in ("prefill", "decode"):  # every flag exists on the real CLI
        launch = local_launch(spec, role, 0, "m")
        ns = build_parser().parse_args(launch.argv)
        assert ns.ep == spec.role_ranks[role] and ns.role == role
        assert launch.env[s.ENV_RANKS_PER_POD] == str(ns.ep)  # the whole group in one child


def test_cluster_volume_needs_a_local_model(tmp_path):
    dep = load_manifest(EXAMPLES / "deepseek-v3-wide-ep.yaml")
    with pytest.raises(ConfigError, match="pvc"):
        cluster_spec_from_manifest(dep)
    spec = cluster_spec_from_manifest(dep, model=str(tmp_path))
    assert spec.model == str(tmp_path) and spec.role_ranks["decode"] == 32


def test_bad_manifests_are_named(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("kind: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_manifest(bad)
    with pytest.raises(ConfigError, match="cannot read manifest"):
        load_manifest(tmp_path / "missing.yaml")
    bad.write_text((EXAMPLES / "tiny-cpu.yaml").read_text().replace("ep: 2", "ep: 0"))
    with pytest.raises(SpecError, match=r"spec\.decode\.parallelism\.ep"):
        load_manifest(bad)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_up_from_tiny_manifest_serves(tiny_v3):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "moeserve.cli", "up", "-f", str(EXAMPLES / "tiny-cpu.yaml"),
         "--local", "--model", str(tiny_v3), "--port", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
        start_new_session=True,
    )
    try:
        url, deadline = None, time.monotonic() + 240
        while url is None and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            m = re.search(r"moeserve is up: (\S+)", line)
            url = m.group(1) if m else None
        assert url, "moeserve up -f did not come up"
        status = httpx.get(f"{url}/v1/status", timeout=10).json()
        decode = [w for w in status["workers"] if "decode" in w["roles"]]
        assert len(decode) == 2  # the decode EP group's two DP ranks, each routable
        model = httpx.get(f"{url}/v1/models", timeout=10).json()["data"][0]["id"]
        body = {"model": model, "prompt": [5, 6, 7, 8], "max_tokens": 4, "temperature": 0}
        r = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] == 4
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
