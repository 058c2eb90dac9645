"""Issue 22 (b): streams cut by the router's shutdown end with an error naming it.

Was: a client streaming Generate over the router's gRPC API when the router got SIGTERM (and its
drain grace ran out) saw the call end with no status naming why. Now gRPC streams end with
UNAVAILABLE "the router shut down during this request; retry it", and SSE streams with their
in-band error event and [DONE], at the same moment. Live processes: `moeserve up` with a decode
worker whose streams stall after their first message, so both requests are mid-stream when the
router is stopped.
"""

from __future__ import annotations

import json
import signal
import threading
import time

import grpc
import httpx
import pytest

from moeserve.api import common_pb2, router_pb2, router_pb2_grpc
from moeserve.deploy.local import ClusterSpec, LocalCluster

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

PROMPT = [(i * 7919) % 500 + 2 for i in range(20)]


def test_streams_cut_by_sigterm_end_with_an_error_naming_the_shutdown(model_dir) -> None:
    spec = ClusterSpec(model=str(model_dir), port=0, prefill=0, decode=1, restart=False,
                       metrics=False, child_args={"decode-0": ["--faults", "stall_stream_after=1"]},
                       router_args=["--drain-grace-s", "1"])  # fmt: skip
    with LocalCluster(spec, log=None) as cluster:
        sse: list[str] = []
        first_sse = threading.Event()

        def http_stream() -> None:
            body = {"prompt": PROMPT, "max_tokens": 50, "stream": True, "ignore_eos": True}
            with httpx.stream("POST", f"{cluster.url}/v1/completions", json=body,
                              timeout=60) as resp:  # fmt: skip
                for line in resp.iter_lines():
                    if line.startswith("data: "):
                        sse.append(line[len("data: "):])
                        first_sse.set()

        reader = threading.Thread(target=http_stream, daemon=True)
        reader.start()
        with grpc.insecure_channel(cluster.grpc_address) as ch:
            call = router_pb2_grpc.RouterStub(ch).Generate(router_pb2.GenerateRequest(
                token_ids=router_pb2.TokenIds(ids=PROMPT),
                sampling=common_pb2.SamplingParams(max_tokens=50, ignore_eos=True)), timeout=60)
            first = next(call)
            assert first.token_ids and not first.finished
            assert first_sse.wait(30)
            router = cluster.worker("router")
            started = time.monotonic()
            router.proc.send_signal(signal.SIGTERM)
            with pytest.raises(grpc.RpcError) as info:
                for msg in call:
                    assert not msg.finished, msg
        reader.join(30)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "shut down" in info.value.details(), info.value.details()
        assert time.monotonic() - started < 15  # the grace (1 s), not a transport timeout
        assert sse[-1] == "[DONE]", sse
        err = json.loads(sse[-2])["error"]
        assert "shut down" in err["message"], err
        assert router.proc.wait(15) == 0
