"""Security on CPU against live processes (`moeserve up`: router + prefill + decode, NIXL).

API keys on HTTP and gRPC, the 413 / context-limit 400 bounds, KV handles refused by a real
prefill worker (foreign, made up, replayed) and by a real decode worker (forged: recomputed,
nothing read), schemathesis on /openapi.json, and hypothesis-generated gRPC messages.
Worker-plane tokens (on by default): no call without one, router-only RPCs refused to a peer,
token ids in StreamEvents for the router only, a forged handle's address never contacted.
"""

from __future__ import annotations

import asyncio
import socket

import grpc
import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moeserve.api import common_pb2, router_pb2, router_pb2_grpc, worker_pb2, worker_pb2_grpc
from moeserve.common.worker_auth import HEADER
from moeserve.deploy.local import ClusterSpec, LocalCluster
from moeserve.worker.kv_handoff.prefill import HANDLE_REFUSED, release_metadata

pytestmark = [pytest.mark.slow, pytest.mark.timeout(420)]

KEY = "sk-test-right"
AUTH = {"Authorization": f"Bearer {KEY}"}
PROMPT = [(i * 7919) % 500 + 2 for i in range(40)]
# Anything but these from a fuzzed call is a crash that leaked through.
PROPER = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED,
          grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
          grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.NOT_FOUND}  # fmt: skip


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory):
    from moeserve.worker.checkpoint import ensure_tiny_checkpoint

    model = ensure_tiny_checkpoint(tmp_path_factory.mktemp("ckpt"))
    spec = ClusterSpec(model=str(model), port=0, num_kv_blocks=96, restart=False,
                       router_args=["--api-key", "sk-other", "--api-key", KEY,
                                    "--max-body-bytes", str(8 << 20)])  # fmt: skip
    with LocalCluster(spec, log=None) as c:
        yield c


def _worker(cluster: LocalCluster, role: str) -> str:
    return next(c.address for c in cluster.children if c.name.startswith(role))


def _health(cluster: LocalCluster, address: str) -> common_pb2.HealthResponse:
    with grpc.insecure_channel(address) as ch:
        return worker_pb2_grpc.WorkerStub(ch).Health(
            common_pb2.HealthRequest(), metadata=cluster.auth_metadata(), timeout=10)


def test_http_keys_body_bound_and_context_limit(cluster) -> None:
    url = f"{cluster.url}/v1/completions"
    body = {"prompt": PROMPT, "max_tokens": 4, "temperature": 0}
    no_key = httpx.post(url, json=body, timeout=30)
    assert no_key.status_code == 401 and no_key.json()["error"]["code"] == "invalid_api_key"
    bad_key = {"Authorization": "Bearer sk-test-wrong"}
    wrong = httpx.post(url, json=body, headers=bad_key, timeout=30)
    assert wrong.status_code == 401
    assert httpx.post(url, json=body, headers={"Authorization": KEY}, timeout=30).status_code == 401
    ok = httpx.post(url, json=body, headers=AUTH, timeout=60)
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 4
    assert httpx.get(f"{cluster.url}/v1/models", timeout=10).status_code == 401
    for open_path in ("/health", "/metrics", "/openapi.json"):
        assert httpx.get(f"{cluster.url}{open_path}", timeout=10).status_code == 200
    spec = httpx.get(f"{cluster.url}/openapi.json", timeout=10).json()
    op = spec["paths"]["/v1/completions"]["post"]
    assert op["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith(
        "/CompletionRequest") and {"400", "401", "413"} <= set(op["responses"])
    assert op["security"] == [{"bearer": []}] and "security" not in spec["paths"]["/health"]["get"]

    big = httpx.post(url, content=b'{"prompt": "' + b"a" * (12 << 20) + b'"}', timeout=60,
                     headers={**AUTH, "content-type": "application/json"})  # fmt: skip
    assert big.status_code == 413 and big.json()["error"]["type"] == "payload_too_large"
    limit = httpx.get(f"{cluster.url}/v1/models", headers=AUTH, timeout=10).json()
    max_len = limit["data"][0]["max_model_len"]
    long = httpx.post(url, json={"prompt": [5] * (max_len + 1), "max_tokens": 1}, headers=AUTH,
                      timeout=30)  # fmt: skip
    err = long.json()["error"]
    assert long.status_code == 400 and str(max_len) in err["message"], err


def test_grpc_keys(cluster) -> None:
    req = router_pb2.GenerateRequest(token_ids=router_pb2.TokenIds(ids=PROMPT),
                                     sampling=common_pb2.SamplingParams(max_tokens=2))  # fmt: skip
    with grpc.insecure_channel(cluster.grpc_address) as ch:
        stub = router_pb2_grpc.RouterStub(ch)
        for meta in ((), (("authorization", "Bearer nope"),)):
            with pytest.raises(grpc.RpcError) as e:
                list(stub.Generate(req, metadata=meta, timeout=30))
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        out = list(stub.Generate(req, metadata=(("authorization", f"Bearer {KEY}"),), timeout=60))
        assert out[-1].finished
        assert stub.Health(common_pb2.HealthRequest(), timeout=10).role == "router"


def test_prefill_worker_refuses_foreign_made_up_and_replayed_handles(cluster) -> None:
    prefill = _worker(cluster, "prefill")
    req = worker_pb2.PrefillRequest(request_id="sec-claim", prompt_token_ids=PROMPT,
                                    sampling=common_pb2.SamplingParams(max_tokens=8),
                                    decode_agent="decode-A")  # fmt: skip
    with grpc.insecure_channel(prefill) as ch:
        stub = worker_pb2_grpc.WorkerStub(ch)
        handle = stub.Prefill(req, metadata=cluster.auth_metadata(), timeout=60).kv_handle
        assert len(handle.handle_id) >= 40 and handle.decode_agent == "decode-A"

        def claim(handle_id: str, agent: str) -> worker_pb2.ClaimKVResponse:
            msg = worker_pb2.ClaimKVRequest(handle_id=handle_id, decode_agent=agent)
            return stub.ClaimKV(msg, metadata=cluster.auth_metadata("peer"), timeout=10)

        refusals = []
        for hid, agent in ((handle.handle_id, "decode-B"), (handle.handle_id, ""),
                           ("x" * len(handle.handle_id), "decode-A")):  # fmt: skip
            with pytest.raises(grpc.RpcError) as e:
                claim(hid, agent)
            refusals.append((e.value.code(), e.value.details()))
        got = claim(handle.handle_id, "decode-A")  # the foreign tries did not burn it
        assert list(got.block_ids) == list(handle.block_ids) and got.num_tokens == len(PROMPT)
        with pytest.raises(grpc.RpcError) as e:
            claim(handle.handle_id, "decode-A")
        refusals.append((e.value.code(), e.value.details()))
        # Every refusal looks the same: nothing tells a prober which case it hit.
        assert set(refusals) == {(grpc.StatusCode.PERMISSION_DENIED, HANDLE_REFUSED)}
        stub.ReleaseKV(worker_pb2.ReleaseKVRequest(request_id="sec-claim"),
                       metadata=cluster.auth_metadata(), timeout=10)


def test_a_peer_releases_only_the_kv_handed_to_it(cluster) -> None:
    """Was: the peer token's ReleaseKV freed any request id's pinned KV. Now a peer must show
    the handle id it was given and its own agent name; the router may release anything."""
    prefill = _worker(cluster, "prefill")
    with grpc.insecure_channel(prefill) as ch:
        stub = worker_pb2_grpc.WorkerStub(ch)

        def pin(rid: str) -> worker_pb2.KVHandle:
            req = worker_pb2.PrefillRequest(request_id=rid, prompt_token_ids=PROMPT,
                                            sampling=common_pb2.SamplingParams(max_tokens=8),
                                            decode_agent="decode-A")  # fmt: skip
            return stub.Prefill(req, metadata=cluster.auth_metadata(), timeout=60).kv_handle

        def release(rid: str, *meta: tuple[str, str], role: str = "peer") -> bool:
            return stub.ReleaseKV(worker_pb2.ReleaseKVRequest(request_id=rid), timeout=10,
                                  metadata=(*cluster.auth_metadata(role), *meta)).released

        handle, other = pin("sec-rel-1"), pin("sec-rel-2")
        assert handle.block_ids and other.block_ids
        assert not release("sec-rel-1")
        assert not release("sec-rel-1", *release_metadata(other.handle_id, "decode-A"))
        assert not release("sec-rel-1", *release_metadata(handle.handle_id, "decode-B"))
        # Still pinned: the decode worker it was handed to can claim it.
        claim = worker_pb2.ClaimKVRequest(handle_id=handle.handle_id, decode_agent="decode-A")
        assert stub.ClaimKV(claim, metadata=cluster.auth_metadata("peer"), timeout=10).block_ids
        assert release("sec-rel-1", *release_metadata(handle.handle_id, "decode-A"))
        assert not release("sec-rel-1", *release_metadata(handle.handle_id, "decode-A"))
        assert release("sec-rel-2", role="router")


def test_decode_worker_reads_nothing_for_a_forged_handle(cluster) -> None:
    prefill, decode = _worker(cluster, "prefill"), _worker(cluster, "decode")
    p_info, d_info = _health(cluster, prefill), _health(cluster, decode)
    params = common_pb2.SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    forged = worker_pb2.KVHandle(
        agent_name=p_info.nixl_agent_name, request_id="victim", block_ids=list(range(3)),
        num_tokens=len(PROMPT), compat_fingerprint=d_info.compat_fingerprint,
        worker_address=prefill, handle_id="made-up", decode_agent=d_info.nixl_agent_name,
    )  # fmt: skip
    with grpc.insecure_channel(decode) as ch:
        stub = worker_pb2_grpc.WorkerStub(ch)

        def run(**kw) -> tuple[list[int], int]:
            msg = worker_pb2.WorkerGenerateRequest(prompt_token_ids=PROMPT, sampling=params, **kw)
            out = list(stub.Generate(msg, metadata=cluster.auth_metadata(), timeout=60))
            return [t for m in out for t in m.token_ids], out[0].num_transferred_tokens

        plain, _ = run(request_id="sec-plain")
        tokens, moved = run(request_id="sec-forged", kv_handle=forged, first_token_id=plain[0])
    assert moved == 0 and tokens == plain


def test_values_past_the_wire_format_are_named_400s(cluster) -> None:
    """Found by the schemathesis test below: numbers too large for the worker protocol's
    fields, and text that is not Unicode, were 500s ("internal error: ValueError")."""
    url = f"{cluster.url}/v1/chat/completions"
    chat = [{"role": "user", "content": "hi"}]
    for field, value in (("stop_token_ids", [2**40]), ("top_k", 2**40), ("max_tokens", 2**40)):
        resp = httpx.post(url, headers=AUTH, timeout=30,
                          json={"messages": chat, "max_tokens": 2, field: value})
        assert resp.status_code == 400, (field, resp.text)
        assert resp.json()["error"]["param"] == field
    raw = b'{"prompt": "a \\ud800 b", "max_tokens": 2}'
    resp = httpx.post(f"{cluster.url}/v1/completions", content=raw, timeout=30,
                      headers={**AUTH, "Content-Type": "application/json"})
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "prompt", resp.text


def test_schemathesis_finds_no_5xx_and_no_hang(cluster) -> None:
    schemathesis = pytest.importorskip("schemathesis")

    schema = schemathesis.openapi.from_url(f"{cluster.url}/openapi.json")
    failures = []
    for op in ("POST /v1/completions", "POST /v1/chat/completions", "GET /v1/models",
               "POST /v1/route"):  # fmt: skip
        strategy = schema[op.split()[1]][op.split()[0]].as_strategy()

        @settings(max_examples=15, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))  # fmt: skip
        @given(case=strategy)
        def check(case) -> None:
            if isinstance(case.body, dict):  # keep generation short on the CPU
                case.body["max_tokens"] = 2
            resp = case.call(base_url=cluster.url, headers=AUTH, timeout=30)
            if resp.status_code >= 500 and resp.status_code not in (503, 504):
                failures.append((case.operation.label, resp.status_code, resp.text[:200]))

        check()
    assert not failures, failures


_SAMPLING = st.builds(common_pb2.SamplingParams, max_tokens=st.integers(0, 4),
                      temperature=st.floats(-5, 5, allow_nan=False), top_k=st.integers(-3, 50),
                      top_p=st.floats(-1, 2, allow_nan=False),
                      stop_token_ids=st.lists(st.integers(0, 2**32 - 1), max_size=3))  # fmt: skip
_IDS = st.lists(st.integers(0, 2**32 - 1), max_size=12)


def _call_status(fn) -> grpc.StatusCode:
    try:
        fn()
        return grpc.StatusCode.OK
    except grpc.RpcError as e:
        return e.code()


def test_fuzzed_grpc_messages_get_proper_statuses(cluster) -> None:
    meta = (("authorization", f"Bearer {KEY}"),)
    wmeta = cluster.auth_metadata()
    seen: list[tuple[str, grpc.StatusCode, object]] = []
    with grpc.insecure_channel(cluster.grpc_address) as rch, \
            grpc.insecure_channel(_worker(cluster, "decode")) as wch:  # fmt: skip
        router, worker = router_pb2_grpc.RouterStub(rch), worker_pb2_grpc.WorkerStub(wch)

        @settings(max_examples=40, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))  # fmt: skip
        @given(ids=_IDS, text=st.text(max_size=20), use_text=st.booleans(), sampling=_SAMPLING,
               raw=st.binary(max_size=64))  # fmt: skip
        def check(ids, text, use_text, sampling, raw) -> None:
            r = router_pb2.GenerateRequest(sampling=sampling)
            if use_text:
                r.text = text
            elif ids:
                r.token_ids.ids.extend(ids)
            w = worker_pb2.WorkerGenerateRequest(prompt_token_ids=ids, sampling=sampling)
            p = worker_pb2.PrefillRequest(prompt_token_ids=ids, sampling=sampling)
            calls = {
                "router.Generate": lambda: list(router.Generate(r, metadata=meta, timeout=30)),
                "worker.Generate": lambda: list(worker.Generate(w, metadata=wmeta, timeout=30)),
                "worker.Prefill": lambda: worker.Prefill(p, metadata=wmeta, timeout=30),
                "worker.ClaimKV": lambda: worker.ClaimKV(
                    worker_pb2.ClaimKVRequest(handle_id=text, decode_agent=text),
                    metadata=wmeta, timeout=10),
                # Bytes that are not a valid message at all.
                "worker.raw": lambda: wch.unary_unary("/moeserve.v1.Worker/Prefill")(
                    raw, metadata=wmeta, timeout=10),
            }  # fmt: skip
            for name, fn in calls.items():
                seen.append((name, _call_status(fn), ids or text))

        check()
    bad = [s for s in seen if s[1] not in PROPER | {grpc.StatusCode.PERMISSION_DENIED}]
    assert not bad, bad[:5]
    assert {s[1] for s in seen} & {grpc.StatusCode.INVALID_ARGUMENT}



def test_mtls_worker_plane_end_to_end(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Router -> workers and decode -> prefill over mTLS (certificates made here); a client
    without a certificate is refused at the handshake, one with it is served."""
    from moeserve.common.tls import TlsConfig, open_channel
    from moeserve.worker.checkpoint import ensure_tiny_checkpoint
    from tests.test_security_units import _cert, _write

    tmp = tmp_path_factory.mktemp("pki")
    ca = _cert("moeserve-ca", None, ca=True)
    ca_file, _ = _write(tmp, "ca", *ca)
    cert, key = _write(tmp, "plane", *_cert("plane", ca))
    flags = ["--tls-cert", cert, "--tls-key", key, "--tls-ca", ca_file]
    model = ensure_tiny_checkpoint(tmp_path_factory.mktemp("ckpt"))
    spec = ClusterSpec(model=str(model), port=0, num_kv_blocks=96, restart=False,
                       worker_args=flags, router_args=flags)  # fmt: skip
    with LocalCluster(spec, log=None) as c:
        decode = _worker(c, "decode")
        with grpc.insecure_channel(decode) as ch, pytest.raises(grpc.RpcError) as e:
            worker_pb2_grpc.WorkerStub(ch).Health(common_pb2.HealthRequest(),
                                                  metadata=c.auth_metadata(), timeout=5)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        body = {"prompt": PROMPT, "max_tokens": 4, "temperature": 0, "ignore_eos": True}
        r = httpx.post(f"{c.url}/v1/completions", json=body, timeout=60)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4

        async def health() -> int:
            async with open_channel(decode, TlsConfig.from_files(cert, key, ca_file)) as ch:
                stub = worker_pb2_grpc.WorkerStub(ch)
                return (await stub.Health(common_pb2.HealthRequest(),
                                          metadata=c.auth_metadata(), timeout=5)).status

        assert asyncio.run(health()) == common_pb2.HealthResponse.SERVING


# --------------------------------------------------------------------------- worker-plane tokens


def _status(call, meta: tuple) -> grpc.StatusCode:
    try:
        call(meta)
        return grpc.StatusCode.OK
    except grpc.RpcError as e:
        return e.code()


def test_worker_rpcs_need_the_deployment_token(cluster) -> None:
    """Reachable port, no token: nothing (was: Generate without key or limits, Abort and
    ReleaseKV of other requests, their prompts from StreamEvents). A peer's token opens only
    the hand-off RPCs; the kubelet's grpc.health.v1 stays open."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    decode, prefill = _worker(cluster, "decode"), _worker(cluster, "prefill")
    gen = worker_pb2.WorkerGenerateRequest(request_id="sec-auth", prompt_token_ids=PROMPT,
                                           sampling=common_pb2.SamplingParams(max_tokens=2))
    with grpc.insecure_channel(decode) as dch, grpc.insecure_channel(prefill) as pch:
        d, p = worker_pb2_grpc.WorkerStub(dch), worker_pb2_grpc.WorkerStub(pch)
        calls = {
            "Generate": lambda m: list(d.Generate(gen, metadata=m, timeout=30)),
            "Prefill": lambda m: p.Prefill(worker_pb2.PrefillRequest(
                prompt_token_ids=PROMPT, sampling=gen.sampling), metadata=m, timeout=30),
            "Abort": lambda m: d.Abort(worker_pb2.AbortRequest(request_ids=["sec-auth"]),
                                       metadata=m, timeout=10),
            "ReleaseKV": lambda m: p.ReleaseKV(worker_pb2.ReleaseKVRequest(request_id="x"),
                                               metadata=m, timeout=10),
            "StreamEvents": lambda m: next(iter(d.StreamEvents(
                worker_pb2.StreamEventsRequest(), metadata=m, timeout=10))),
            "Health": lambda m: d.Health(common_pb2.HealthRequest(), metadata=m, timeout=10),
        }  # fmt: skip
        for name, call in calls.items():
            for meta in ((), ((HEADER, "not-the-token"),), (("authorization", f"Bearer {KEY}"),)):
                assert _status(call, meta) == grpc.StatusCode.UNAUTHENTICATED, (name, meta)
        peer, router = cluster.auth_metadata("peer"), cluster.auth_metadata("router")
        for name in ("Generate", "Prefill", "Abort"):
            assert _status(calls[name], peer) == grpc.StatusCode.PERMISSION_DENIED, name
        for name in ("ReleaseKV", "StreamEvents", "Health"):
            assert _status(calls[name], peer) == grpc.StatusCode.OK, name
        for name, call in calls.items():
            assert _status(call, router) == grpc.StatusCode.OK, name
        probe = health_pb2_grpc.HealthStub(dch).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert probe.status == health_pb2.HealthCheckResponse.SERVING


def _first_stored(cluster: LocalCluster, role: str, prompt: list[int]) -> worker_pb2.BlockStored:
    """Subscribe as ``role``, run ``prompt`` on the decode worker, return its BlockStored."""
    decode = _worker(cluster, "decode")
    with grpc.insecure_channel(decode) as ch:
        stub = worker_pb2_grpc.WorkerStub(ch)
        stream = stub.StreamEvents(worker_pb2.StreamEventsRequest(),
                                   metadata=cluster.auth_metadata(role), timeout=60)
        next(stream)  # the snapshot: hashes only, for everyone
        msg = worker_pb2.WorkerGenerateRequest(prompt_token_ids=prompt,
                                               sampling=common_pb2.SamplingParams(max_tokens=1))
        list(stub.Generate(msg, metadata=cluster.auth_metadata(), timeout=60))
        try:
            for event in stream:
                for kv in event.kv_events:
                    if kv.HasField("stored") and kv.stored.block_hashes:
                        return kv.stored
        finally:
            stream.cancel()
    raise AssertionError("no BlockStored event")


def test_stream_events_give_token_ids_to_the_router_only(cluster) -> None:
    """A prompt was recoverable from any subscriber's BlockStored.token_ids."""
    # 130 tokens: two full blocks of 64 (the tiny model's block size) get cached.
    as_peer = _first_stored(cluster, "peer", [(i * 31) % 400 + 3 for i in range(130)])
    as_router = _first_stored(cluster, "router", [(i * 37) % 400 + 5 for i in range(130)])
    assert as_peer.block_hashes and not as_peer.token_ids
    assert list(as_router.token_ids[:8]) == [(i * 37) % 400 + 5 for i in range(8)]


def test_forged_handle_address_is_never_contacted(cluster) -> None:
    """Server-side request forgery: a kv_handle naming any address made the decode worker
    open a connection there (ClaimKV). Unsigned by a deployment worker, it is refused before."""
    decode = _worker(cluster, "decode")
    info = _health(cluster, decode)
    with socket.socket() as victim:
        victim.bind(("127.0.0.1", 0))
        victim.listen(8)
        forged = worker_pb2.KVHandle(
            agent_name="elsewhere", request_id="r", block_ids=[0, 1], num_tokens=len(PROMPT),
            compat_fingerprint=info.compat_fingerprint, handle_id="h" * 43,
            worker_address=f"127.0.0.1:{victim.getsockname()[1]}",
            decode_agent=info.nixl_agent_name, signature=b"\0" * 32,
        )  # fmt: skip
        msg = worker_pb2.WorkerGenerateRequest(
            request_id="sec-ssrf", prompt_token_ids=PROMPT, kv_handle=forged, first_token_id=7,
            sampling=common_pb2.SamplingParams(max_tokens=3, ignore_eos=True))  # fmt: skip
        with grpc.insecure_channel(decode) as ch:
            out = list(worker_pb2_grpc.WorkerStub(ch).Generate(
                msg, metadata=cluster.auth_metadata(), timeout=60))
        assert out[-1].finished and out[0].num_transferred_tokens == 0  # recomputed here
        victim.setblocking(False)
        with pytest.raises(BlockingIOError):
            victim.accept()  # nobody connected
