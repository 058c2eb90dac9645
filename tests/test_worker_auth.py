"""Worker-plane tokens in-process (fast): the interceptor's roles on the real Worker service, the
client side's metadata, the env contract, handle signatures and hashes-only KV events."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from moeserve.api import common_pb2, worker_pb2, worker_pb2_grpc
from moeserve.common.errors import ConfigError
from moeserve.common.worker_auth import (
    ENV_ROUTER_TOKEN,
    ENV_ROUTER_TOKEN_SHA256,
    ENV_WORKER_TOKEN,
    HEADER,
    PREVIOUS,
    PlaneSecret,
    WorkerAuthInterceptor,
    client_interceptors,
    worker_auth_from_env,
)

pytestmark = pytest.mark.timeout(60)


class _Worker(worker_pb2_grpc.WorkerServicer):
    """Records which handlers ran; a refused call must never reach one."""

    def __init__(self) -> None:
        self.ran: list[str] = []

    async def Generate(self, request, context):
        self.ran.append("Generate")
        yield worker_pb2.WorkerGenerateResponse(request_id=request.request_id, finished=True)

    async def Abort(self, request, context):
        self.ran.append("Abort")
        return worker_pb2.AbortResponse(aborted=list(request.request_ids))

    async def ReleaseKV(self, request, context):
        self.ran.append("ReleaseKV")
        return worker_pb2.ReleaseKVResponse(released=True)

    async def StreamEvents(self, request, context):
        self.ran.append("StreamEvents")
        yield worker_pb2.WorkerEvent(sequence=0)

    async def Health(self, request, context):
        self.ran.append("Health")
        return common_pb2.HealthResponse(role="decode")


def _auths(secret: PlaneSecret, old: PlaneSecret | None = None) -> dict:
    def env(s: PlaneSecret, names) -> dict[str, str]:
        return s.env(names)

    worker_env = env(secret, (ENV_WORKER_TOKEN, ENV_ROUTER_TOKEN_SHA256))
    router_env = env(secret, (ENV_ROUTER_TOKEN,))
    if old is not None:
        for k, v in env(old, (ENV_WORKER_TOKEN, ENV_ROUTER_TOKEN_SHA256)).items():
            worker_env[k + PREVIOUS] = v
        router_env[ENV_ROUTER_TOKEN + PREVIOUS] = old.router_token
    return {"worker": worker_auth_from_env("worker", False, worker_env),
            "router": worker_auth_from_env("router", False, router_env)}


async def _calls(server_auth, client_auth, metadata=()) -> dict[str, grpc.StatusCode]:
    servicer = _Worker()
    server = grpc.aio.server(interceptors=[WorkerAuthInterceptor(server_auth)])
    worker_pb2_grpc.add_WorkerServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    out = {}
    try:
        async with grpc.aio.insecure_channel(
                f"127.0.0.1:{port}", interceptors=client_interceptors(client_auth)) as ch:
            stub = worker_pb2_grpc.WorkerStub(ch)
            calls = {
                "Generate": lambda: _drain(stub.Generate(
                    worker_pb2.WorkerGenerateRequest(request_id="r"), metadata=metadata)),
                "Abort": lambda: stub.Abort(worker_pb2.AbortRequest(request_ids=["r"]),
                                            metadata=metadata),
                "ReleaseKV": lambda: stub.ReleaseKV(worker_pb2.ReleaseKVRequest(),
                                                    metadata=metadata),
                "StreamEvents": lambda: _drain(stub.StreamEvents(
                    worker_pb2.StreamEventsRequest(), metadata=metadata)),
                "Health": lambda: stub.Health(common_pb2.HealthRequest(), metadata=metadata),
            }  # fmt: skip
            for name, call in calls.items():
                try:
                    await call()
                    out[name] = grpc.StatusCode.OK
                except grpc.aio.AioRpcError as e:
                    out[name] = e.code()
    finally:
        await server.stop(None)
    assert set(servicer.ran) <= {k for k, v in out.items() if v == grpc.StatusCode.OK}
    return out


async def _drain(call) -> list:
    return [m async for m in call]


OK, UNAUTH, DENIED = (grpc.StatusCode.OK, grpc.StatusCode.UNAUTHENTICATED,
                      grpc.StatusCode.PERMISSION_DENIED)


def test_router_token_opens_every_rpc_nothing_opens_none() -> None:
    a = _auths(PlaneSecret.generate())
    got = asyncio.run(_calls(a["worker"], a["router"]))
    assert got == {"Generate": OK, "Abort": OK, "ReleaseKV": OK, "StreamEvents": OK,
                   "Health": OK}
    for meta in ((), ((HEADER, "x" * 43),), (("authorization", "Bearer sk"),)):
        assert set(asyncio.run(_calls(a["worker"], None, meta)).values()) == {UNAUTH}
    other = _auths(PlaneSecret.generate())  # another deployment's router
    assert set(asyncio.run(_calls(a["worker"], other["router"])).values()) == {UNAUTH}


def test_a_peer_gets_the_hand_off_rpcs_only() -> None:
    a = _auths(PlaneSecret.generate())
    got = asyncio.run(_calls(a["worker"], a["worker"]))
    assert got["Generate"] == got["Abort"] == DENIED
    assert got["ReleaseKV"] == got["StreamEvents"] == OK


def test_rotation_old_and_new_pods_talk_both_ways() -> None:
    old, new = PlaneSecret.generate(), PlaneSecret.generate()
    before, after = _auths(old), _auths(new, old)
    for server, client in ((before, after), (after, before)):
        got = asyncio.run(_calls(server["worker"], client["router"]))
        assert got["Generate"] == OK and got["StreamEvents"] == OK
    # Two rotations later the first token is gone.
    latest = _auths(PlaneSecret.generate(), new)
    assert set(asyncio.run(_calls(latest["worker"], before["router"])).values()) == {UNAUTH}


def test_missing_tokens_name_the_variables_unless_insecure() -> None:
    with pytest.raises(ConfigError, match=ENV_WORKER_TOKEN):
        worker_auth_from_env("worker", False, {ENV_ROUTER_TOKEN_SHA256: "x"})
    with pytest.raises(ConfigError, match=ENV_ROUTER_TOKEN):
        worker_auth_from_env("router", False, {})
    assert worker_auth_from_env("worker", True, {}) is None
    assert worker_auth_from_env("router", True, {}) is None


def test_workers_hold_the_router_token_only_as_a_digest() -> None:
    secret = PlaneSecret.generate()
    env = secret.worker_env()
    assert secret.router_token not in env.values()
    assert set(env) == {ENV_WORKER_TOKEN, ENV_ROUTER_TOKEN_SHA256}
    assert len(secret.worker_token) == 43 and secret.worker_token != secret.router_token


def _handle(**kw) -> worker_pb2.KVHandle:
    fields = dict(agent_name="prefill-agent", request_id="r1", block_ids=[1, 2], num_tokens=80,
                  compat_fingerprint="fp", worker_address="10.0.0.5:50051", handle_id="h" * 43,
                  decode_agent="decode-agent")  # fmt: skip
    return worker_pb2.KVHandle(**{**fields, **kw})


def test_handles_verify_only_as_signed_by_a_deployment_worker() -> None:
    from moeserve.worker.kv_handoff.signing import handle_verifies, sign_handle

    auth = _auths(PlaneSecret.generate())["worker"]
    signed = sign_handle(auth, _handle())
    assert len(signed.signature) == 32 and handle_verifies(auth, signed)
    for field, value in (("worker_address", "169.254.169.254:80"), ("agent_name", "x"),
                         ("handle_id", "g" * 43), ("decode_agent", "y"), ("request_id", "r2")):
        forged = worker_pb2.KVHandle()
        forged.CopyFrom(signed)
        setattr(forged, field, value)
        assert not handle_verifies(auth, forged), field
    stranger = _auths(PlaneSecret.generate())["worker"]
    assert not handle_verifies(auth, sign_handle(stranger, _handle()))
    assert not handle_verifies(auth, _handle())  # unsigned
    assert handle_verifies(None, _handle())  # --insecure-worker-plane: nothing to check


def test_decode_side_opens_no_channel_for_a_forged_handle() -> None:
    from moeserve.worker.kv_handoff.decode import KVPuller

    class Agent:
        name = "decode-agent"

    auth = _auths(PlaneSecret.generate())["worker"]
    puller = KVPuller(Agent(), metrics=None, auth=auth)  # type: ignore[arg-type]
    forged = _handle(worker_address="169.254.169.254:80", signature=b"\0" * 32)
    assert asyncio.run(puller._claim(forged)) is None
    assert puller._channels == {}  # no connection was even set up


def test_peer_subscribers_get_block_hashes_without_token_ids() -> None:
    from moeserve.worker.block_pool import BlockStored
    from moeserve.worker.worker_events import EventHub

    async def run() -> tuple[worker_pb2.WorkerEvent, worker_pb2.WorkerEvent]:
        hub = EventHub()
        router, peer = hub.subscribe(tokens=True), hub.subscribe(tokens=False)
        await anext(router), await anext(peer)  # snapshots
        stored = BlockStored(block_hashes=[11, 12], parent_block_hash=None,
                             token_ids=list(range(8)), block_size=4)
        hub._publish([stored], worker_pb2.LoadReport())
        return await anext(router), await anext(peer)

    as_router, as_peer = asyncio.run(run())
    assert list(as_router.kv_events[0].stored.token_ids) == list(range(8))
    assert list(as_peer.kv_events[0].stored.block_hashes) == [11, 12]
    assert not as_peer.kv_events[0].stored.token_ids
