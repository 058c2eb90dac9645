"""INVALID_ARGUMENT for request bytes that are not the method's message.

grpcio answers a request its deserializer cannot parse with UNKNOWN / INTERNAL, which reads as
a server crash. This interceptor wraps each handler's request deserializer: a message that does
not parse becomes a marker the wrapped behaviour turns into INVALID_ARGUMENT naming the method.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc

__all__ = ["MalformedRequestInterceptor"]


class _Malformed:
    def __init__(self, error: str):
        self.error = error


def _wrap_deserializer(deserialize: Callable[[bytes], Any] | None) -> Callable[[bytes], Any]:
    def parse(raw: bytes) -> Any:
        if deserialize is None:
            return raw
        try:
            return deserialize(raw)
        except Exception as e:  # protobuf raises DecodeError, others their own types
            return _Malformed(f"{type(e).__name__}: {e}")

    return parse


def _refuse(method: str, bad: _Malformed) -> str:
    return f"request to {method} is not a valid message ({bad.error})"


class MalformedRequestInterceptor(grpc.aio.ServerInterceptor):
    async def intercept_service(self, continuation: Callable, details: grpc.HandlerCallDetails
                                ) -> Any:  # fmt: skip
        handler = await continuation(details)
        if handler is None or handler.request_streaming:
            return handler  # streaming requests: none in moeserve's API
        method = details.method
        parse = _wrap_deserializer(handler.request_deserializer)
        if handler.response_streaming:
            inner_stream = handler.unary_stream

            async def unary_stream(request: Any, context: grpc.aio.ServicerContext) -> Any:
                if isinstance(request, _Malformed):
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, _refuse(method, request))
                result = inner_stream(request, context)
                if hasattr(result, "__aiter__"):
                    async for msg in result:
                        yield msg
                else:  # a handler that writes with context.write and returns
                    await result

            return grpc.unary_stream_rpc_method_handler(
                unary_stream, request_deserializer=parse,
                response_serializer=handler.response_serializer)  # fmt: skip
        inner = handler.unary_unary

        async def unary_unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            if isinstance(request, _Malformed):
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, _refuse(method, request))
            return await inner(request, context)

        return grpc.unary_unary_rpc_method_handler(
            unary_unary, request_deserializer=parse,
            response_serializer=handler.response_serializer)  # fmt: skip
