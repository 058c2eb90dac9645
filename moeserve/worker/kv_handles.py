"""KV handles as capabilities: who may READ a prefill worker's pinned blocks, and until when.

A NIXL READ is one-sided: once a decode worker knows a prefill worker's memory layout it could
read any block. So a handle's block ids are never trusted. The prefill worker issues each handle
with an unguessable ``handle_id`` (``secrets.token_urlsafe``) bound to one decode worker (its
NIXL agent name) and to the KV lease; the decode worker trades the id for the authoritative
block ids with ``ClaimKV`` before it READs. A claim succeeds once: a forged id, a replayed one, an
expired one, or one issued to another decode worker all get the same PERMISSION_DENIED with the
same message, which says nothing about which of them it was or what the handle held.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass, field

import grpc

from moeserve.api import worker_pb2
from moeserve.common.errors import MoeServeError

__all__ = ["HANDLE_REFUSED", "IssuedHandle", "HandleTable", "KVHandleRefusedError",
           "KVHandleServicer"]

# One message for every refusal, so a prober learns nothing from it.
HANDLE_REFUSED = "KV handle refused"
_TOKEN_BYTES = 32  # 256 bits: guessing one live handle is out of reach


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
