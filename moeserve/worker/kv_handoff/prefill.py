"""Prefill side of the KV hand-off: pinned blocks, leases, handles, ClaimKV and release.

A prefill-only request finishes after its first token with its blocks pinned
(``Scheduler.pinned``). ``PrefillHandoff.pin`` puts them under a lease with an expiry and
``handle`` issues the ``KVHandle`` the router carries to the decode worker. The blocks go back to
the pool on the first of: the release notification attached to the decode side's READ,
``ReleaseKV``, an abort, or the lease's expiry (a decode worker that died or gave up must not
leak them).

Handles are capabilities. A NIXL READ is one-sided: once a decode worker knows a prefill worker's
memory layout it could read any block. So a handle's block ids are never trusted. Each handle
has an unguessable ``handle_id`` (``secrets.token_urlsafe``) bound to one decode worker (its NIXL
agent name) and to the lease; the decode worker trades the id for the authoritative block ids
with ``ClaimKV`` before it READs. A claim succeeds once: a forged id, a replayed one, an expired
one, or one issued to another decode worker all get the same PERMISSION_DENIED with the same
message, which says nothing about which of them it was or what the handle held.

Releasing is scoped the same way: the router may release any request, but a peer's token only
releases a lease whose handle it was given (``ReleaseKV`` with the handle id and its agent name
in the metadata, see :func:`release_metadata`; a READ's notification only from the agent the
handle named). Otherwise any worker of the deployment could free another request's blocks.
"""

from __future__ import annotations

import hmac
import logging
import secrets
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import grpc

from moeserve.api import worker_pb2
from moeserve.common.errors import MoeServeError
from moeserve.common.worker_auth import WorkerAuth
from moeserve.worker.kv_handoff.signing import sign_handle

if TYPE_CHECKING:
    from moeserve.worker.engine import LLMEngine
    from moeserve.worker.kv_handoff.agent import KVTransferAgent
    from moeserve.worker.metrics import WorkerMetrics

__all__ = ["HANDLE_REFUSED", "HandleTable", "IssuedHandle", "KVHandleRefusedError",
           "KVHandleServicer", "LeaseTable", "PrefillHandoff", "RELEASE_HANDLE_HEADER",
           "RELEASE_AGENT_HEADER", "release_metadata"]

logger = logging.getLogger(__name__)

# One message for every refusal, so a prober learns nothing from it.
HANDLE_REFUSED = "KV handle refused"
_TOKEN_BYTES = 32  # 256 bits: guessing one live handle is out of reach
# Metadata, not ReleaseKVRequest fields: what a peer proves it was handed (the handle id is the
# capability; the agent name is the one the handle was issued to).
RELEASE_HANDLE_HEADER = "x-moeserve-kv-handle"
RELEASE_AGENT_HEADER = "x-moeserve-kv-agent"


def release_metadata(handle_id: str, decode_agent: str) -> tuple[tuple[str, str], ...]:
    """What a decode worker (NIXL agent ``decode_agent``) sends with ReleaseKV for a handle it
    was given."""
    return ((RELEASE_HANDLE_HEADER, handle_id), (RELEASE_AGENT_HEADER, decode_agent))


class KVHandleRefusedError(MoeServeError):
    http_status = 403
    grpc_code = "PERMISSION_DENIED"
    error_type = "kv_handle_refused"


@dataclass(frozen=True)
class IssuedHandle:
    request_id: str
    decode_agent: str
    block_ids: tuple[int, ...]
    num_tokens: int
    expires_at: float


@dataclass
class HandleTable:
    """Issued, unclaimed handles by id. Issue and claim run on the servicer's event loop, drops
    in the engine thread: scans copy the items first and deletions tolerate a missing key."""

    # A claim this close to the lease's end is refused: the READ that follows must finish
    # before the blocks go back to the pool (the decode worker recomputes instead).
    claim_margin_s: float = 1.0
    _issued: dict[str, IssuedHandle] = field(default_factory=dict)

    def issue(self, request_id: str, decode_agent: str, block_ids: list[int], num_tokens: int,
              now: float, lease_s: float) -> str:  # fmt: skip
        self.prune(now)
        handle_id = secrets.token_urlsafe(_TOKEN_BYTES)
        self._issued[handle_id] = IssuedHandle(
            request_id, decode_agent, tuple(block_ids), num_tokens, now + lease_s
        )
        return handle_id

    def claim(self, handle_id: str, decode_agent: str, now: float) -> IssuedHandle:
        """The handle's blocks, once, for the decode worker it was issued to, within its lease."""
        issued = self._issued.get(handle_id)
        # A foreign claimer does not burn the handle: the rightful decode worker may still come.
        if issued is None or not decode_agent or issued.decode_agent != decode_agent:
            raise KVHandleRefusedError(HANDLE_REFUSED)
        if self._issued.pop(handle_id, None) is None:  # claimed concurrently: a replay
            raise KVHandleRefusedError(HANDLE_REFUSED)
        if issued.expires_at - self.claim_margin_s <= now:  # blocks released, or about to be
            raise KVHandleRefusedError(HANDLE_REFUSED)
        return issued

    def drop_request(self, request_id: str) -> None:
        """The request's blocks went back to the pool (release, abort, expiry): void its handles."""
        for hid, issued in tuple(self._issued.items()):
            if issued.request_id == request_id:
                self._issued.pop(hid, None)

    def prune(self, now: float) -> None:
        for hid, issued in tuple(self._issued.items()):
            if issued.expires_at <= now:
                self._issued.pop(hid, None)

    def __len__(self) -> int:
        return len(self._issued)


class KVHandleServicer:
    """The ClaimKV RPC, mixed into the worker servicer (which sets ``handles``)."""

    handles: HandleTable

    async def ClaimKV(self, request: worker_pb2.ClaimKVRequest,
                      context: grpc.aio.ServicerContext) -> worker_pb2.ClaimKVResponse:  # fmt: skip
        try:
            issued = self.handles.claim(request.handle_id, request.decode_agent, time.monotonic())
        except KVHandleRefusedError as e:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, str(e))
        return worker_pb2.ClaimKVResponse(request_id=issued.request_id,
                                          block_ids=list(issued.block_ids),
                                          num_tokens=issued.num_tokens)  # fmt: skip


@dataclass
class _Lease:
    block_ids: list[int]
    expires_at: float
    handle_id: str = ""  # set when the handle is issued; who may release the lease
    decode_agent: str = ""


@dataclass
class LeaseTable:
    """Pinned prefill blocks handed out to decode workers, each with a deadline.

    The prefill worker adds a lease when Prefill returns a handle; the lease ends when the decode
    side's release notification or ReleaseKV arrives (``release``), or when it expires
    (``expired``): a decode worker that died or gave up must not leak the blocks.
    """

    default_lease_s: float = 30.0
    _leases: dict[str, _Lease] = field(default_factory=dict)

    def add(
        self, request_id: str, block_ids: list[int], now: float, lease_s: float | None = None
    ) -> None:
        lease = self.default_lease_s if lease_s is None else lease_s
        self._leases[request_id] = _Lease(list(block_ids), now + lease)

    def bind(self, request_id: str, handle_id: str, decode_agent: str) -> None:
        """The lease's handle was issued to ``decode_agent``: the one peer that may end it."""
        lease = self._leases.get(request_id)
        if lease is not None:
            lease.handle_id, lease.decode_agent = handle_id, decode_agent

    def held_by(self, request_id: str, decode_agent: str, handle_id: str | None = None) -> bool:
        """The lease exists, was handed to ``decode_agent`` and (when given) under ``handle_id``
        (compared in constant time)."""
        lease = self._leases.get(request_id)
        if lease is None or not lease.decode_agent or lease.decode_agent != decode_agent:
            return False
        return handle_id is None or hmac.compare_digest(lease.handle_id.encode(),
                                                        handle_id.encode())

    def release(self, request_id: str) -> list[int] | None:
        """Block ids of the lease, removed; None when it is unknown or already released."""
        lease = self._leases.pop(request_id, None)
        return None if lease is None else lease.block_ids

    def expired(self, now: float) -> list[str]:
        """Request ids whose lease ran out, removed from the table."""
        gone = [rid for rid, lease in self._leases.items() if lease.expires_at <= now]
        for rid in gone:
            del self._leases[rid]
        return gone

    def __contains__(self, request_id: object) -> bool:
        return request_id in self._leases

    def __len__(self) -> int:
        return len(self._leases)


class PrefillHandoff:
    """The prefill worker's half of the hand-off: what it pinned, for whom, until when.

    ``pin``, ``release`` and ``sweep`` run in the engine thread (they free blocks); ``handle``
    and ``ClaimKV`` on the server's event loop.
    """

    def __init__(self, agent: KVTransferAgent | None, address: str, fingerprint: str,
                 metrics: WorkerMetrics, lease_s: float = 30.0,
                 auth: WorkerAuth | None = None):  # fmt: skip
        self.agent = agent
        self.auth = auth  # signs handles (kv_handoff.signing)
        self.address = address
        self.fingerprint = fingerprint
        self.metrics = metrics
        self.leases = LeaseTable(default_lease_s=lease_s)
        self.handles = HandleTable()

    def pin(self, engine: LLMEngine, request_id: str, finished: bool) -> list[int]:
        """Keep a finished prefill's blocks for a decode worker, under a lease. A request that
        ended with its first token, or a worker without NIXL, releases them at once."""
        if finished or self.agent is None:
            engine.release_pinned(request_id)
            return []
        blocks = engine.pinned_blocks(request_id)
        self.leases.add(request_id, blocks, time.monotonic())
        return blocks

    def handle(self, request_id: str, blocks: list[int], num_tokens: int,
               decode_agent: str) -> worker_pb2.KVHandle:  # fmt: skip
        """The handle for ``blocks``, claimable once by ``decode_agent`` within the lease."""
        lease_s = self.leases.default_lease_s
        handle_id = ""
        if blocks:
            handle_id = self.handles.issue(request_id, decode_agent, blocks, num_tokens,
                                           time.monotonic(), lease_s)  # fmt: skip
            self.leases.bind(request_id, handle_id, decode_agent)
        return sign_handle(self.auth, worker_pb2.KVHandle(
            agent_name=self.agent.name if self.agent else "",
            request_id=request_id,
            block_ids=blocks,
            num_tokens=num_tokens,
            lease_ms=int(lease_s * 1000),
            compat_fingerprint=self.fingerprint,
            worker_address=self.address,
            decode_agent=decode_agent,
            handle_id=handle_id,
        ))

    def release(self, engine: LLMEngine, request_id: str) -> bool:
        """End the lease, void unclaimed handles, free the blocks; False when none were pinned."""
        self.leases.release(request_id)
        self.handles.drop_request(request_id)
        return engine.release_pinned(request_id)

    def release_requested(self, engine: LLMEngine, request_id: str, by_router: bool,
                          metadata: Iterable[tuple[str, Any]] | None) -> bool:  # fmt: skip
        """ReleaseKV. From the router: any request. From a peer: only the lease of a handle
        issued to the agent it names, proven by the handle's id (both in ``metadata``); False,
        as for an unknown request, for anything else."""
        if not by_router:
            meta = {k: v for k, v in metadata or () if isinstance(v, str)}
            hid, agent = meta.get(RELEASE_HANDLE_HEADER, ""), meta.get(RELEASE_AGENT_HEADER, "")
            if not hid or not self.leases.held_by(request_id, agent, hid):
                return False
        return self.release(engine, request_id)

    def sweep(self, engine: LLMEngine, now: float) -> None:
        """Engine-thread tick: blocks whose READ notified completion, and expired leases."""
        if self.agent is not None:
            for reader, request_id in self.agent.take_released_requests():
                if self.leases.held_by(request_id, reader):
                    self.release(engine, request_id)
            for request_id in self.leases.expired(now):
                logger.warning("KV lease of %s expired uncollected; releasing its blocks",
                               request_id)  # fmt: skip
                self.release(engine, request_id)
                self.metrics.expired_kv_leases.inc()
        self.metrics.pinned_kv_leases.set(len(self.leases))
