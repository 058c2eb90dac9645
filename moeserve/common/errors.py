"""Named errors that cross component boundaries; each maps to one HTTP and one gRPC status."""

from __future__ import annotations

__all__ = [
    "MoeServeError",
    "InvalidRequestError",
    "ConfigError",
    "CheckpointError",
    "ResourceExhaustedError",
    "UnavailableError",
    "IncompatibleKVError",
    "PayloadTooLargeError",
    "DeadlineExceededError",
]


class MoeServeError(Exception):
    """Base class. ``http_status`` and ``grpc_code`` (a grpc.StatusCode name) say how to map it."""

    http_status = 500
    grpc_code = "INTERNAL"
    error_type = "internal_error"


class InvalidRequestError(MoeServeError, ValueError):
    """A request the caller must fix; ``param`` names the offending field when one does."""

    http_status = 400
    grpc_code = "INVALID_ARGUMENT"
    error_type = "invalid_request_error"

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class ConfigError(MoeServeError, ValueError):
    """A model config or deployment spec that cannot be served; names the field."""

    error_type = "config_error"


class CheckpointError(MoeServeError):
    """A checkpoint directory that cannot be loaded; names the file or tensor."""

    error_type = "checkpoint_error"


class ResourceExhaustedError(MoeServeError):
    http_status = 429
    grpc_code = "RESOURCE_EXHAUSTED"
    error_type = "rate_limit_exceeded"


class UnavailableError(MoeServeError):
    http_status = 503
    grpc_code = "UNAVAILABLE"
    error_type = "service_unavailable"


class IncompatibleKVError(MoeServeError):
    """A decode worker refused KV from a prefill worker whose compatibility fingerprint differs;
    the message names the differing fields. The router stops pairing the two."""

    http_status = 503
    grpc_code = "FAILED_PRECONDITION"
    error_type = "incompatible_kv"


class PayloadTooLargeError(MoeServeError):
    """A request body over the configured size limit."""

    http_status = 413
    grpc_code = "RESOURCE_EXHAUSTED"
    error_type = "payload_too_large"


class DeadlineExceededError(MoeServeError):
    """A call or phase ran past its deadline (a worker's DEADLINE_EXCEEDED, a router phase)."""

    http_status = 504
    grpc_code = "DEADLINE_EXCEEDED"
    error_type = "timeout"
