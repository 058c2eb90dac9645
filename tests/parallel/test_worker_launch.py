"""`moeserve worker --dp 2 --ep 2`: two rank processes, each its own gRPC endpoint (base port +
rank), serving in lockstep; a request to one rank while the other idles."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import grpc
import pytest

from moeserve.api import common_pb2, worker_pb2, worker_pb2_grpc
from moeserve.common.worker_auth import HEADER, PlaneSecret
from tests.parallel import ep_harness as h

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]
PLANE = PlaneSecret.generate()  # every rank process gets the tokens from the environment


def _generate(port: int, prompt: list[int], max_tokens: int) -> list[int]:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = worker_pb2_grpc.WorkerStub(channel)
        req = worker_pb2.WorkerGenerateRequest(
            request_id=f"r{port}", prompt_token_ids=prompt,
            sampling=common_pb2.SamplingParams(max_tokens=max_tokens, temperature=0.0,
                                               ignore_eos=True))
        tokens: list[int] = []
        meta = ((HEADER, PLANE.router_token),)
        for resp in stub.Generate(req, metadata=meta, timeout=60):
            tokens.extend(resp.token_ids)
        return tokens


def test_worker_ranks_serve_on_their_own_ports(tiny_v3):
    port = h.free_port()
    cmd = [sys.executable, "-m", "moeserve.cli", "worker", "--model", str(tiny_v3),
           "--dp", "2", "--ep", "2", "--port", str(port), "--no-nixl",
           "--num-kv-blocks", "64", "--block-size", "16"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, **PLANE.worker_env()}, start_new_session=True)
    try:
        listening = []
        deadline = time.monotonic() + 60
        while len(listening) < 2 and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            if "listening on" in line:
                listening.append(line.strip().rsplit(":", 1)[1].split()[0])
        assert sorted(int(p) for p in listening) == [port, port + 1]
        ref = h.reference(str(tiny_v3), [0])[0]
        # rank 1 alone has work; rank 0 must keep stepping for its experts
        assert _generate(port + 1, h.PROMPTS[0], h.MAX_TOKENS[0]) == ref
        assert _generate(port, h.PROMPTS[0], h.MAX_TOKENS[0]) == ref
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            raise
