"""Errors in the OpenAI API's JSON shape, derived from the typed errors every service raises.

The gateway raises the same typed errors as every service (`kvmesh.services.common.errors`); the gRPC API turns
them into statuses in the server skeleton's interceptor, and the HTTP API turns the same status into an HTTP one
through the one table below, so both APIs answer one failure with one status and one message.
"""

from __future__ import annotations

import logging

import grpc
from fastapi.responses import JSONResponse

from kvmesh.services.common.errors import describe, retry_after, status_for

log = logging.getLogger(__name__)

HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400, grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429, grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504, grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.DATA_LOSS: 502, grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.ALREADY_EXISTS: 409, grpc.StatusCode.OUT_OF_RANGE: 400,
}


def http_status(exc: BaseException) -> int:
    """The HTTP status an exception stands for: its gRPC status through `HTTP_STATUS`, else 500."""
    code = status_for(exc)
    if code is grpc.StatusCode.INTERNAL:
        log.error("internal error", exc_info=exc)
    return HTTP_STATUS.get(code, 500)


def error_response(status: int, message: str, kind: str = "invalid_request_error", param: str | None = None):
    """An error in the OpenAI API's JSON shape."""
    body = {"error": {"message": message, "type": kind, "param": param, "code": status}}
    return JSONResponse(body, status_code=status)


def typed_error_response(exc: BaseException) -> JSONResponse:
    """The OpenAI error response for a typed error raised before the reply started; a 429 says when to come back
    (Retry-After: the scheduler's hint, else 1 s), so a client backs off instead of hammering."""
    status = http_status(exc)
    response = error_response(status, describe(exc), "invalid_request_error" if status < 500 else "server_error")
    if status == 429:
        response.headers["Retry-After"] = str(retry_after(exc) or 1)
    return response


def stream_error_event(exc: BaseException) -> dict:
    """The SSE event that reports an error once a stream has started (its HTTP status is already sent)."""
    return {"error": {"message": describe(exc), "type": "server_error", "code": http_status(exc)}}
