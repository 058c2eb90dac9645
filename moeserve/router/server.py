"""`moeserve router`: the OpenAI HTTP front end and moeserve.v1.Router gRPC over the workers."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import socket
import uuid
from pathlib import Path

import grpc
import uvicorn

from moeserve.api import common_pb2, router_pb2, router_pb2_grpc
from moeserve.api.wire import abort_with, logprobs_to_proto, sampling_from_proto
from moeserve.common import aio
from moeserve.common.errors import InvalidRequestError, MoeServeError, UnavailableError
from moeserve.common.grpc_guard import MalformedRequestInterceptor
from moeserve.common.heap import pin_mmap_threshold
from moeserve.common.launch_plan import STARTUP_TIMEOUT_S
from moeserve.common.listen_line import announce_listening
from moeserve.common.structured import check_structured
from moeserve.common.tls import add_port, add_tls_arguments, tls_from_args
from moeserve.common.worker_auth import add_worker_auth_arguments, worker_auth_from_env
from moeserve.router.auth import ApiKeyMiddleware, ApiKeys, GrpcApiKeyInterceptor, keys_from_sources
from moeserve.router.chat import add_chat_arguments, chat_options, prepare_tokenizer
from moeserve.router.choices import run_choices
from moeserve.router.config import resolve_router_config, track_explicit_flags
from moeserve.router.connection_timeouts import timed_http_protocol, uvicorn_keep_alive
from moeserve.router.frontend import Frontend, Usage
from moeserve.router.http_app import OpenStreams, create_app
from moeserve.router.limits import HttpLimits, check_stop
from moeserve.router.metrics import RouterMetrics
from moeserve.router.openapi import install_openapi
from moeserve.router.policy import Policy
from moeserve.router.prefix_index import PrefixIndex
from moeserve.router.serving import Router
from moeserve.router.settings import RouterSettings, settings_from_args
from moeserve.router.tokenizer import load_tokenizer
from moeserve.router.workers import WorkerPool

__all__ = ["RouterServicer", "add_router_parser", "metrics_port_keys", "serve_router"]

logger = logging.getLogger(__name__)


class RouterServicer(router_pb2_grpc.RouterServicer):
    def __init__(self, frontend: Frontend, pool: WorkerPool, limits: HttpLimits | None = None,
                 streams: OpenStreams | None = None):  # fmt: skip
        self.frontend = frontend
        self.pool = pool
        self.limits = limits or HttpLimits()
        # The HTTP app's, once it exists: a shutdown that cuts streams ends these with
        # UNAVAILABLE naming it, not a silently closed call.
        self.streams = streams or OpenStreams()

    async def Generate(self, request, context):
        f = self.frontend
        try:
            kind = request.WhichOneof("prompt")
            if kind is None:
                raise InvalidRequestError("set prompt.text or prompt.token_ids", param="prompt")
            check_stop(request.stop, self.limits)
            prompt = await f.prompt_ids_async(
                request.text if kind == "text" else list(request.token_ids.ids))
            params = sampling_from_proto(request.sampling)
            if params.structured is not None:  # before dispatch, as on HTTP
                check_structured(params.structured, "sampling.structured")
            f.check_length(prompt, params, "prompt")
            rid = request.request_id or f"grpc-{uuid.uuid4().hex}"
            usage = Usage()
            timeout = context.time_remaining()  # the client's gRPC deadline, end to end
            n = request.n or 1
            if n > 128:
                raise InvalidRequestError(f"n must be in [1, 128], got {n}", param="n")
            if n > 1:
                deltas = run_choices(f, rid, prompt, params, n, list(request.stop), usage,
                                     timeout)
            else:
                deltas = f.run(rid, prompt, params, list(request.stop), usage, timeout)
            finished = 0
            async for d in self.streams.guard(deltas):
                msg = router_pb2.GenerateResponse(
                    request_id=rid, token_ids=d.token_ids, finished=d.finished,
                    finish_reason=d.finish_reason or "",
                    text=d.text if request.detokenize else "", index=d.index,
                )  # fmt: skip
                if d.logprobs:
                    msg.logprobs.extend(logprobs_to_proto(lp) for lp in d.logprobs)
                finished += d.finished
                if finished == n and d.finished:  # the last choice's last message
                    msg.usage.prompt_tokens = usage.prompt_tokens
                    msg.usage.completion_tokens = usage.completion_tokens
                    msg.usage.cached_tokens = usage.cached_tokens
                yield msg
        except MoeServeError as e:
            await abort_with(context, e)

    async def Health(self, request, context):
        ok = bool(self.pool.healthy("decode")) and not self.frontend.router.draining
        info = self.pool.model_info()
        return common_pb2.HealthResponse(
            status=common_pb2.HealthResponse.SERVING
            if ok
            else common_pb2.HealthResponse.NOT_SERVING,
            role="router",
            model_id=self.frontend.model_id,
            block_size=info.block_size if info else 0,
            max_model_len=self.frontend.max_model_len,
        )


class _DrainingServer(uvicorn.Server):
    """SIGTERM/SIGINT drain the router first: /health turns 503 (the load balancer stops sending),
    new requests get 503, requests in flight finish within the grace period; then uvicorn
    stops. A second signal stops at once."""

    def __init__(self, config: uvicorn.Config, router: Router, grace_s: float,
                 streams: OpenStreams | None = None):
        super().__init__(config)
        self.router = router
        self.grace_s = grace_s
        self.streams = streams or OpenStreams()
        self._drain_task: asyncio.Task | None = None

    def handle_exit(self, sig: int, frame: object) -> None:
        if self.router.draining:
            # Streams still open end with an error event, not a silently closed connection.
            self.streams.close()
            super().handle_exit(sig, frame)
            return
        self.router.draining = True
        self.router.pool.stopping = True
        loop = asyncio.get_event_loop()
        loop.call_soon_threadsafe(self._start_drain)

    def _start_drain(self) -> None:
        self._drain_task = asyncio.get_running_loop().create_task(self._drain())

    async def _drain(self) -> None:
        n = self.router.inflight
        logger.info("router draining: %d requests in flight, grace %.1f s", n, self.grace_s)
        clean = await self.router.wait_idle(self.grace_s)
        logger.log(logging.INFO if clean else logging.WARNING, "router drained (%s); exiting",
                   "clean" if clean else "grace period over")
        if not clean:
            self.streams.close()
            await asyncio.sleep(0.2)  # let the error events go out before the sockets close
        self.should_exit = True


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    # Accepted sockets inherit this on Linux. Without it a kept-alive connection's response
    # body waits for the client's delayed ACK of the headers: +40 ms per request.
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.bind((host, port))
    sock.listen(1024)
    sock.setblocking(False)
    return sock


def http_limits(args: argparse.Namespace) -> HttpLimits:
    return HttpLimits(
        max_buffered_bytes=args.max_buffered_bytes, header_timeout_s=args.header_timeout_s,
        keep_alive_timeout_s=args.keep_alive_timeout_s, body_timeout_s=args.body_timeout_s,
        max_stop_strings=args.max_stop_strings, max_stop_length=args.max_stop_length,
    )  # fmt: skip


def metrics_port_keys(args: argparse.Namespace, keys: list[str]) -> list[str]:
    """Keys the separate metrics port checks: the API keys under --api-key-metrics, as on the
    HTTP port's /metrics; none (open) otherwise."""
    return list(keys) if getattr(args, "api_key_metrics", False) else []


async def serve_router(args: argparse.Namespace) -> None:
    cfg = resolve_router_config(args)  # flags > --config file > defaults, into args too
    chat = chat_options(args)
    tokenizer = load_tokenizer(args.model)  # before the workers: a bad template fails fast
    prepare_tokenizer(tokenizer, args, chat)
    metrics = RouterMetrics()
    index = PrefixIndex()
    tls = tls_from_args(args)
    auth = worker_auth_from_env("router", args.insecure_worker_plane)
    pin_mmap_threshold()  # huge prompts must not leave the heap holding freed MiB (heap.py)
    key_list = keys_from_sources(args.api_key)
    keys = ApiKeys(key_list)
    if cfg.metrics_port is not None:
        from moeserve.common.metrics import start_metrics_server

        # Up before any worker is: on Kubernetes the liveness probe reads this port while the
        # router still waits for its first decode worker (minutes for a DeepSeek checkpoint).
        start_metrics_server(cfg.metrics_port, cfg.host, metrics.registry,
                             keys=metrics_port_keys(args, key_list))
    pool_kw = dict(probe_interval_s=args.probe_interval_s, eject_base_s=args.eject_base_s,
                   eject_max_s=args.eject_max_s, tls=tls, auth=auth)  # fmt: skip
    if cfg.discovery is not None:
        from moeserve.router.discovery_k8s import K8sWorkerPool

        pool: WorkerPool = K8sWorkerPool(cfg.discovery, index, metrics, **pool_kw)
    else:
        pool = WorkerPool(list(cfg.prefill), list(cfg.decode), index, metrics, **pool_kw)
    pool.start()
    try:
        if cfg.discovery is not None:  # on a fresh cluster no worker exists yet
            await pool.wait_for_decode(args.startup_timeout_s)  # type: ignore[attr-defined]
        elif not await pool.wait_ready(args.startup_timeout_s) and pool.model_info() is None:
            raise UnavailableError(f"no worker answered within {args.startup_timeout_s} s")
        info = pool.model_info()
        config_path = Path(args.model) / "config.json"
        vocab_size = json.loads(config_path.read_text())["vocab_size"]
        settings = settings_from_args(args)
        # Block hashes use the workers' model id (their KV events carry them); clients see the
        # served name, which is the same unless --served-model-name renames it here only.
        router = Router(pool, metrics, settings, info.model_id, info.block_size)
        frontend = Frontend(
            router, tokenizer, cfg.model_name or info.model_id,
            info.max_model_len, vocab_size, metrics,
        )  # fmt: skip
        grpc_server = grpc.aio.server(
            options=[("grpc.max_receive_message_length", settings.max_body_bytes)],
            interceptors=[GrpcApiKeyInterceptor(keys), MalformedRequestInterceptor()],
        )
        servicer = RouterServicer(frontend, pool, http_limits(args))
        router_pb2_grpc.add_RouterServicer_to_server(servicer, grpc_server)
        # Clients reach the router's gRPC API like its HTTP one (keys, no client certificate).
        grpc_port = add_port(grpc_server, f"{args.host}:{args.grpc_port}", None)
        await grpc_server.start()
        # Holding for a wake-up needs the router to stay in its Service while at zero.
        app = create_app(frontend, lambda: (bool(pool.healthy("decode")) or router.wake.enabled)
                         and not router.draining, http_limits(args), chat)
        servicer.streams = app.state.streams  # cut at shutdown with the SSE streams
        app.add_middleware(ApiKeyMiddleware, keys=keys, protect_metrics=args.api_key_metrics)
        install_openapi(app, auth=keys.enabled)
        sock = _bind(args.host, args.port)
        http_port = sock.getsockname()[1]
        config = uvicorn.Config(app, log_level="warning", lifespan="off", access_log=False,
                                timeout_graceful_shutdown=2,
                                timeout_keep_alive=uvicorn_keep_alive(args.keep_alive_timeout_s),
                                http=timed_http_protocol(args.header_timeout_s,
                                                         args.keep_alive_timeout_s))
        server = _DrainingServer(config, router, settings.drain_grace_s, app.state.streams)
        # Parsed by `moeserve up` and tests: the real ports when 0 was asked for.
        announce_listening("router", f"http://{args.host}:{http_port}",
                           grpc=f"{args.host}:{grpc_port}")
        try:
            await server.serve(sockets=[sock])
        finally:
            await grpc_server.stop(grace=1)
    finally:
        await pool.close()


def add_router_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    d = RouterSettings()
    p = subparsers.add_parser("router", help="OpenAI HTTP + gRPC router over worker pools")
    p.add_argument("--config", default=None,
                   help="router.yaml (moeserve.router.config); flags given here win over it")
    p.add_argument("--model", default=None, help="checkpoint directory (tokenizer, config)")
    p.add_argument("--served-model-name", default=None,
                   help="the model name clients send and /v1/models lists (default: the "
                        "workers' model id, their --model-id)")
    p.add_argument("--prefill", default="", help="prefill workers, host:port,...")
    p.add_argument("--decode", default="", help="decode workers, host:port,... (or discovery)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000, help="HTTP port (0: any free port)")
    p.add_argument("--grpc-port", type=int, default=0, help="gRPC port (0: any free port)")
    p.add_argument("--policy", choices=[x.value for x in Policy], default=d.policy.value)
    p.add_argument(
        "--disagg-threshold",
        type=int,
        default=d.disagg_threshold,
        help="prefill on a prefill worker only when at least this many prompt "
        "tokens are uncached on the decode worker",
    )
    p.add_argument(
        "--max-inflight",
        type=int,
        default=d.max_inflight,
        help="requests in flight before new ones get 429",
    )
    p.add_argument("--request-timeout-s", type=float, default=d.request_timeout_s)
    p.add_argument("--prefill-timeout-s", type=float, default=d.prefill_timeout_s)
    p.add_argument("--first-token-timeout-s", type=float, default=d.first_token_timeout_s,
                   help="decode worker's first message (KV transfer included), then migrate")
    p.add_argument("--stall-timeout-s", type=float, default=d.stall_timeout_s,
                   help="longest gap between streamed messages before migrating")
    p.add_argument("--max-migrations", type=int, default=d.max_migrations,
                   help="decode worker failures a request survives before a retryable error")
    p.add_argument("--max-inflight-tokens", type=int, default=d.max_inflight_tokens,
                   help="prompt + max_tokens over requests in flight before 429")
    p.add_argument("--max-prompt-tokens", type=int, default=d.max_prompt_tokens,
                   help="longest prompt accepted (0: the model's context)")
    p.add_argument("--max-tokens-limit", type=int, default=d.max_tokens_limit,
                   help="largest max_tokens accepted (0: what fits the context)")
    p.add_argument("--max-body-bytes", type=int, default=d.max_body_bytes,
                   help="HTTP bodies (and gRPC messages) above this get 413")
    h = HttpLimits()
    p.add_argument("--max-buffered-bytes", type=int, default=h.max_buffered_bytes,
                   help="request-body bytes buffered across all requests before new ones get 503")
    p.add_argument("--header-timeout-s", type=float, default=h.header_timeout_s,
                   help="close a connection whose request headers take longer than this")
    p.add_argument("--keep-alive-timeout-s", type=float, default=h.keep_alive_timeout_s,
                   help="close a connection idle this long after its last response (keep it "
                        "above the idle timeout of clients' pools and proxies in front)")
    p.add_argument("--body-timeout-s", type=float, default=h.body_timeout_s,
                   help="a request body not received within this gets 408")
    p.add_argument("--max-stop-strings", type=int, default=h.max_stop_strings,
                   help="stop strings one request may give (more: 400 naming stop)")
    p.add_argument("--max-stop-length", type=int, default=h.max_stop_length,
                   help="characters of one stop string (longer: 400 naming stop)")
    p.add_argument("--wake-hold-s", type=float, default=d.wake_hold_s,
                   help="at zero decode workers, hold a request this long while one wakes")
    p.add_argument("--drain-grace-s", type=float, default=d.drain_grace_s,
                   help="on SIGTERM, let requests in flight finish within this time")
    p.add_argument("--probe-interval-s", type=float, default=1.0, help="active health checks")
    p.add_argument("--eject-base-s", type=float, default=1.0,
                   help="first ejection after a failed call; doubles per repeat")
    p.add_argument("--eject-max-s", type=float, default=30.0)
    p.add_argument("--startup-timeout-s", type=float, default=STARTUP_TIMEOUT_S,
                   help="how long to wait for a worker (a decode worker under discovery) "
                        "before serving or giving up")
    p.add_argument("--api-key", action="append", default=[],
                   help="accepted bearer key (repeatable; also $MOESERVE_API_KEY(S))")
    p.add_argument("--api-key-metrics", action="store_true",
                   help="put /metrics (HTTP and --metrics-port) behind the API key too "
                        "(/health stays open)")
    add_chat_arguments(p)
    add_tls_arguments(p)
    add_worker_auth_arguments(p)
    p.add_argument("--metrics-port", type=int, default=None,
                   help="also serve /metrics on this port (it is always on the HTTP port)")
    p.set_defaults(func=lambda args: aio.run(serve_router(args)) or 0)
    track_explicit_flags(p)  # last: the --config file fills the flags not given
    return p  # fmt: skip
