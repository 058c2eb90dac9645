"""P/D orchestration: pick workers, prefill remotely or in place, stream tokens, survive faults.

``Router.generate`` is the one code path behind both front ends (HTTP and gRPC). It yields
``Chunk``s of token ids; a cancelled consumer (client gone) triggers Abort on every worker that
holds the request. Every phase has a deadline: prefill (``handoff.run_prefill``: retry on
another prefill worker, then prefill on the decode worker), first decode token (covers the KV
transfer, which the decode worker itself bounds and recomputes after), and the gap between two
streamed messages. A decode worker that dies, breaks its stream or stalls is ejected and the
request migrates: it resumes on another decode worker with prompt + the tokens already sent, so
the client's stream goes on with no token missing or repeated (greedy output equals the
uninterrupted run). Past ``max_migrations`` the request ends with a retryable error.

Workers never see a client's request id: each request gets its own internal id (a UUID,
``<id>.m<n>`` per migration), so no id a client picks can reach another request; the client's
is a label in logs and responses. A stream whose worker the health probe finds gone migrates at
once, without waiting out the stall timeout.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
import random
import time
import uuid
from array import array
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc

from moeserve.api import worker_pb2
from moeserve.api.wire import error_from_rpc, logprobs_from_proto, sampling_to_proto
from moeserve.common.block_hash import hash_blocks
from moeserve.common.errors import DeadlineExceededError, ResourceExhaustedError, UnavailableError
from moeserve.common.sampling import SamplingParams, TokenLogprobs
from moeserve.common.structured import with_replay
from moeserve.router.handoff import run_prefill
from moeserve.router.metrics import RouterMetrics
from moeserve.router.policy import Policy, choose, should_disaggregate
from moeserve.router.rpc import AttemptFailed, KVRefused, MigrationLimitError
from moeserve.router.settings import RouterSettings
from moeserve.router.stream_watch import StreamWatch
from moeserve.router.wake import WakeGate
from moeserve.router.workers import WorkerClient, WorkerPool

__all__ = ["Chunk", "DeadlineExceededError", "Router"]

logger = logging.getLogger(__name__)


@dataclass
class Chunk:
    token_ids: list[int]
    finished: bool = False
    finish_reason: str | None = None
    num_cached_tokens: int = 0
    kv_transfer_bytes: int = 0
    # One per token when the request asked for logprobs (the raw model distribution).
    logprobs: list[TokenLogprobs] | None = None


def _chunk_logprobs(token_ids, logprobs) -> list[TokenLogprobs] | None:
    """A worker message's logprobs (repeated TokenLogprobs), or None when it sent none."""
    if not logprobs:
        return None
    return [logprobs_from_proto(t, lp) for t, lp in zip(token_ids, logprobs, strict=False)]


def _stable_key(prompt: list[int]) -> int:
    """Tie-break key from the prompt itself, so router replicas with the same view agree."""
    digest = hashlib.blake2b(array("I", prompt).tobytes(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


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
        self.inflight_tokens = 0
        self.draining = False
        self._idle = asyncio.Event()
        # Round-robin turns per set of candidates: one counter shared by the decode and the
        # prefill pick of each request advanced twice a request, so with two decode workers
        # every request went to the same one.
        self._turns: dict[frozenset[str], int] = {}
        self._rng = random.Random(settings.seed)
        self.wake = WakeGate(settings.wake_hold_s, metrics.registry)
        self._background: set[asyncio.Task] = set()

    def pick(
        self, clients: list[WorkerClient], hashes: list[int], key: int
    ) -> tuple[WorkerClient, int]:
        cands = self.pool.candidates(clients, hashes)
        s = self.settings
        turn = key
        if s.policy is not Policy.PREFIX:
            group = frozenset(c.address for c in clients)
            if group not in self._turns and len(self._turns) >= 64:
                self._turns.clear()  # sets change as workers come and go: keep few
            turn = self._turns[group] = self._turns.get(group, 0) + 1
        best = choose(s.policy, cands, turn, self._rng, s.queue_weight, s.kv_weight)
        return self.pool.clients[best.name], best.overlap_blocks

    def explain(self, prompt: list[int]) -> dict:
        """Where ``prompt`` would go now (decode worker, prefill worker or None, overlap)."""
        hashes, key = hash_blocks(prompt, self.block_size, self.model_id), _stable_key(prompt)
        decoders = self.pool.healthy("decode")
        if not decoders:
            raise UnavailableError("no healthy decode worker")
        d, overlap = self.pick(decoders, hashes, key)
        prefill = [p for p in self.pool.healthy("prefill")
                   if p.address != d.address and self.pool.compatible(p, d)]  # fmt: skip
        p = None
        if should_disaggregate(len(prompt), overlap * self.block_size,
                               self.settings.disagg_threshold, bool(prefill)):  # fmt: skip
            p = self.pick(prefill, hashes, key)[0].address
        return {"decode": d.address, "prefill": p, "overlap_blocks": overlap}

    def _abort(self, rid: str, workers: list[WorkerClient]) -> None:
        """Fire-and-forget: runs outside the cancelled request's scope."""

        async def abort() -> None:
            req = worker_pb2.AbortRequest(request_ids=[rid])
            await asyncio.gather(
                *(w.stub.Abort(req, timeout=2.0) for w in workers), return_exceptions=True
            )

        task = asyncio.get_running_loop().create_task(abort())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _admit(self, prompt: list[int], params: SamplingParams) -> int:
        s = self.settings
        if self.draining:
            self.metrics.requests_rejected.labels("draining").inc()
            raise UnavailableError("router is draining; send the request to another replica")
        if self.inflight >= s.max_inflight:
            self.metrics.requests_rejected.labels("max_inflight").inc()
            raise ResourceExhaustedError(
                f"router at capacity ({s.max_inflight} requests in flight); retry"
            )
        cost = len(prompt) + params.max_tokens
        if self.inflight_tokens + cost > s.max_inflight_tokens and self.inflight:
            self.metrics.requests_rejected.labels("max_inflight_tokens").inc()
            raise ResourceExhaustedError(
                f"router at capacity ({self.inflight_tokens} of {s.max_inflight_tokens} tokens "
                "in flight); retry"
            )
        return cost

    async def generate(
        self, rid: str, prompt: list[int], params: SamplingParams, timeout_s: float | None = None
    ) -> AsyncIterator[Chunk]:
        """Stream the request's tokens. Raises MoeServeError subclasses (HTTP/gRPC mapped)."""
        cost = self._admit(prompt, params)
        self.inflight += 1
        self.inflight_tokens += cost
        self._idle.clear()
        self.metrics.requests_in_flight.set(self.inflight)
        limit = self.settings.request_timeout_s
        deadline = time.monotonic() + (min(limit, timeout_s) if timeout_s else limit)
        involved: list[tuple[WorkerClient, str]] = []
        finished = False
        internal = uuid.uuid4().hex  # the id workers see; ``rid`` is the client's label
        try:
            async for chunk in self._generate(rid, internal, prompt, params, deadline, involved):
                finished = chunk.finished
                yield chunk
        finally:
            self.inflight -= 1
            self.inflight_tokens -= cost
            if self.inflight == 0:
                self._idle.set()
            self.metrics.requests_in_flight.set(self.inflight)
            for w, _ in involved:
                w.inflight -= 1
            if not finished:
                for attempt_rid in dict.fromkeys(r for _, r in involved):
                    self._abort(attempt_rid, [w for w, r in involved if r == attempt_rid])

    async def wait_idle(self, timeout_s: float) -> bool:
        """Router drain: True once no request is in flight (or False after ``timeout_s``)."""
        if self.inflight == 0:
            return True
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
            return True
        except TimeoutError:
            return False

    async def _generate(
        self, rid: str, internal: str, prompt: list[int], params: SamplingParams,
        deadline: float, involved: list[tuple[WorkerClient, str]],
    ) -> AsyncIterator[Chunk]:  # fmt: skip
        generated: list[int] = []
        migrations = 0
        avoid: set[str] = set()
        while True:
            attempt_rid = internal if migrations == 0 else f"{internal}.m{migrations}"
            rest = dataclasses.replace(
                params, max_tokens=params.max_tokens - len(generated),
                min_tokens=max(params.min_tokens - len(generated), 0),
                # penalties count them and a seeded stream continues after them
                prior_output_tokens=params.prior_output_tokens + len(generated),
                # the new worker's matcher first consumes the tokens already sent
                structured=with_replay(params.structured, len(generated)),
            )  # fmt: skip
            try:
                attempt = self._attempt(attempt_rid, prompt + generated, rest, deadline,
                                        involved, avoid)  # fmt: skip
                async for chunk in attempt:
                    generated.extend(chunk.token_ids)
                    yield chunk
                    if chunk.finished:
                        return
            except AttemptFailed as f:
                avoid.add(f.worker.address)
                self._abort(attempt_rid, [f.worker])
                if f.eject:
                    self.pool.report_failure(f.worker, f.reason)
                migrations += 1
                if migrations > self.settings.max_migrations:
                    self.metrics.migration_limit_hit.inc()
                    raise MigrationLimitError(
                        f"request {rid} lost its decode worker {migrations} times (last: "
                        f"{f.reason}); migration limit {self.settings.max_migrations} reached, "
                        "retry the request"
                    ) from None
                when = "mid_stream" if generated else "before_first_token"
                self.metrics.migrations.labels(when).inc()
                logger.warning("request %s (%s): %s; migrating (%s, %d tokens sent, attempt %d)",
                               rid, internal, f.reason, when, len(generated),
                               migrations + 1)  # fmt: skip

    async def _decoders(self, avoid: set[str], deadline: float) -> list[WorkerClient]:
        """Available decode workers, preferring ones not in ``avoid``; waits a little for one."""
        known = any("decode" in c.roles for c in self.pool.clients.values())
        wait_s = self.wake.wait_s(known, self.settings.no_worker_wait_s)
        until = min(deadline, time.monotonic() + wait_s)
        with self.wake.holding(active=self.wake.enabled and not known):
            while True:
                healthy = self.pool.healthy("decode")
                preferred = [d for d in healthy if d.address not in avoid]
                if preferred or healthy:
                    return preferred or healthy
                if time.monotonic() >= until:
                    if self.wake.enabled and not known:
                        raise UnavailableError(f"no decode worker woke within {wait_s:g} s "
                                               "(deployment scaled to zero); retry")
                    raise UnavailableError("no healthy decode worker; retry")
                await asyncio.sleep(0.05)

    def _use(self, w: WorkerClient, rid: str, involved: list[tuple[WorkerClient, str]]) -> None:
        w.inflight += 1
        involved.append((w, rid))

    async def _attempt(
        self, rid: str, prompt: list[int], params: SamplingParams, deadline: float,
        involved: list[tuple[WorkerClient, str]], avoid: set[str],
    ) -> AsyncIterator[Chunk]:  # fmt: skip
        hashes = hash_blocks(prompt, self.block_size, self.model_id)
        key = _stable_key(prompt)
        d, overlap = self.pick(await self._decoders(avoid, deadline), hashes, key)
        self._use(d, rid, involved)
        self.metrics.routed.labels(d.address, d.role_label).inc()
        self.metrics.prefix_cache_queries.labels(d.address, d.role_label).inc(len(prompt))
        self.metrics.prefix_cache_hits.labels(d.address, d.role_label).inc(
            min(overlap * self.block_size, len(prompt))
        )
        has_prefill = any(p.address != d.address for p in self.pool.healthy("prefill"))
        handoff = None
        if should_disaggregate(len(prompt), overlap * self.block_size,
                               self.settings.disagg_threshold, has_prefill):  # fmt: skip
            handoff = await run_prefill(
                self.pool, self.metrics, lambda c: self.pick(c, hashes, key)[0], d, rid, prompt,
                params, self.settings.prefill_timeout_s, deadline,
                lambda p: self._use(p, rid, involved),
            )  # fmt: skip
            resp = handoff.response
            if resp is not None and resp.finished:
                self.metrics.disaggregated.labels("remote").inc()
                first_lp = ([resp.first_token_logprobs]
                            if resp.HasField("first_token_logprobs") else None)
                yield Chunk([resp.first_token_id], True, resp.finish_reason, resp.num_cached_tokens,
                            logprobs=_chunk_logprobs([resp.first_token_id], first_lp))
                return
        remote = handoff is not None and handoff.response is not None
        self.metrics.disaggregated.labels("remote" if remote else "local").inc()
        try:
            async for chunk in self._decode(d, rid, prompt, params, handoff, deadline):
                yield chunk
        except KVRefused:
            # The decode worker refused the prefill worker's KV by name: it prefills instead.
            self.pool.mark_incompatible(handoff.worker, d, "refused by the decode worker")
            self.metrics.handoff_fallbacks.labels("compatibility").inc()
            async for chunk in self._decode(d, f"{rid}.local", prompt, params, None, deadline):
                yield chunk

    async def _decode(
        self, d: WorkerClient, rid: str, prompt: list[int], params: SamplingParams, handoff,
        deadline: float,
    ) -> AsyncIterator[Chunk]:  # fmt: skip
        resp = handoff.response if handoff is not None else None
        req = worker_pb2.WorkerGenerateRequest(
            request_id=rid, prompt_token_ids=prompt, sampling=sampling_to_proto(params)
        )
        if resp is not None:
            req.kv_handle.CopyFrom(resp.kv_handle)
            req.first_token_id = resp.first_token_id
            if resp.HasField("first_token_logprobs"):
                req.first_token_logprobs.CopyFrom(resp.first_token_logprobs)
        prefill_cached = resp.num_cached_tokens if resp is not None else 0
        call = d.stub.Generate(req, timeout=max(deadline - time.monotonic(), 0.001))
        stream = call.__aiter__()
        watch = StreamWatch()
        got = False
        try:
            with d.watching_lost(watch.worker_lost):
                while True:
                    msg = await self._next(d, stream, got, deadline, watch)
                    got = True
                    if msg.kv_transfer_bytes:
                        self.metrics.kv_transfer_bytes.inc(msg.kv_transfer_bytes)
                        self.metrics.kv_transfer_seconds.observe(msg.kv_transfer_seconds)
                    yield Chunk(list(msg.token_ids), msg.finished, msg.finish_reason or None,
                                max(msg.num_cached_tokens, prefill_cached),
                                msg.kv_transfer_bytes,
                                _chunk_logprobs(msg.token_ids, msg.logprobs))  # fmt: skip
                    if msg.finished:
                        self.pool.report_success(d)
                        return
        except grpc.RpcError as e:
            raise self._classify(e, d, got, resp is not None) from None
        finally:
            watch.close()
            if not call.done():  # a finished call has nothing to cancel; skip the C call
                call.cancel()

    async def _next(self, d: WorkerClient, stream, got: bool, deadline: float,
                    watch: StreamWatch) -> worker_pb2.WorkerGenerateResponse:  # fmt: skip
        """The stream's next message within the first-token or stall timeout; a worker the
        health probe found gone (``watch``) ends the wait at once."""
        s = self.settings
        phase = "stream_stall" if got else "first_token"
        wait = s.stall_timeout_s if got else s.first_token_timeout_s
        remaining = deadline - time.monotonic()
        # Decided before waiting: the loop's clock (uvloop's is the millisecond libuv clock)
        # may fire a hair before time.monotonic() reaches the deadline, and a request's own
        # timeout must never read as a stalled worker (ejection).
        by_deadline = remaining <= wait
        try:
            return await watch.next(stream, max(min(wait, remaining), 0.001))
        except StopAsyncIteration:
            raise AttemptFailed(d, f"{d.address} ended the stream early", True) from None
        except TimeoutError:
            if watch.lost is not None:
                raise AttemptFailed(d, f"{d.address} is gone ({watch.lost})", True) from None
            if by_deadline:
                raise DeadlineExceededError("request exceeded its timeout") from None
            self.metrics.phase_timeouts.labels(phase).inc()
            raise AttemptFailed(d, f"{d.address} sent nothing for {wait:.1f} s ({phase})",
                                True) from None  # fmt: skip

    def _classify(self, e: grpc.RpcError, d: WorkerClient, got: bool, had_kv: bool) -> Exception:
        code = e.code()
        err = error_from_rpc(e, f"generate on {d.address}")
        if code == grpc.StatusCode.FAILED_PRECONDITION and had_kv and not got:
            logger.error("decode worker %s refused KV: %s", d.address, e.details())
            return KVRefused(str(err))
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            return DeadlineExceededError("request exceeded its timeout")
        if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
            if len(self.pool.healthy("decode")) <= 1:
                return err  # 429 with Retry-After: nowhere else to go
            return AttemptFailed(d, f"{d.address} is full", False)
        if code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION):
            return err
        return AttemptFailed(d, f"{d.address}: {code.name} {e.details() or ''}".strip(), True)
