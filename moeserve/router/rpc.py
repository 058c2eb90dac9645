"""Router-only errors of worker RPCs. The conversions both sides share (sampling params,
error <-> gRPC status) are in moeserve.api.wire."""

from __future__ import annotations

from moeserve.common.errors import UnavailableError

__all__ = ["MigrationLimitError"]


class MigrationLimitError(UnavailableError):
    """Decode workers failed under this request more often than its migration limit allows.

    Retryable: the client may send the request again (HTTP 503 with Retry-After).
    """

    error_type = "migration_limit_exceeded"
