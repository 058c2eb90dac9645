"""Router-side conversions for worker RPCs: sampling params out, gRPC errors back in."""

from __future__ import annotations

import grpc

from moeserve.api import common_pb2
from moeserve.common.errors import (
    IncompatibleKVError,
    InvalidRequestError,
    MoeServeError,
    ResourceExhaustedError,
    UnavailableError,
)
from moeserve.common.sampling import SamplingParams

__all__ = ["DeadlineExceededError", "MigrationLimitError", "rpc_error", "to_proto_sampling"]


class DeadlineExceededError(MoeServeError):
    http_status = 504
    grpc_code = "DEADLINE_EXCEEDED"
    error_type = "timeout"


class MigrationLimitError(UnavailableError):
    """Decode workers failed under this request more often than its migration limit allows.

    Retryable: the client may send the request again (HTTP 503 with Retry-After).
    """

    error_type = "migration_limit_exceeded"


def to_proto_sampling(p: SamplingParams) -> common_pb2.SamplingParams:
    msg = common_pb2.SamplingParams(
        max_tokens=p.max_tokens, temperature=p.temperature, top_p=p.top_p, top_k=p.top_k,
        stop_token_ids=list(p.stop_token_ids), ignore_eos=p.ignore_eos,
    )  # fmt: skip
    if p.seed is not None:
        msg.seed = p.seed
    return msg


def rpc_error(e: grpc.RpcError, what: str) -> MoeServeError:
    """The named error a worker's status code stands for."""
    code, details = e.code(), e.details() or ""
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        param = dict(e.trailing_metadata() or ()).get("moeserve-param") or None
        return InvalidRequestError(details, param=param)
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return ResourceExhaustedError(details)
    if code == grpc.StatusCode.FAILED_PRECONDITION:
        return IncompatibleKVError(details)
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return DeadlineExceededError(f"{what} exceeded its deadline")
    return UnavailableError(f"{what} failed: {code.name} {details}")
