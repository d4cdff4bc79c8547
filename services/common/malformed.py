"""Request bytes that do not parse as the method's message are the caller's fault: INVALID_ARGUMENT with a message
naming the method, never UNKNOWN with the parser's internal text.

`MalformedRequestInterceptor` (installed innermost by the server skeleton) gives each handler a deserializer that
returns a `Malformed` marker instead of raising, and a behaviour that raises `InvalidArgumentError` on meeting one
(for a streamed request, at the message that fails) — which `ErrorMappingInterceptor` turns into the status.
"""

from __future__ import annotations

import inspect

import grpc

from kvmesh.services.common.errors import InvalidArgumentError


class Malformed:
    """Stands for a request message that failed to parse."""


def _safe(deserializer):
    if deserializer is None:
        return None

    def parse(data: bytes):
        try:
            return deserializer(data)
        except Exception:  # noqa: BLE001 — any parser failure is the sender's bytes
            return Malformed()

    return parse


def _refusal(method: str) -> InvalidArgumentError:
    return InvalidArgumentError(f"malformed request: the bytes sent to {method} do not parse as its request "
                                "message; send a message built from the kvmesh.v1 protos")


def _checked_iterator(requests, method: str):
    async def checked():
        async for request in requests:
            if isinstance(request, Malformed):
                raise _refusal(method)
            yield request

    return checked()


def _unary_request(fn, method: str):
    if inspect.isasyncgenfunction(fn):
        async def stream(request, context):
            if isinstance(request, Malformed):
                raise _refusal(method)
            async for reply in fn(request, context):
                yield reply
        return stream

    async def unary(request, context):
        if isinstance(request, Malformed):
            raise _refusal(method)
        return await fn(request, context)
    return unary


def _streamed_request(fn, method: str):
    if inspect.isasyncgenfunction(fn):
        async def stream(requests, context):
            async for reply in fn(_checked_iterator(requests, method), context):
                yield reply
        return stream

    async def unary(requests, context):
        return await fn(_checked_iterator(requests, method), context)
    return unary


class MalformedRequestInterceptor(grpc.aio.ServerInterceptor):
    """INVALID_ARGUMENT, naming the method, for request bytes that do not parse."""

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_deserializer is None:
            return handler
        method = handler_call_details.method
        parse, reply = _safe(handler.request_deserializer), handler.response_serializer
        if handler.unary_unary and inspect.iscoroutinefunction(handler.unary_unary):
            return grpc.unary_unary_rpc_method_handler(_unary_request(handler.unary_unary, method), parse, reply)
        if handler.unary_stream and (inspect.isasyncgenfunction(handler.unary_stream)
                                     or inspect.iscoroutinefunction(handler.unary_stream)):
            return grpc.unary_stream_rpc_method_handler(_unary_request(handler.unary_stream, method), parse, reply)
        if handler.stream_unary and inspect.iscoroutinefunction(handler.stream_unary):
            return grpc.stream_unary_rpc_method_handler(_streamed_request(handler.stream_unary, method), parse,
                                                        reply)
        if handler.stream_stream and inspect.isasyncgenfunction(handler.stream_stream):
            return grpc.stream_stream_rpc_method_handler(_streamed_request(handler.stream_stream, method), parse,
                                                         reply)
        return handler  # a handler shape this does not know keeps its own deserializer
