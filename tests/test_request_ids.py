"""Over the router's gRPC API (issue 22): an id a client chooses never reaches or affects
another request. Colliding pairs used to refuse the second request, close and abort the first
one's stream on the worker, and eject the only decode worker (30 s of 503 for everyone).
The router now gives every request its own internal id towards the workers."""

from __future__ import annotations

import threading
from pathlib import Path

import grpc
import httpx
import pytest

from moeserve.api import common_pb2, router_pb2, router_pb2_grpc
from moeserve.deploy.local import ClusterSpec, LocalCluster
from tests.reliability_helpers import classify, prompt_ids, reference_tokens, stream_tokens

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

MAX_TOKENS = 24
PAIRS = 6


@pytest.fixture(scope="module")
def cluster(model_dir: Path):
    spec = ClusterSpec(model=str(model_dir), prefill=0, decode=1, port=0, num_kv_blocks=96,
                       metrics=False, restart=False)  # fmt: skip
    with LocalCluster(spec, log=None) as c:
        yield c


def _generate(stub, rid: str, prompt: list[int], out: dict, key: int) -> None:
    req = router_pb2.GenerateRequest(
        request_id=rid, token_ids=router_pb2.TokenIds(ids=prompt),
        sampling=common_pb2.SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0,
                                           ignore_eos=True),
    )  # fmt: skip
    try:
        msgs = list(stub.Generate(req, timeout=60))
        out[key] = ([t for m in msgs for t in m.token_ids], {m.request_id for m in msgs})
    except grpc.RpcError as e:
        out[key] = (e.code().name, e.details())


def test_colliding_client_ids_never_touch_each_other(cluster, model_dir) -> None:
    prompts = [prompt_ids(300 + i, 40) for i in range(2 * PAIRS)]
    want = reference_tokens(str(model_dir), prompts, MAX_TOKENS)
    out: dict[int, tuple] = {}
    with grpc.insecure_channel(cluster.grpc_address) as ch:
        stub = router_pb2_grpc.RouterStub(ch)
        threads = [threading.Thread(target=_generate, args=(stub, f"client-{i // 2}", p, out, i))
                   for i, p in enumerate(prompts)]  # fmt: skip
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
    for i, expected in enumerate(want):
        assert out[i] == (expected, {f"client-{i // 2}"}), f"request {i}: {out[i]}"
    status = httpx.get(f"{cluster.url}/v1/status", timeout=5).json()
    assert [w["ejections"] for w in status["workers"]] == [0], status["workers"]
    # An unrelated client is served at once (it used to get 503 for 30 s).
    prompt = prompt_ids(999, 40)
    got = stream_tokens(cluster.url, prompt, 8, timeout_s=30)
    assert classify(got, reference_tokens(str(model_dir), [prompt], 8)[0]) == "ok", got.error
