"""The pod contract as processes on loopback: `moeserve worker` configured only through the
operator's MOESERVE_* environment (probed with grpc.health.v1 like the kubelet does), and
`moeserve router --config router.yaml` with static workers serving a completion."""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from moeserve.api import common_pb2, worker_pb2_grpc
from moeserve.common import spec as s
from moeserve.common.worker_auth import HEADER, PlaneSecret

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]


def _start(cmd: list[str], env: dict[str, str], pattern: str,
           timeout_s: float = 90.0) -> tuple[subprocess.Popen, re.Match]:  # fmt: skip
    proc = subprocess.Popen([sys.executable, "-m", "moeserve.cli", *cmd], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # fmt: skip
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(x) for x in proc.stdout], daemon=True).start()
    seen: list[str] = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=0.2)
        except queue.Empty:
            if proc.poll() is not None:
                break
            continue
        seen.append(line)
        if m := re.search(pattern, line):
            return proc, m
    proc.kill()
    raise AssertionError(f"{cmd[0]} did not start:\n{''.join(seen[-30:])}")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_worker_env_and_router_config(tiny_v3: Path, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MOESERVE_")}
    plane = PlaneSecret.generate()  # what the operator's Secret puts in each pod's env
    worker_env = {**env, s.ENV_BLOCK_SIZE: "32", s.ENV_MODEL: "served/tiny", s.ENV_ROLE: "both",
                  s.ENV_LOG_LEVEL: "warning", s.ENV_METRICS_PORT: "0", **plane.worker_env()}
    worker, m = _start(["worker", "--model", str(tiny_v3), "--port", "0", "--no-nixl",
                        "--num-kv-blocks", "64"], worker_env,
                       r"listening on (\S+) metrics http://\S+:(\d+)/metrics")  # fmt: skip
    router = None
    try:
        address = m.group(1)
        assert int(m.group(2)) > 0  # MOESERVE_METRICS_PORT=0: /metrics on a free port
        with grpc.insecure_channel(address) as ch:
            check = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(),
                                                         timeout=10)  # fmt: skip
            assert check.status == health_pb2.HealthCheckResponse.SERVING
            info = worker_pb2_grpc.WorkerStub(ch).Health(
                common_pb2.HealthRequest(), metadata=((HEADER, plane.router_token),), timeout=10)
        assert (info.block_size, info.model_id, info.role) == (32, "served/tiny", "both")

        config = tmp_path / "router.yaml"
        config.write_text(
            f"model: {{name: served/tiny, path: {tiny_v3}, blockSize: 32}}\n"
            "listen: {host: 127.0.0.1, http: 0, grpc: 0}\n"
            f"workers: {{decode: ['{address}']}}\n"
            "maxInflight: 0\n"  # overridden below: a flag wins over the file
            "startupTimeoutS: 60\n"
        )  # fmt: skip
        router, rm = _start(["router", "--config", str(config), "--max-inflight", "8"],
                            {**env, **plane.router_env()}, r"listening on (http://\S+)")
        url = rm.group(1)
        with httpx.Client(timeout=30) as client:
            models = client.get(f"{url}/v1/models").json()
            assert [x["id"] for x in models["data"]] == ["served/tiny"]
            body = {"model": "served/tiny", "prompt": list(range(2, 40)), "max_tokens": 4,
                    "temperature": 0, "ignore_eos": True, "return_token_ids": True}  # fmt: skip
            resp = client.post(f"{url}/v1/completions", json=body)
            assert resp.status_code == 200, resp.text
            assert resp.json()["usage"]["completion_tokens"] == 4
    finally:
        if router is not None:
            _stop(router)
        _stop(worker)
