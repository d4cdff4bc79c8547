"""Typed errors and their gRPC status codes, in one place.

A class maps to a status in one of three ways: it (or a base class) has a `grpc_status` class attribute; or, for
packages that import no gRPC (the engine, the transports), a `status` attribute naming a `grpc.StatusCode` member
("RESOURCE_EXHAUSTED") — so error classes defined elsewhere plug in without editing this file, and this file imports
none of them; or it is a standard exception listed in `_BY_CLASS` below. Anything else is INTERNAL. Servicers raise these errors; `ErrorMappingInterceptor` (installed by
the server skeleton) turns them into statuses, so no handler catches its own errors.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import math

import grpc

log = logging.getLogger(__name__)


class MeshError(Exception):
    """Base of the service layer's typed errors; subclasses set `grpc_status`."""

    grpc_status = grpc.StatusCode.INTERNAL

    @classmethod
    def with_status(cls, code: grpc.StatusCode, message: str) -> "MeshError":
        """An error that stands for `code` (e.g. a peer's status passed on with more context)."""
        error = cls(message)
        error.grpc_status = code
        return error


class InvalidArgumentError(MeshError, ValueError):
    """The request is malformed or asks for something impossible: INVALID_ARGUMENT."""

    grpc_status = grpc.StatusCode.INVALID_ARGUMENT


class NotFoundError(MeshError, LookupError):
    """The named thing (worker, request, block) does not exist: NOT_FOUND."""

    grpc_status = grpc.StatusCode.NOT_FOUND


class CapacityError(MeshError):
    """Over capacity or over an admission limit right now; retry later (after `retry_after_s`, when known):
    RESOURCE_EXHAUSTED."""

    grpc_status = grpc.StatusCode.RESOURCE_EXHAUSTED

    def __init__(self, message: str, retry_after_s: float | None = None):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class UnavailableError(MeshError):
    """No peer can serve this, or the peer is gone: UNAVAILABLE."""

    grpc_status = grpc.StatusCode.UNAVAILABLE


class DeadlineError(MeshError, TimeoutError):
    """The caller's deadline passed before the work was done: DEADLINE_EXCEEDED."""

    grpc_status = grpc.StatusCode.DEADLINE_EXCEEDED


class ChecksumError(MeshError):
    """Data arrived corrupted (its checksum does not match): DATA_LOSS."""

    grpc_status = grpc.StatusCode.DATA_LOSS


class FailedPreconditionError(MeshError):
    """The system is not in a state that allows this operation: FAILED_PRECONDITION."""

    grpc_status = grpc.StatusCode.FAILED_PRECONDITION


# Standard classes, which carry no status of their own, most specific first.
_BY_CLASS: tuple[tuple[type[BaseException], grpc.StatusCode], ...] = (
    (TimeoutError, grpc.StatusCode.DEADLINE_EXCEEDED),
    (asyncio.TimeoutError, grpc.StatusCode.DEADLINE_EXCEEDED),
    (ConnectionError, grpc.StatusCode.UNAVAILABLE),
)


def status_for(exc: BaseException) -> grpc.StatusCode:
    """The gRPC status code an exception stands for."""
    if isinstance(exc, grpc.aio.AioRpcError):
        return exc.code()  # a downstream call failed: pass its status on
    if isinstance(exc.__dict__.get("grpc_status"), grpc.StatusCode):
        return exc.__dict__["grpc_status"]
    name = getattr(exc, "status", None)  # the engine's and the transports' errors name their status
    if isinstance(name, str) and name in grpc.StatusCode.__members__:
        return grpc.StatusCode[name]
    for cls in type(exc).__mro__:
        code = cls.__dict__.get("grpc_status")
        if isinstance(code, grpc.StatusCode):
            return code
    for cls, code in _BY_CLASS:
        if isinstance(exc, cls):
            return code
    return grpc.StatusCode.INTERNAL


def describe(exc: BaseException) -> str:
    """The status message for an exception: its text, or its class name when it has none."""
    if isinstance(exc, grpc.aio.AioRpcError):
        return exc.details() or exc.code().name
    text = str(exc)
    return text if text else type(exc).__name__


#: Trailing metadata key every status a kvmesh handler ends an RPC with carries: a status without it came from
#: the connection (refused, reset, the peer died mid-call), not from the peer's own answer.
ANSWERED_KEY = "kvmesh-answered"


#: Trailing metadata key of a RESOURCE_EXHAUSTED status that says when to come back: whole seconds, as HTTP's
#: Retry-After header (which the gateway's HTTP API sets from it).
RETRY_AFTER_KEY = "retry-after"


def retry_after(exc: BaseException | None) -> int | None:
    """Whole seconds after which a refused request may come back: the error's own `retry_after_s`, or the
    `retry-after` trailing metadata of the peer's status it passes on (its cause); None when none says."""
    while exc is not None:
        if isinstance(exc, grpc.aio.AioRpcError):
            hint = dict(exc.trailing_metadata() or ()).get(RETRY_AFTER_KEY)
            return int(hint) if isinstance(hint, str) and hint.isdigit() else None
        seconds = getattr(exc, "retry_after_s", None)
        if seconds is not None:
            return max(1, math.ceil(seconds))
        exc = exc.__cause__
    return None


async def abort_with(context: grpc.aio.ServicerContext, exc: BaseException) -> None:
    """End the RPC with the status `exc` stands for (raises grpc.aio.AbortError, as context.abort does)."""
    code = status_for(exc)
    if code is grpc.StatusCode.INTERNAL:
        log.exception("internal error", exc_info=exc)
    metadata = [(ANSWERED_KEY, "1")]
    if code is grpc.StatusCode.RESOURCE_EXHAUSTED and (seconds := retry_after(exc)) is not None:
        metadata.append((RETRY_AFTER_KEY, str(seconds)))
    await context.abort(code, describe(exc), trailing_metadata=tuple(metadata))


def unreachable(e: grpc.aio.AioRpcError) -> bool:
    """Whether a failed call never reached a working peer: UNAVAILABLE that the peer's handler did not send itself
    (a decode worker answering "my prefill worker failed" is reachable; a refused or reset connection is not)."""
    if e.code() is not grpc.StatusCode.UNAVAILABLE:
        return False
    return not any(key == ANSWERED_KEY for key, _ in (e.trailing_metadata() or ()))


#: What a status the peer did not send itself stands for, in words a client can act on: the transport's own text
#: ("recvmsg:Connection reset by peer", "failed to connect to all addresses; ...") is internal and stays in logs.
_UNANSWERED = {
    grpc.StatusCode.UNAVAILABLE: "the connection to it failed or was cut; retry",
    grpc.StatusCode.DEADLINE_EXCEEDED: "no answer before the deadline",
    grpc.StatusCode.CANCELLED: "the call was cancelled (the peer stopped, or is shutting down)",
}


def peer_text(e: grpc.aio.AioRpcError) -> str:
    """A failed call's message fit to pass on: the peer's own message when its handler sent the status (the
    status carries `ANSWERED_KEY`), else a plain account of the code — never the transport's internal text."""
    if any(key == ANSWERED_KEY for key, _ in (e.trailing_metadata() or ())):
        return e.details() or e.code().name
    log.info("peer status %s without an answer: %s", e.code().name, e.details())
    return _UNANSWERED.get(e.code(), f"the call failed ({e.code().name})")


def _wrap_unary(fn):
    async def handler(request_or_iterator, context):
        try:
            return await fn(request_or_iterator, context)
        except (grpc.aio.AbortError, asyncio.CancelledError):
            raise
        except Exception as exc:  # noqa: BLE001 — the one place errors become statuses
            await abort_with(context, exc)

    return handler


def _wrap_stream(fn):
    async def handler(request_or_iterator, context):
        try:
            async for message in fn(request_or_iterator, context):
                yield message
        except (grpc.aio.AbortError, asyncio.CancelledError, GeneratorExit):
            raise
        except Exception as exc:  # noqa: BLE001
            await abort_with(context, exc)

    return handler


def _wrap(fn):
    if inspect.isasyncgenfunction(fn):
        return _wrap_stream(fn)
    if inspect.iscoroutinefunction(fn):  # unary replies, and streams written with context.write()
        return _wrap_unary(fn)
    return fn  # sync handlers pass through unchanged


class ErrorMappingInterceptor(grpc.aio.ServerInterceptor):
    """Turns exceptions escaping any handler into the gRPC status `status_for` gives."""

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                _wrap(handler.unary_unary), handler.request_deserializer, handler.response_serializer)
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                _wrap(handler.unary_stream), handler.request_deserializer, handler.response_serializer)
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(
                _wrap(handler.stream_unary), handler.request_deserializer, handler.response_serializer)
        return grpc.stream_stream_rpc_method_handler(
            _wrap(handler.stream_stream), handler.request_deserializer, handler.response_serializer)
