"""KV handles signed by their issuer, so a decode worker only ever contacts its deployment's peers.

A decode worker opens a gRPC channel to ``worker_address`` (ClaimKV, GetNixlMetadata,
ReleaseKV) and a NIXL connection to the agent it learns there. Unchecked, whoever can hand it a
KV handle picks that address: a server-side request forgery. So the prefill worker signs the
fields that direct those connections and bind the claim (HMAC-SHA256 keyed with the
deployment's worker token, ``moeserve.common.worker_auth``), and the decode worker verifies
before it connects anywhere. Only a worker holding the token can issue a handle that verifies,
and it signs its own address. The block ids are not signed: ClaimKV replaces them anyway.

Without worker-plane auth (``--insecure-worker-plane``, development) handles are unsigned and
nothing is checked: the router is then the only thing between a handle and the decode worker.
"""

from __future__ import annotations

from moeserve.api import worker_pb2
from moeserve.common.worker_auth import WorkerAuth

__all__ = ["sign_handle", "handle_verifies"]


def _fields(h: worker_pb2.KVHandle) -> list[str]:
    return [h.worker_address, h.agent_name, h.handle_id, h.decode_agent, h.request_id,
            h.compat_fingerprint, str(h.num_tokens)]  # fmt: skip


def sign_handle(auth: WorkerAuth | None, handle: worker_pb2.KVHandle) -> worker_pb2.KVHandle:
    if auth is not None and handle.handle_id:
        handle.signature = auth.sign(_fields(handle))
    return handle


def handle_verifies(auth: WorkerAuth | None, handle: worker_pb2.KVHandle) -> bool:
    """True when ``handle`` was issued by a worker of this deployment (always, without auth)."""
    return auth is None or auth.verify(_fields(handle), handle.signature)
