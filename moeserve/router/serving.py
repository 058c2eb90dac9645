"""P/D orchestration: pick workers, prefill remotely or in place, stream tokens, clean up.

``Router.generate`` is the one code path behind both front ends (HTTP and gRPC). It yields
``Chunk``s of token ids; a cancelled consumer (client gone) triggers Abort on every worker that
holds the request. Failures degrade rather than fail: a dead prefill worker means the decode
worker prefills; a decode worker dying before its first token means another one is tried.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import grpc

from moeserve.api import common_pb2, worker_pb2
from moeserve.common.block_hash import hash_blocks
from moeserve.common.errors import (
    InvalidRequestError,
    MoeServeError,
    ResourceExhaustedError,
    UnavailableError,
)
from moeserve.common.sampling import SamplingParams
from moeserve.router.metrics import RouterMetrics
from moeserve.router.policy import Policy, choose, should_disaggregate
from moeserve.router.workers import WorkerClient, WorkerPool

__all__ = ["Chunk", "DeadlineExceededError", "Router", "RouterSettings", "to_proto_sampling"]

logger = logging.getLogger(__name__)


class DeadlineExceededError(MoeServeError):
    http_status = 504
    grpc_code = "DEADLINE_EXCEEDED"
    error_type = "timeout"


@dataclass
class RouterSettings:
    policy: Policy = Policy.PREFIX
    disagg_threshold: int = 0
    max_inflight: int = 256
    request_timeout_s: float = 600.0
    prefill_timeout_s: float = 60.0
    queue_weight: float = 1.0
    kv_weight: float = 4.0
    seed: int = 0


@dataclass
class Chunk:
    token_ids: list[int]
    finished: bool = False
    finish_reason: str | None = None
    num_cached_tokens: int = 0
    kv_transfer_bytes: int = 0


@dataclass
class _Placement:
    decode: WorkerClient
    prefill: WorkerClient | None = None
    involved: list[WorkerClient] = field(default_factory=list)


def to_proto_sampling(p: SamplingParams) -> common_pb2.SamplingParams:
    msg = common_pb2.SamplingParams(
        max_tokens=p.max_tokens, temperature=p.temperature, top_p=p.top_p, top_k=p.top_k,
        stop_token_ids=list(p.stop_token_ids), ignore_eos=p.ignore_eos,
    )  # fmt: skip
    if p.seed is not None:
        msg.seed = p.seed
    return msg


def _rpc_error(e: grpc.RpcError, what: str) -> MoeServeError:
    code, details = e.code(), e.details() or ""
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        param = dict(e.trailing_metadata() or ()).get("moeserve-param") or None
        return InvalidRequestError(details, param=param)
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return ResourceExhaustedError(details)
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return DeadlineExceededError(f"{what} exceeded its deadline")
    return UnavailableError(f"{what} failed: {code.name} {details}")


class Router:
    def __init__(
        self, pool: WorkerPool, metrics: RouterMetrics, settings: RouterSettings, model_id: str,
        block_size: int,
    ):  # fmt: skip
        self.pool = pool
        self.metrics = metrics
        self.settings = settings
        self.model_id = model_id
        self.block_size = block_size
        self.inflight = 0
        self._counter = 0
        self._rng = random.Random(settings.seed)
        self._background: set[asyncio.Task] = set()

    def _pick(self, clients: list[WorkerClient], hashes: list[int]) -> tuple[WorkerClient, int]:
        cands = self.pool.candidates(clients, hashes)
        s = self.settings
        self._counter += 1
        best = choose(s.policy, cands, self._counter, self._rng, s.queue_weight, s.kv_weight)
        return self.pool.clients[best.name], best.overlap_blocks

    def _abort_everywhere(self, rid: str, workers: list[WorkerClient]) -> None:
        """Fire-and-forget: runs outside the cancelled request's scope."""

        async def abort() -> None:
            req = worker_pb2.AbortRequest(request_ids=[rid])
            await asyncio.gather(
                *(w.stub.Abort(req, timeout=2.0) for w in workers), return_exceptions=True
            )

        task = asyncio.get_running_loop().create_task(abort())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def generate(
        self, rid: str, prompt: list[int], params: SamplingParams
    ) -> AsyncIterator[Chunk]:
        """Stream the request's tokens. Raises MoeServeError subclasses (HTTP/gRPC mapped)."""
        if self.inflight >= self.settings.max_inflight:
            self.metrics.requests_rejected.labels("max_inflight").inc()
            raise ResourceExhaustedError(
                f"router at capacity ({self.settings.max_inflight} requests in flight); retry"
            )
        self.inflight += 1
        self.metrics.requests_in_flight.set(self.inflight)
        deadline = time.monotonic() + self.settings.request_timeout_s
        involved: list[WorkerClient] = []
        finished = False
        try:
            async for chunk in self._generate(rid, prompt, params, deadline, involved):
                finished = chunk.finished
                yield chunk
        finally:
            self.inflight -= 1
            self.metrics.requests_in_flight.set(self.inflight)
            for w in involved:
                w.inflight -= 1
            if not finished and involved:
                self._abort_everywhere(rid, involved)

    async def _prefill(
        self, p: WorkerClient, rid: str, prompt: list[int], params: SamplingParams, deadline: float
    ) -> worker_pb2.PrefillResponse | None:
        timeout = min(self.settings.prefill_timeout_s, deadline - time.monotonic())
        req = worker_pb2.PrefillRequest(
            request_id=rid, prompt_token_ids=prompt, sampling=to_proto_sampling(params)
        )
        try:
            return await p.stub.Prefill(req, timeout=timeout)
        except grpc.RpcError as e:
            err = _rpc_error(e, f"prefill on {p.address}")
            if isinstance(err, InvalidRequestError):
                raise err from None
            if e.code() == grpc.StatusCode.UNAVAILABLE:
                self.pool.mark_down(p, "Prefill UNAVAILABLE")
            logger.warning("request %s: %s; the decode worker prefills instead", rid, err)
            return None

    async def _generate(
        self, rid: str, prompt: list[int], params: SamplingParams, deadline: float,
        involved: list[WorkerClient],
    ) -> AsyncIterator[Chunk]:  # fmt: skip
        hashes = hash_blocks(prompt, self.block_size, self.model_id)
        tried: set[str] = set()
        first = None
        handle = None
        prefill_cached = 0
        for _attempt in range(2):  # a decode worker dead before its first token: try another
            decoders = [d for d in self.pool.healthy("decode") if d.address not in tried]
            if not decoders:
                raise UnavailableError("no healthy decode worker")
            d, overlap = self._pick(decoders, hashes)
            tried.add(d.address)
            d.inflight += 1
            involved.append(d)
            self.metrics.routed.labels(d.address, d.role_label).inc()
            self.metrics.prefix_cache_queries.labels(d.address, d.role_label).inc(len(prompt))
            self.metrics.prefix_cache_hits.labels(d.address, d.role_label).inc(
                min(overlap * self.block_size, len(prompt))
            )
            prefillers = [p for p in self.pool.healthy("prefill") if p.address != d.address]
            cached = overlap * self.block_size
            # A retry reuses the first attempt's prefilled KV (still leased on the prefiller).
            if handle is None and should_disaggregate(
                len(prompt), cached, self.settings.disagg_threshold, bool(prefillers)
            ):
                p, _ = self._pick(prefillers, hashes)
                p.inflight += 1
                involved.append(p)
                resp = await self._prefill(p, rid, prompt, params, deadline)
                if resp is not None and resp.finished:
                    self.metrics.disaggregated.labels("remote").inc()
                    yield Chunk([resp.first_token_id], True, resp.finish_reason,
                                resp.num_cached_tokens)  # fmt: skip
                    return
                if resp is not None:
                    first, handle = resp.first_token_id, resp.kv_handle
                    prefill_cached = resp.num_cached_tokens
            self.metrics.disaggregated.labels("remote" if handle else "local").inc()
            req = worker_pb2.WorkerGenerateRequest(
                request_id=rid, prompt_token_ids=prompt, sampling=to_proto_sampling(params)
            )
            if handle is not None:
                req.kv_handle.CopyFrom(handle)
                req.first_token_id = first
            got_tokens = False
            call = d.stub.Generate(req, timeout=max(deadline - time.monotonic(), 0.001))
            try:
                async for msg in call:
                    got_tokens = True
                    if msg.kv_transfer_bytes:
                        self.metrics.kv_transfer_bytes.inc(msg.kv_transfer_bytes)
                    yield Chunk(list(msg.token_ids), msg.finished, msg.finish_reason or None,
                                max(msg.num_cached_tokens, prefill_cached),
                                msg.kv_transfer_bytes)  # fmt: skip
                    if msg.finished:
                        return
                raise UnavailableError(f"decode worker {d.address} ended the stream early")
            except grpc.RpcError as e:
                err = _rpc_error(e, f"generate on {d.address}")
                if e.code() != grpc.StatusCode.UNAVAILABLE or got_tokens:
                    raise err from None
                self.pool.mark_down(d, "Generate UNAVAILABLE")
                logger.warning("request %s: %s; trying another decode worker", rid, err)
            finally:
                call.cancel()
        raise UnavailableError("decode workers failed before producing a token")
