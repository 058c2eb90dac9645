"""Router-only errors of worker RPCs: how a decode attempt failed, the migration limit. The
conversions both sides share (sampling params, error <-> gRPC status) are in moeserve.api.wire."""

from __future__ import annotations

from typing import TYPE_CHECKING

from moeserve.common.errors import UnavailableError

if TYPE_CHECKING:
    from moeserve.router.workers import WorkerClient

__all__ = ["AttemptFailed", "KVRefused", "MigrationLimitError"]


class AttemptFailed(Exception):
    """One decode attempt failed in a way another decode worker can recover from."""

    def __init__(self, worker: WorkerClient, reason: str, eject: bool):
        super().__init__(reason)
        self.worker = worker
        self.reason = reason
        self.eject = eject


class KVRefused(Exception):
    """The decode worker refused the handoff's KV (compatibility fingerprint mismatch)."""


class MigrationLimitError(UnavailableError):
    """Decode workers failed under this request more often than its migration limit allows.

    Retryable: the client may send the request again (HTTP 503 with Retry-After).
    """

    error_type = "migration_limit_exceeded"
