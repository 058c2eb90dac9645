"""Worker gRPC server (`moeserve worker`): moeserve.v1.Worker over one engine.

Roles: ``prefill`` (Prefill keeps blocks pinned and hands out a KV handle), ``decode``
(Generate READs the handle's blocks from the prefill worker with NIXL, or recomputes), ``both``.
The engine runs in its own thread (engine_loop.EngineLoop); handlers only convert messages,
hand work to that thread and map errors to gRPC status codes.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator

import grpc

from moeserve.api import common_pb2, worker_pb2, worker_pb2_grpc
from moeserve.api.wire import abort_with, logprobs_to_proto, sampling_from_proto
from moeserve.common import worker_auth
from moeserve.common.errors import InvalidRequestError, MoeServeError, UnavailableError
from moeserve.common.grpc_guard import MalformedRequestInterceptor
from moeserve.common.listen_line import announce_listening
from moeserve.common.optional import require
from moeserve.common.tls import TlsConfig, add_port, tls_from_args
from moeserve.worker.engine import LLMEngine, freeze_startup_heap
from moeserve.worker.engine_loop import EngineDied, EngineLoop
from moeserve.worker.faults import FaultPlan, parse_faults
from moeserve.worker.gate import WorkerGate
from moeserve.worker.health import add_health_service, serving_state
from moeserve.worker.kv_handoff.agent import KVTransferAgent
from moeserve.worker.kv_handoff.compat import engine_fingerprint
from moeserve.worker.kv_handoff.decode import KVPuller
from moeserve.worker.kv_handoff.prefill import HandleTable, KVHandleServicer, PrefillHandoff
from moeserve.worker.metrics import StreamTiming, WorkerMetrics
from moeserve.worker.scheduler_types import merge_outputs
from moeserve.worker.stop_signals import ignore_stop_signals, on_stop_signals, wait_group_stopped
from moeserve.worker.warmup import build_engine, warm_up
from moeserve.worker.worker_events import EventHub

__all__ = ["WorkerServicer", "serve_worker"]

logger = logging.getLogger(__name__)
# A peer rank takes one engine-loop iteration to see a stop vote; past this it is gone or stuck.
_GROUP_STOP_WAIT_S = 10.0
_NIXL_NEEDED_FOR = "the KV hand-off between prefill and decode workers; --no-nixl runs without it"


class WorkerServicer(KVHandleServicer, worker_pb2_grpc.WorkerServicer):
    def __init__(
        self,
        engine: LLMEngine,
        role: str,
        address: str,
        agent: KVTransferAgent | None,
        metrics: WorkerMetrics,
        lease_s: float = 30.0,
        kv_timeout_s: float = 10.0,
        max_queued: int = 1024,
        faults: FaultPlan | None = None,
        tls: TlsConfig | None = None,
        auth: worker_auth.WorkerAuth | None = None,
    ):
        self.engine = engine
        self.auth = auth  # None: --insecure-worker-plane
        self.role = role
        self.address = address
        self.agent = agent
        self.metrics = metrics
        self.fingerprint = engine_fingerprint(engine)
        self.kv_prefill = PrefillHandoff(agent, address, self.fingerprint, metrics, lease_s,
                                         auth)
        self.hub = EventHub()
        self.loop: EngineLoop | None = None
        self.faults = faults or FaultPlan()
        self.gate = WorkerGate(max_queued)
        self.puller = None
        if agent is not None:
            self.puller = KVPuller(agent, metrics, kv_timeout_s, self.faults, tls, auth)
        if self.faults.active:
            logger.warning("fault injection is ON: %s", self.faults)

    @property
    def handles(self) -> HandleTable:  # what ClaimKV (KVHandleServicer) claims from
        return self.kv_prefill.handles

    def serving(self) -> tuple[bool, str]:
        """(serving, why not): the one answer of this Health RPC and grpc.health.v1.Health."""
        return serving_state(self.loop, self.gate, self.engine)

    def start_drain(self) -> None:
        """SIGTERM: refuse new work and tell the routers (NOT_SERVING, draining in the load)."""
        self.gate.start_drain()
        self.hub.draining = True

    def start(self) -> None:
        self.loop = EngineLoop(self.engine, asyncio.get_running_loop(), on_tick=self._tick,
                               on_step=self.metrics.observe_step)
        self.loop.start()

    def stop(self) -> None:
        """After the gRPC server stopped: the engine thread (with EP, once the whole group
        agreed to stop stepping: see ParallelContext.request_stop), NIXL, the EP group."""
        group = self.engine.parallel
        if group is not None and self.loop is not None and self.loop.alive:
            group.request_stop()
            if not group.stopped.wait(_GROUP_STOP_WAIT_S):
                logger.warning("EP group did not agree to stop within %.0f s", _GROUP_STOP_WAIT_S)
        if self.loop is not None:
            self.loop.stop()
        if self.agent is not None:
            self.agent.close()
        if group is not None:
            group.close()

    # ------------------------------------------------------------ engine thread

    def _tick(self, engine: LLMEngine) -> None:
        """Housekeeping in the engine thread: released/expired leases, events, load, metrics."""
        self.kv_prefill.sweep(engine, time.monotonic())
        events, stats = engine.take_kv_events(), engine.stats()
        m = self.metrics
        m.num_requests_running.set(stats.num_running)
        m.num_requests_waiting.set(stats.num_waiting)
        m.kv_cache_usage_perc.set(stats.kv_usage)
        m.prompt_tokens_computed.set(stats.prompt_tokens_computed)
        self.hub.publish_threadsafe(self.loop._loop, events, stats)

    # ------------------------------------------------------------ RPCs

    async def Prefill(self, request, context):
        arrived = time.perf_counter()  # the worker's TTFT counts the wait at the gate too
        try:
            with self.gate.admit("prefill"):
                return await self._prefill(request, arrived)
        except (MoeServeError, EngineDied) as e:
            await abort_with(context, e)

    async def _prefill(self, request, arrived: float) -> worker_pb2.PrefillResponse:
        rid = request.request_id or uuid.uuid4().hex
        if self.faults.stall_prefill_s:
            await asyncio.sleep(self.faults.stall_prefill_s)
        if self.faults.fail_prefill:
            raise UnavailableError("injected fault: prefill failed")
        stream = self.loop.open_stream(rid)
        done = False
        try:
            params = sampling_from_proto(request.sampling)
            await self._compile_grammar(params)
            prompt = list(request.prompt_token_ids)
            await self.loop.call(lambda e: e.add_request(rid, prompt, params, prefill_only=True))
            self.metrics.prompt_tokens.inc(len(prompt))
            out = await stream.get()
            if isinstance(out, Exception):
                raise out
            done = True
            self.metrics.time_to_first_token.observe(time.perf_counter() - arrived)
            first = out.new_token_ids[0]
            finished = out.finish_reason == "stop" or params.max_tokens <= 1
            blocks = await self.loop.call(lambda e: self.kv_prefill.pin(e, rid, finished))
            self.metrics.prefix_cache_queries.inc(len(prompt))
            self.metrics.prefix_cache_hits.inc(out.num_cached_tokens)
            response = worker_pb2.PrefillResponse(
                request_id=rid,
                first_token_id=first,
                kv_handle=self.kv_prefill.handle(rid, blocks, len(prompt), request.decode_agent),
                num_cached_tokens=out.num_cached_tokens,
                finished=finished,
                finish_reason=out.finish_reason if finished else "",
            )
            if out.new_logprobs:
                response.first_token_logprobs.CopyFrom(logprobs_to_proto(out.new_logprobs[0]))
            return response
        finally:
            self.loop.close_stream(rid)
            if not done:  # cancelled or failed before the handle left: free everything
                await asyncio.shield(self.loop.call(lambda e: e.abort_request(rid)))

    async def _compile_grammar(self, params) -> None:
        """A structured output's matcher, compiled in a thread before the request reaches the
        engine: the step loop then only copies a cached template (worker/grammar.py)."""
        if params.structured is not None:
            await asyncio.to_thread(self.engine.runner.grammars.compiler.compile,
                                    params.structured)

    async def Generate(self, request, context) -> AsyncIterator:
        arrived = time.perf_counter()
        try:
            with self.gate.admit("generate"):
                async for msg in self._generate(request, arrived):
                    yield msg
        except (MoeServeError, EngineDied) as e:
            await abort_with(context, e)

    async def _generate(
        self, request, arrived: float
    ) -> AsyncIterator[worker_pb2.WorkerGenerateResponse]:
        rid = request.request_id or uuid.uuid4().hex
        stream = self.loop.open_stream(rid)
        finished = False
        try:
            params = sampling_from_proto(request.sampling)
            await self._compile_grammar(params)
            prompt = list(request.prompt_token_ids)
            self.metrics.prompt_tokens.inc(len(prompt))
            transferred = nbytes = 0
            kv_s = 0.0
            if request.HasField("kv_handle") and self.puller is not None:
                first = request.first_token_id if request.HasField("first_token_id") else None
                transferred, nbytes, kv_s = await self.puller.pull(
                    self.loop, rid, prompt, params, request.kv_handle, first, self.fingerprint
                )
            else:
                await self.loop.call(lambda e: e.add_request(rid, prompt, params))
            first_msg = True
            sent = 0
            timing = StreamTiming(self.metrics, arrived)
            held = None  # an item taken from the queue that did not merge into a message
            while not finished:
                sent += 1
                await self._inject_stream_fault(sent)
                out, held = (held, None) if held is not None else (await stream.get(), None)
                if isinstance(out, Exception):
                    raise out
                # Outputs of several steps already queued (this loop fell behind the engine)
                # go out as one message: at hundreds of streams a message per token a step
                # costs the worker more host time than the step (benchmarks/stream_overhead).
                while not stream.empty():
                    later = stream.get_nowait()
                    merged = merge_outputs(out, later)
                    if merged is None:
                        held = later
                        break
                    out = merged
                finished = out.finished
                timing.tokens(len(out.new_token_ids), finished)
                self.metrics.generation_tokens.inc(len(out.new_token_ids))
                if first_msg:
                    self.metrics.prefix_cache_queries.inc(len(prompt))
                    self.metrics.prefix_cache_hits.inc(out.num_cached_tokens)
                if finished:
                    self.metrics.request_success.labels(out.finish_reason or "abort").inc()
                msg = worker_pb2.WorkerGenerateResponse(
                    request_id=rid,
                    token_ids=out.new_token_ids,
                    finished=out.finished,
                    finish_reason=out.finish_reason or "",
                    num_cached_tokens=out.num_cached_tokens,
                    num_transferred_tokens=transferred if first_msg else 0,
                    kv_transfer_bytes=nbytes if first_msg else 0,
                    kv_transfer_seconds=kv_s if first_msg else 0.0,
                )
                if params.logprobs is not None:
                    _add_logprobs(msg, out, request if first_msg else None)
                yield msg
                first_msg = False
        finally:
            self.loop.close_stream(rid)
            if not finished:  # client went away or an error: the blocks go back to the pool
                await asyncio.shield(self.loop.call(lambda e: e.abort_request(rid)))

    async def _inject_stream_fault(self, n: int) -> None:
        """Before the stream's ``n``-th message: the injected drop or stall, if any."""
        f = self.faults
        if f.drop_stream_after and n > f.drop_stream_after:
            raise UnavailableError("injected fault: stream dropped")
        if f.stall_stream_after and n > f.stall_stream_after:
            await asyncio.sleep(3600)  # ended by the caller's deadline or cancellation

    async def Abort(self, request, context):
        ids = list(request.request_ids)

        def abort(e: LLMEngine) -> list[str]:
            done = []
            for rid in ids:
                outs = e.abort_request(rid)
                self.loop.emit(outs)  # an open Generate stream ends with "abort"
                if self.kv_prefill.release(e, rid) or outs:
                    done.append(rid)
            return done

        aborted = await self.loop.call(abort)
        return worker_pb2.AbortResponse(aborted=aborted)

    async def Health(self, request, context):
        status = common_pb2.HealthResponse.SERVING
        if not self.serving()[0]:
            status = common_pb2.HealthResponse.NOT_SERVING
        mc = self.engine.model_config
        return common_pb2.HealthResponse(
            status=status,
            role=self.role,
            model_id=self.engine.config.model_id,
            block_size=self.engine.config.block_size,
            compat_fingerprint=self.fingerprint,
            nixl_agent_name=self.agent.name if self.agent else "",
            max_model_len=self.engine.max_model_len,
            eos_token_id=mc.eos_token_id if mc.eos_token_id is not None else 0,
            draining=self.gate.draining,
        )

    async def StreamEvents(self, request, context):
        # Only a router's stream carries token ids.
        async for message in self.hub.subscribe(tokens=self._caller_is_router(context)):
            yield message

    async def GetNixlMetadata(self, request, context):
        if self.agent is None:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "NIXL is disabled here")
        return worker_pb2.GetNixlMetadataResponse(
            agent_name=self.agent.name,
            metadata=self.agent.metadata(),
            compat_fingerprint=self.fingerprint,
        )

    async def ReleaseKV(self, request, context):
        rid, meta, router = request.request_id, context.invocation_metadata(), \
            self._caller_is_router(context)
        released = await self.loop.call(
            lambda e: self.kv_prefill.release_requested(e, rid, router, meta))
        return worker_pb2.ReleaseKVResponse(released=released)

    def _caller_is_router(self, context: grpc.aio.ServicerContext) -> bool:
        """The interceptor let the caller in; is it a router (or is auth off)?"""
        return self.auth is None or self.auth.role_of(
            context.invocation_metadata()) == worker_auth.ROLE_ROUTER


def _add_logprobs(msg: worker_pb2.WorkerGenerateResponse, out, request) -> None:
    """The output's logprobs into ``msg``. A first token that the prefill worker sampled has
    none computed here: ``request`` (the first message's) carries the prefill worker's."""
    if out.new_logprobs is not None:
        msg.logprobs.extend(logprobs_to_proto(lp) for lp in out.new_logprobs)
    elif (request is not None and request.HasField("first_token_logprobs")
          and list(out.new_token_ids[:1]) == [request.first_token_id]):
        msg.logprobs.append(request.first_token_logprobs)


async def serve_worker(args: argparse.Namespace, ready: asyncio.Event | None = None) -> None:
    """Build the engine, start NIXL and gRPC, serve until cancelled."""
    from moeserve.worker.engine_args import engine_config_from_args

    # Both before loading the model: minutes on a real checkpoint.
    auth = worker_auth.worker_auth_from_env("worker", args.insecure_worker_plane)
    if args.nixl:
        require("nixl._api", _NIXL_NEEDED_FOR)
    engine = build_engine(engine_config_from_args(args))
    freeze_startup_heap()
    interceptors = [MalformedRequestInterceptor()]
    if auth is not None:  # first: an unauthenticated call is refused before its bytes are parsed
        interceptors.insert(0, worker_auth.WorkerAuthInterceptor(auth))
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)], interceptors=interceptors)
    tls = tls_from_args(args)
    port = add_port(server, f"{args.host}:{args.port}", tls)
    if port == 0:
        raise InvalidRequestError(f"cannot bind {args.host}:{args.port}", param="port")
    address = f"{args.advertise_host or args.host}:{port}"
    agent = None
    if args.nixl:
        name = f"moeserve-{args.role}-{port}-{uuid.uuid4().hex[:8]}"
        agent = KVTransferAgent(name, engine.kv_cache, num_threads=args.nixl_threads)
    metrics = WorkerMetrics()
    servicer = WorkerServicer(
        engine, args.role, address, agent, metrics, args.kv_lease_s, args.kv_timeout_s,
        args.max_queued, parse_faults(args.faults), tls, auth,
    )  # fmt: skip
    servicer.start()
    await servicer.loop.call(warm_up)  # before serving, on the thread that serves
    stop = asyncio.Event()
    on_stop_signals(stop)
    worker_pb2_grpc.add_WorkerServicer_to_server(servicer, server)
    add_health_service(server, servicer.serving)  # the kubelet's gRPC probes
    if args.metrics_port is not None:
        from moeserve.common.metrics import start_metrics_server, worker_metrics_keys

        keys = worker_metrics_keys(auth.peer_tokens if auth is not None else ())
        httpd = start_metrics_server(args.metrics_port, args.host, metrics.registry, keys=keys)
        metrics_url = f"http://{args.host}:{httpd.server_port}/metrics"
    else:
        metrics_url = None
    await server.start()
    logger.info("worker %s (%s) serving on %s", args.role, engine.config.model_id, address)
    announce_listening("worker", address, metrics=metrics_url)
    if ready is not None:
        ready.set()
    # Left running: cancelling wait_for_termination() cancels the shutdown server.stop() awaits.
    terminated = asyncio.ensure_future(server.wait_for_termination())
    waits = [asyncio.ensure_future(stop.wait())]
    if engine.parallel is not None:  # another rank of the EP group stopped it
        waits.append(asyncio.ensure_future(wait_group_stopped(engine.parallel)))
    try:
        await asyncio.wait([terminated, *waits], return_when=asyncio.FIRST_COMPLETED)
        if stop.is_set():
            servicer.start_drain()
            leases = servicer.kv_prefill.leases  # pinned KV a decode worker may still READ
            ok = await servicer.gate.drain(args.drain_grace_s, lambda: len(leases))
            logger.log(logging.INFO if ok else logging.WARNING, "drained (%s); exiting",
                       "clean" if ok else "grace period over")
        elif engine.parallel is not None and engine.parallel.stopped.is_set():
            servicer.start_drain()
            logger.warning("the EP group stopped; exiting")
    finally:
        for w in waits:
            w.cancel()
        # Long-lived StreamEvents calls end here, cleanly: the routers see the stream close.
        # Left open, server.stop() cancels them and grpc logs a CancelledError traceback each.
        servicer.hub.close()
        await server.stop(grace=1)
        await asyncio.to_thread(servicer.stop)
        if stop.is_set():
            ignore_stop_signals()
