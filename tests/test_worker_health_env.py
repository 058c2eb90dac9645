"""The worker's Kubernetes contract: grpc.health.v1.Health answers what the Worker Health RPC
answers (engine up, not draining, EP group healthy), and the operator's MOESERVE_* environment
becomes the defaults of `moeserve worker`'s flags (a flag given still wins)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from types import SimpleNamespace

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from moeserve.api import common_pb2, worker_pb2_grpc
from moeserve.cli import build_parser, main
from moeserve.common import spec as s
from moeserve.common.errors import ConfigError
from moeserve.worker.config import EngineConfig
from moeserve.worker.engine import LLMEngine
from moeserve.worker.env_defaults import env_defaults
from moeserve.worker.health import WORKER_SERVICE, add_health_service
from moeserve.worker.metrics import WorkerMetrics
from moeserve.worker.server import WorkerServicer

pytestmark = pytest.mark.timeout(60)
HS = health_pb2.HealthCheckResponse


def test_env_gives_defaults_and_flags_win(monkeypatch: pytest.MonkeyPatch) -> None:
    env = {s.ENV_BLOCK_SIZE: "32", s.ENV_METRICS_PORT: "8101", s.ENV_ROLE: "decode",
           s.ENV_MODEL: "served/tiny", s.ENV_EPLB_ENABLED: "1", s.ENV_DBO_ENABLED: "0",
           s.ENV_EPLB_REDUNDANT_EXPERTS: "4", s.ENV_POD_IP: "10.0.0.9", s.ENV_TP: "1"}  # fmt: skip
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    args = build_parser().parse_args(["worker", "--model", "/m"])
    assert (args.block_size, args.metrics_port, args.role, args.model_id) == (
        32, 8101, "decode", "served/tiny")
    assert (args.enable_eplb, args.enable_dbo, args.eplb_redundant_experts) == (True, False, 4)
    assert (args.host, args.advertise_host) == ("0.0.0.0", "10.0.0.9")
    args = build_parser().parse_args(["worker", "--model", "/m", "--block-size", "16",
                                      "--role", "prefill", "--host", "127.0.0.1",
                                      "--no-enable-eplb"])  # fmt: skip
    assert (args.block_size, args.role, args.host, args.enable_eplb) == (16, "prefill",
                                                                         "127.0.0.1", False)
    assert env_defaults({s.ENV_POD_IP: "fd00::9"})["advertise_host"] == "[fd00::9]"


@pytest.mark.parametrize(("var", "value", "message"), [
    (s.ENV_BLOCK_SIZE, "big", "MOESERVE_BLOCK_SIZE='big': expected an integer"),
    (s.ENV_DBO_ENABLED, "maybe", "MOESERVE_DBO_ENABLED='maybe': expected 1/0"),
    (s.ENV_ROLE, "router", "MOESERVE_ROLE='router': expected one of prefill, decode, both"),
    (s.ENV_TP, "2", "MOESERVE_TP='2'"),
])  # fmt: skip
def test_bad_env_names_the_variable(monkeypatch: pytest.MonkeyPatch, capsys, var: str,
                                    value: str, message: str) -> None:  # fmt: skip
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        env_defaults({var: value}, {"role": ("prefill", "decode", "both")})
    monkeypatch.setenv(var, value)
    # Other subcommands still build; `moeserve worker` fails before loading anything.
    assert build_parser().parse_args(["make-checkpoint", "--out", "/x"]).command
    assert main(["worker", "--model", "/does/not/exist"]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("value", ["-1", "four"])
def test_bad_nixl_threads_is_refused_before_loading(capsys, value: str) -> None:
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["worker", "--model", "/does/not/exist", "--nixl-threads",
                                   value])  # fmt: skip
    assert exit_info.value.code == 2
    assert f"argument --nixl-threads: expected an integer >= 0, got {value!r}" in (
        capsys.readouterr().err)
    assert build_parser().parse_args(["worker", "--model", "/m", "--nixl-threads", "0"]
                                     ).nixl_threads == 0  # fmt: skip


@pytest.fixture(scope="module")
def engine(tiny_v3: Path) -> LLMEngine:
    return LLMEngine(EngineConfig(model=str(tiny_v3), num_kv_blocks=16))


def test_grpc_health_follows_worker_health(engine: LLMEngine) -> None:
    async def go() -> None:
        servicer = WorkerServicer(engine, "both", "127.0.0.1:0", None, WorkerMetrics())
        servicer.start()
        server = grpc.aio.server()
        worker_pb2_grpc.add_WorkerServicer_to_server(servicer, server)
        add_health_service(server, servicer.serving)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        health = health_pb2_grpc.HealthStub(channel)
        worker = worker_pb2_grpc.WorkerStub(channel)

        async def both() -> tuple[int, int]:
            std = await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
            own = await worker.Health(common_pb2.HealthRequest(), timeout=5)
            return std.status, own.status

        serving = (HS.SERVING, common_pb2.HealthResponse.SERVING)
        not_serving = (HS.NOT_SERVING, common_pb2.HealthResponse.NOT_SERVING)
        try:
            assert await both() == serving
            named = await health.Check(health_pb2.HealthCheckRequest(service=WORKER_SERVICE))
            assert named.status == HS.SERVING
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await health.Check(health_pb2.HealthCheckRequest(service="nope"), timeout=5)
            assert e.value.code() == grpc.StatusCode.NOT_FOUND
            watch = health.Watch(health_pb2.HealthCheckRequest(service=""))
            assert (await watch.read()).status == HS.SERVING
            # A failed EP group (peer silent) turns both NOT_SERVING, reason kept for logs.
            failed = SimpleNamespace(healthy=False, reason="rank 3 sent no heartbeat for 31s")
            # (any_rank_busy: the idle engine loop asks the group whether any rank has work)
            engine.parallel = SimpleNamespace(health=failed, any_rank_busy=lambda local: local)
            try:
                assert await both() == not_serving
                assert servicer.serving() == (False, f"EP group failed: {failed.reason}")
            finally:
                engine.parallel = None
            assert await both() == serving
            servicer.start_drain()  # SIGTERM
            assert await both() == not_serving
            assert (await asyncio.wait_for(watch.read(), 5)).status == HS.NOT_SERVING
            watch.cancel()
        finally:
            await channel.close()
            await server.stop(None)
            servicer.stop()

    asyncio.run(go())
