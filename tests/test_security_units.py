"""Security controls in-process (fast): API keys on HTTP and gRPC, mTLS with certificates made
here, KV handle claims (forged, replayed, expired, foreign) on the worker-side handler."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
from pathlib import Path

import grpc
import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from fastapi import FastAPI

from moeserve.api import worker_pb2
from moeserve.common.errors import ConfigError
from moeserve.common.tls import TlsConfig, add_port, open_channel
from moeserve.router.auth import (
    ApiKeyMiddleware,
    ApiKeys,
    GrpcApiKeyInterceptor,
    keys_from_sources,
)
from moeserve.worker.kv_handoff.prefill import HANDLE_REFUSED, HandleTable, KVHandleRefusedError

pytestmark = pytest.mark.timeout(60)


# --------------------------------------------------------------------------- API keys


def test_keys_from_flags_and_both_env_spellings() -> None:
    env = {"MOESERVE_API_KEY": "a", "MOESERVE_API_KEYS": "b, c\nd,,a"}
    assert keys_from_sources(["x", " "], env) == ["x", "a", "b", "c", "d"]
    assert keys_from_sources(None, {}) == []


def _app(keys: list[str], protect_metrics: bool = False) -> FastAPI:
    app = FastAPI()

    @app.post("/v1/completions")
    async def completions() -> dict:
        return {"ok": True}

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics() -> dict:
        return {}

    app.add_middleware(ApiKeyMiddleware, keys=ApiKeys(keys), protect_metrics=protect_metrics)
    return app


async def _statuses(app: FastAPI, calls: list[tuple[str, str, dict]]) -> list[int]:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://r") as c:
        return [(await c.request(m, p, headers=h)).status_code for m, p, h in calls]


def test_http_401_without_or_with_a_wrong_key_200_with_it() -> None:
    post = "POST", "/v1/completions"
    calls = [(*post, {}), (*post, {"Authorization": "Bearer k0"}),
             (*post, {"Authorization": "k1"}), (*post, {"Authorization": "Basic k1"}),
             (*post, {"Authorization": "Bearer k1"}), (*post, {"authorization": "bearer k2"}),
             ("GET", "/health", {}), ("GET", "/metrics", {})]  # fmt: skip
    got = asyncio.run(_statuses(_app(["k1", "k2"]), calls))
    assert got == [401, 401, 401, 401, 200, 200, 200, 200]
    metrics = [("GET", "/metrics", {}), ("GET", "/metrics", {"Authorization": "Bearer k1"})]
    assert asyncio.run(_statuses(_app(["k1"], protect_metrics=True), metrics)) == [401, 200]
    assert asyncio.run(_statuses(_app([]), [(*post, {})])) == [200]  # no key: no auth


def test_401_body_is_openai_shaped() -> None:
    async def run() -> httpx.Response:
        transport = httpx.ASGITransport(app=_app(["k"]))
        async with httpx.AsyncClient(transport=transport, base_url="http://r") as c:
            return await c.post("/v1/completions", json={"prompt": "x"})

    r = asyncio.run(run())
    assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Bearer")
    assert r.json()["error"] == {"message": r.json()["error"]["message"],
                                 "type": "invalid_request_error", "param": None,
                                 "code": "invalid_api_key"}  # fmt: skip


def _echo_handler() -> grpc.GenericRpcHandler:
    async def ping(request: bytes, context) -> bytes:
        return b"pong:" + request

    async def stream(request: bytes, context):
        yield b"a"
        yield b"b"

    return grpc.method_handlers_generic_handler("t.Echo", {
        "Ping": grpc.unary_unary_rpc_method_handler(ping),
        "Stream": grpc.unary_stream_rpc_method_handler(stream),
    })  # fmt: skip


def test_grpc_unauthenticated_without_key_in_metadata() -> None:
    async def run() -> list[object]:
        server = grpc.aio.server(interceptors=[GrpcApiKeyInterceptor(ApiKeys(["k1"]))])
        server.add_generic_rpc_handlers([_echo_handler()])
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        out: list[object] = []
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
                ping, stream = ch.unary_unary("/t.Echo/Ping"), ch.unary_stream("/t.Echo/Stream")
                for meta in ((), (("authorization", "Bearer nope"),),
                             (("authorization", "Bearer k1"),)):  # fmt: skip
                    for call in (lambda m: ping(b"x", metadata=m),
                                 lambda m: _drain(stream(b"x", metadata=m))):  # fmt: skip
                        try:
                            out.append(await call(meta))
                        except grpc.aio.AioRpcError as e:
                            out.append(e.code())
        finally:
            await server.stop(None)
        return out

    denied = grpc.StatusCode.UNAUTHENTICATED
    assert asyncio.run(run()) == [denied, denied, denied, denied, b"pong:x", [b"a", b"b"]]


async def _drain(call) -> list[bytes]:
    return [m async for m in call]


# --------------------------------------------------------------------------- mTLS


def _cert(name: str, issuer: tuple | None, ca: bool = False) -> tuple:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder().subject_name(subject)
        .issuer_name(issuer[0].subject if issuer else subject)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )  # fmt: skip
    if not ca:
        builder = builder.add_extension(x509.SubjectAlternativeName(
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False)  # fmt: skip
    cert = builder.sign(issuer[1] if issuer else key, hashes.SHA256())
    return cert, key


def _write(tmp: Path, name: str, cert, key) -> tuple[str, str]:
    c, k = tmp / f"{name}.crt", tmp / f"{name}.key"
    c.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    k.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                    serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption()))  # fmt: skip
    return str(c), str(k)


def test_mtls_refuses_a_client_without_a_certificate(tmp_path: Path) -> None:
    ca = _cert("moeserve-ca", None, ca=True)
    ca_file, _ = _write(tmp_path, "ca", *ca)
    server_tls = TlsConfig.from_files(*_write(tmp_path, "worker", *_cert("worker", ca)), ca_file)
    client_tls = TlsConfig.from_files(*_write(tmp_path, "router", *_cert("router", ca)), ca_file)
    rogue = _cert("rogue", _cert("other-ca", None, ca=True))  # signed by a CA nobody trusts
    rogue_tls = TlsConfig.from_files(*_write(tmp_path, "rogue", *rogue), ca_file)

    async def run() -> list[object]:
        server = grpc.aio.server()
        server.add_generic_rpc_handlers([_echo_handler()])
        port = add_port(server, "127.0.0.1:0", server_tls)
        await server.start()
        out: list[object] = []
        try:
            address = f"127.0.0.1:{port}"
            no_cert = grpc.aio.secure_channel(address, grpc.ssl_channel_credentials(
                root_certificates=server_tls.ca))  # trusts the server, presents nothing
            for ch in (grpc.aio.insecure_channel(address), no_cert,
                       open_channel(address, rogue_tls), open_channel(address, client_tls)):
                async with ch:
                    try:
                        out.append(await ch.unary_unary("/t.Echo/Ping")(b"x", timeout=5))
                    except grpc.aio.AioRpcError as e:
                        out.append(e.code())
        finally:
            await server.stop(None)
        return out

    got = asyncio.run(run())
    assert got[:3] == [grpc.StatusCode.UNAVAILABLE] * 3 and got[3] == b"pong:x", got


def test_tls_flags_are_checked(tmp_path: Path) -> None:
    from argparse import Namespace

    from moeserve.common.tls import tls_from_args

    assert tls_from_args(Namespace(tls_cert=None, tls_key=None, tls_ca=None)) is None
    with pytest.raises(ConfigError, match="--tls-key"):
        tls_from_args(Namespace(tls_cert="a.crt", tls_key=None, tls_ca=None))
    (tmp_path / "x.crt").write_text("not pem")
    with pytest.raises(ConfigError, match="not a PEM file"):
        TlsConfig.from_files(str(tmp_path / "x.crt"), str(tmp_path / "x.crt"))
    with pytest.raises(ConfigError, match="--tls-ca .*missing"):
        TlsConfig.from_files(*_write(tmp_path, "a", *_cert("a", None)), str(tmp_path / "missing"))


# --------------------------------------------------------------------------- KV handles


def _refused(table: HandleTable, hid: str, agent: str, now: float) -> bool:
    try:
        table.claim(hid, agent, now)
    except KVHandleRefusedError as e:
        assert str(e) == HANDLE_REFUSED and e.grpc_code == "PERMISSION_DENIED"
        return True
    return False


def test_handles_are_single_use_bound_and_lease_limited() -> None:
    t = HandleTable()
    hid = t.issue("r1", "decode-a", [4, 5], 20, now=0.0, lease_s=30.0)
    other = t.issue("r1", "decode-a", [4, 5], 20, now=0.0, lease_s=30.0)
    assert len(hid) >= 40 and hid != other  # 256 random bits, never derived from the request
    assert _refused(t, hid, "decode-b", 1.0)  # foreign
    assert _refused(t, hid, "", 1.0)
    assert _refused(t, "r1", "decode-a", 1.0)  # made up (the request id is not the handle)
    got = t.claim(hid, "decode-a", 1.0)
    assert (got.request_id, got.block_ids, got.num_tokens) == ("r1", (4, 5), 20)
    assert _refused(t, hid, "decode-a", 2.0)  # replayed
    late = t.issue("r2", "decode-a", [1], 3, now=0.0, lease_s=5.0)
    assert _refused(t, late, "decode-a", 5.0)  # expired
    near = t.issue("r4", "decode-a", [1], 3, now=0.0, lease_s=5.0)
    assert _refused(t, near, "decode-a", 4.5)  # too little lease left for the READ
    gone = t.issue("r3", "decode-a", [2], 3, now=0.0, lease_s=30.0)
    t.drop_request("r3")  # released or aborted before the claim
    assert _refused(t, gone, "decode-a", 0.5)
    t.prune(now=100.0)
    assert len(t) == 0


def test_claim_rpc_maps_refusal_to_permission_denied() -> None:
    from moeserve.worker.kv_handoff.prefill import KVHandleServicer

    class Ctx:
        code = None

        async def abort(self, code, details):
            self.code = (code, details)
            raise grpc.aio.AbortError()

    servicer = KVHandleServicer()
    servicer.handles = HandleTable()
    ctx = Ctx()
    with pytest.raises(grpc.aio.AbortError):
        asyncio.run(servicer.ClaimKV(worker_pb2.ClaimKVRequest(handle_id="x", decode_agent="d"),
                                     ctx))  # fmt: skip
    assert ctx.code == (grpc.StatusCode.PERMISSION_DENIED, HANDLE_REFUSED)


def test_bytes_that_are_not_the_message_get_invalid_argument() -> None:
    from moeserve.common.grpc_guard import MalformedRequestInterceptor

    async def claim(request: worker_pb2.ClaimKVRequest, context) -> worker_pb2.ClaimKVResponse:
        return worker_pb2.ClaimKVResponse(request_id=request.handle_id)

    async def events(request: worker_pb2.ClaimKVRequest, context):
        yield worker_pb2.ClaimKVResponse(request_id=request.handle_id)

    handler = grpc.method_handlers_generic_handler("t.W", {
        "Claim": grpc.unary_unary_rpc_method_handler(
            claim, worker_pb2.ClaimKVRequest.FromString,
            worker_pb2.ClaimKVResponse.SerializeToString),
        "Events": grpc.unary_stream_rpc_method_handler(
            events, worker_pb2.ClaimKVRequest.FromString,
            worker_pb2.ClaimKVResponse.SerializeToString),
    })  # fmt: skip

    async def run() -> list[object]:
        server = grpc.aio.server(interceptors=[MalformedRequestInterceptor()])
        server.add_generic_rpc_handlers([handler])
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        out: list[object] = []
        good = worker_pb2.ClaimKVRequest(handle_id="h").SerializeToString()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
                for raw in (b"\xff\xff\xff", good):
                    for call in (lambda r: ch.unary_unary("/t.W/Claim")(r),
                                 lambda r: _drain(ch.unary_stream("/t.W/Events")(r))):
                        try:
                            out.append(bool(await call(raw)))
                        except grpc.aio.AioRpcError as e:
                            out.append(e.code())
        finally:
            await server.stop(None)
        return out

    bad = grpc.StatusCode.INVALID_ARGUMENT
    assert asyncio.run(run()) == [bad, bad, True, True]
