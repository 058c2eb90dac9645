"""A real prefill/decode worker pair on the CPU (NIXL over UCX): a hand-off is timed where it
happens (the decode worker's moeserve:kv_transfer_seconds) and the time travels with the
bytes to the router (WorkerGenerateResponse.kv_transfer_seconds)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import pytest

from moeserve.api import common_pb2, worker_pb2, worker_pb2_grpc

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]
pytest.importorskip("nixl._api")


def _start(model: Path, role: str) -> tuple[subprocess.Popen, str, str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "moeserve.cli", "worker", "--model", str(model), "--role", role,
         "--device", "cpu", "--port", "0", "--metrics-port", "0", "--num-kv-blocks", "64",
         "--nixl", "--insecure-worker-plane"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if m := re.search(r"listening on (\S+) metrics (\S+)", line):
            return proc, m.group(1), m.group(2)
    raise AssertionError("worker did not start:\n" + "".join(lines[-30:]))


@pytest.fixture(scope="module")
def pair(model_dir: Path) -> Iterator[tuple[str, str, str]]:
    procs = []
    try:
        prefill, p_addr, _ = _start(model_dir, "prefill")
        procs.append(prefill)
        decode, d_addr, d_metrics = _start(model_dir, "decode")
        procs.append(decode)
        yield p_addr, d_addr, d_metrics
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(30)


def _histogram_count(url: str, name: str) -> float:
    text = httpx.get(url, timeout=5).text
    m = re.search(rf"^{re.escape(name)}_count (\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def test_a_handoff_is_timed_on_the_decode_worker_and_in_the_stream(pair) -> None:
    p_addr, d_addr, d_metrics = pair
    prompt = [(i * 7919) % 400 + 2 for i in range(150)]  # 3 blocks of 64: a real READ
    sampling = common_pb2.SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)
    before = _histogram_count(d_metrics, "moeserve:kv_transfer_seconds")
    with grpc.insecure_channel(p_addr) as pc, grpc.insecure_channel(d_addr) as dc:
        prefill, decode = worker_pb2_grpc.WorkerStub(pc), worker_pb2_grpc.WorkerStub(dc)
        agent = decode.Health(common_pb2.HealthRequest(), timeout=10).nixl_agent_name
        resp = prefill.Prefill(worker_pb2.PrefillRequest(
            request_id="r1", prompt_token_ids=prompt, sampling=sampling, decode_agent=agent),
            timeout=60)  # fmt: skip
        msgs = list(decode.Generate(worker_pb2.WorkerGenerateRequest(
            request_id="r1", prompt_token_ids=prompt, sampling=sampling,
            kv_handle=resp.kv_handle, first_token_id=resp.first_token_id), timeout=60))
    first = msgs[0]
    assert first.num_transferred_tokens > 0 and first.kv_transfer_bytes > 0
    assert 0 < first.kv_transfer_seconds < 30
    assert all(m.kv_transfer_seconds == 0 for m in msgs[1:])  # counted once per request
    assert _histogram_count(d_metrics, "moeserve:kv_transfer_seconds") == before + 1


def test_the_worker_exports_its_startup_and_no_compilations_after_ready(pair) -> None:
    text = httpx.get(pair[2], timeout=5).text
    for phase in ("load", "capture", "warmup"):
        assert re.search(rf'^moeserve:worker_startup_seconds{{phase="{phase}"}} \S+$', text, re.M)
    counts = re.findall(r'^moeserve:worker_compilations_after_ready_total\{kind="(\w+)"\} (\S+)$',
                        text, re.M)
    assert dict(counts) == {"triton": "0.0", "dynamo": "0.0", "cuda_graph": "0.0"}
