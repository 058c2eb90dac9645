"""Conversions between moeserve's Python types and the wire (moeserve.v1 messages, gRPC status
codes), one place for both directions, so the router and the workers cannot drift apart.

- Sampling parameters: ``sampling_to_proto`` (the router, calling a worker) and
  ``sampling_from_proto`` (a worker's servicer; the router's own gRPC front end). An unset
  optional field takes the OpenAI default on the way in.
- Errors: ``abort_with`` ends an RPC with the status code a :class:`MoeServeError` names (and
  its ``param`` in the ``moeserve-param`` trailer); ``error_from_rpc`` turns a worker's status
  back into the named error on the router's side.

Imports grpc, the generated messages and moeserve.common only (no torch): both the router and
the worker import it.
"""

from __future__ import annotations

import grpc

from moeserve.api import common_pb2
from moeserve.common.errors import (
    DeadlineExceededError,
    IncompatibleKVError,
    InvalidRequestError,
    MoeServeError,
    ResourceExhaustedError,
    UnavailableError,
)
from moeserve.common.sampling import SamplingParams, TokenLogprobs
from moeserve.common.structured import StructuredOutput

__all__ = ["PARAM_TRAILER", "abort_with", "error_from_rpc", "grpc_status",
           "logprobs_from_proto", "logprobs_to_proto", "sampling_from_proto",
           "sampling_to_proto"]

# Trailing metadata key carrying InvalidRequestError.param, so the router can name the field
# in the OpenAI error it returns.
PARAM_TRAILER = "moeserve-param"


def sampling_to_proto(p: SamplingParams) -> common_pb2.SamplingParams:
    msg = common_pb2.SamplingParams(
        max_tokens=p.max_tokens, temperature=p.temperature, top_p=p.top_p, top_k=p.top_k,
        stop_token_ids=list(p.stop_token_ids), ignore_eos=p.ignore_eos,
        min_tokens=p.min_tokens, logit_bias=dict(p.logit_bias),
        prior_output_tokens=p.prior_output_tokens,
    )  # fmt: skip
    if p.seed is not None:
        msg.seed = p.seed
    # Only what differs from the defaults travels (most requests set none of these).
    for name, off in _PROCESSING_DEFAULTS.items():
        if getattr(p, name) != off:
            setattr(msg, name, getattr(p, name))
    if p.logprobs is not None:
        msg.logprobs = p.logprobs
    if p.structured is not None:
        s = p.structured
        msg.structured.CopyFrom(common_pb2.StructuredOutput(
            kind=s.kind, spec=s.spec, strict=s.strict, replay=s.replay))
    return msg


_PROCESSING_DEFAULTS = {"presence_penalty": 0.0, "frequency_penalty": 0.0,
                        "repetition_penalty": 1.0, "min_p": 0.0}


def sampling_from_proto(p: common_pb2.SamplingParams) -> SamplingParams:
    """SamplingParams from the wire; unset optionals take the OpenAI defaults."""
    return SamplingParams(
        max_tokens=p.max_tokens or 16,
        temperature=p.temperature if p.HasField("temperature") else 1.0,
        top_p=p.top_p if p.HasField("top_p") else 1.0,
        top_k=p.top_k if p.HasField("top_k") else -1,
        seed=p.seed if p.HasField("seed") else None,
        stop_token_ids=tuple(p.stop_token_ids),
        ignore_eos=p.ignore_eos,
        min_tokens=p.min_tokens,
        logit_bias=dict(p.logit_bias),
        prior_output_tokens=p.prior_output_tokens,
        logprobs=p.logprobs if p.HasField("logprobs") else None,
        structured=_structured_from_proto(p),
        **{name: getattr(p, name) for name, off in _PROCESSING_DEFAULTS.items()
           if p.HasField(name)},
    )


def _structured_from_proto(p: common_pb2.SamplingParams) -> StructuredOutput | None:
    if not p.HasField("structured"):
        return None
    s = p.structured
    return StructuredOutput(s.kind, s.spec, strict=s.strict, replay=s.replay)  # type: ignore[arg-type]


def logprobs_to_proto(lp: TokenLogprobs) -> common_pb2.TokenLogprobs:
    return common_pb2.TokenLogprobs(
        logprob=lp.logprob, top_token_ids=[t for t, _ in lp.top],
        top_logprobs=[v for _, v in lp.top],
    )


def logprobs_from_proto(token_id: int, msg: common_pb2.TokenLogprobs) -> TokenLogprobs:
    return TokenLogprobs(token_id, msg.logprob,
                         tuple(zip(msg.top_token_ids, msg.top_logprobs, strict=False)))


def grpc_status(exc: BaseException) -> grpc.StatusCode:
    """The status code ``exc`` names; INTERNAL for anything that is not a MoeServeError."""
    if isinstance(exc, MoeServeError):
        return getattr(grpc.StatusCode, exc.grpc_code, grpc.StatusCode.INTERNAL)
    return grpc.StatusCode.INTERNAL


async def abort_with(context: grpc.aio.ServicerContext, exc: BaseException) -> None:
    """End the RPC with the status code the error names (INVALID_ARGUMENT, ...)."""
    param = getattr(exc, "param", None)
    await context.abort(grpc_status(exc), str(exc),
                        trailing_metadata=((PARAM_TRAILER, param or ""),))


def error_from_rpc(e: grpc.RpcError, what: str) -> MoeServeError:
    """The named error a worker's status code stands for; ``what`` names the call."""
    code, details = e.code(), e.details() or ""
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        param = dict(e.trailing_metadata() or ()).get(PARAM_TRAILER) or None
        return InvalidRequestError(details, param=param)
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return ResourceExhaustedError(details)
    if code == grpc.StatusCode.FAILED_PRECONDITION:
        return IncompatibleKVError(details)
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return DeadlineExceededError(f"{what} exceeded its deadline")
    return UnavailableError(f"{what} failed: {code.name} {details}")
