"""Injected faults on CPU: a hanging prefill worker, a stalled KV transfer, and a prefill worker
whose KV layout does not match (block size). Requests complete through the fallbacks within the
phase deadlines with the uninterrupted run's tokens; the mismatched pair is refused by name.
"""

from __future__ import annotations

import time
from pathlib import Path

import grpc
import httpx
import pytest

from moeserve.api import common_pb2, worker_pb2, worker_pb2_grpc
from moeserve.deploy.local import ClusterSpec, LocalCluster
from tests.reliability_helpers import classify, metric, prompt_ids, reference_tokens, stream_tokens

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

MAX_TOKENS = 12
PREFILL_TIMEOUT_S = 2.0
KV_TIMEOUT_S = 1.0


@pytest.fixture(scope="module")
def cluster(model_dir: Path):
    spec = ClusterSpec(
        model=str(model_dir), prefill=3, decode=1, port=0, num_kv_blocks=96, metrics=True,
        child_env={"prefill-0": {"MOESERVE_FAULTS": "stall_prefill_s=600"}},
        child_args={
            "prefill-2": ["--block-size", "32"],
            "decode-0": ["--faults", "stall_transfer_s=600", "--kv-timeout-s", str(KV_TIMEOUT_S)],
            "router": ["--policy", "round_robin", "--prefill-timeout-s", str(PREFILL_TIMEOUT_S)],
        },
    )  # fmt: skip
    with LocalCluster(spec, log=None) as c:
        yield c


def test_hanging_prefill_and_stalled_transfer_fall_back_in_time(cluster, model_dir) -> None:
    prompts = [prompt_ids(100 + i, 100) for i in range(4)]
    want = reference_tokens(str(model_dir), prompts, MAX_TOKENS)
    budget = PREFILL_TIMEOUT_S + KV_TIMEOUT_S + 15.0  # both fallbacks plus a slow CPU's compute
    for prompt, expected in zip(prompts, want, strict=True):
        out = stream_tokens(cluster.url, prompt, MAX_TOKENS, timeout_s=60)
        assert classify(out, expected) == "ok", out.error
        assert out.latency_s < budget
    url = f"{cluster.url}/metrics"
    assert metric(url, "moeserve:router_phase_timeouts_total", 'phase="prefill"') >= 1
    assert metric(url, "moeserve:router_handoff_retries_total", 'phase="prefill"') >= 1
    decode_metrics = cluster.worker("decode-0").metrics
    assert metric(decode_metrics, "moeserve:kv_transfer_failures_total") >= 1
    status = httpx.get(f"{cluster.url}/v1/status", timeout=5).json()
    hung = next(w for w in status["workers"] if w["address"] == cluster.worker("prefill-0").address)
    assert hung["ejections"] >= 1 and "prefill" in hung["last_error"]


def test_mismatched_pair_refused_by_name(cluster, model_dir) -> None:
    bad, decode = cluster.worker("prefill-2").address, cluster.worker("decode-0").address
    # Compatible pairs serve; routing this request compares every candidate pair, which is
    # when the router records the mismatched one.
    prompt = prompt_ids(7, 80)
    want = reference_tokens(str(model_dir), [prompt], MAX_TOKENS)[0]
    assert classify(stream_tokens(cluster.url, prompt, MAX_TOKENS), want) == "ok"
    status = httpx.get(f"{cluster.url}/v1/status", timeout=5).json()
    pairs = {(p["prefill"], p["decode"]): p["reason"] for p in status["incompatible_pairs"]}
    assert "block_size: ours=64 theirs=32" in pairs[(bad, decode)]
    # The decode worker itself refuses the KV by name when handed it anyway.
    meta = cluster.auth_metadata()  # the router's worker-plane token
    with grpc.insecure_channel(bad) as pc, grpc.insecure_channel(decode) as dc:
        sampling = common_pb2.SamplingParams(max_tokens=4, temperature=0.0)
        # Issued to this decode worker, as the router does: a handle for anyone else is
        # foreign there (refused without a claim, and so never released by it).
        agent = worker_pb2_grpc.WorkerStub(dc).GetNixlMetadata(
            worker_pb2.GetNixlMetadataRequest(), metadata=meta, timeout=10).agent_name
        pre = worker_pb2_grpc.WorkerStub(pc).Prefill(worker_pb2.PrefillRequest(
            request_id="mismatch-1", prompt_token_ids=prompt, sampling=sampling,
            decode_agent=agent), metadata=meta, timeout=30)
        req = worker_pb2.WorkerGenerateRequest(
            request_id="mismatch-1", prompt_token_ids=prompt, sampling=sampling,
            kv_handle=pre.kv_handle, first_token_id=pre.first_token_id,
        )  # fmt: skip
        with pytest.raises(grpc.RpcError) as info:
            list(worker_pb2_grpc.WorkerStub(dc).Generate(req, metadata=meta, timeout=30))
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "block_size: ours=64 theirs=32" in info.value.details()
    # The refusal released the prefill worker's pinned blocks (no lease left to expire).
    deadline = time.monotonic() + 5
    while metric(cluster.worker("prefill-2").metrics, "moeserve:kv_pinned_leases") > 0:
        assert time.monotonic() < deadline
        time.sleep(0.1)
