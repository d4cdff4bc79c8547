"""Typed errors map to gRPC statuses in one place, including classes defined elsewhere."""

import asyncio

import grpc
import pytest

from kvmesh.services.common import errors
from kvmesh.services.engine import errors as engine_errors


class TransportGone(Exception):
    """Stands for an error class another package defines with a grpc_status attribute."""

    grpc_status = grpc.StatusCode.UNAVAILABLE


class TransportGoneSoon(TransportGone):
    """Inherits its status."""


@pytest.mark.parametrize("exc, code", [
    (errors.InvalidArgumentError("x"), grpc.StatusCode.INVALID_ARGUMENT),
    (errors.NotFoundError("x"), grpc.StatusCode.NOT_FOUND),
    (errors.CapacityError("x"), grpc.StatusCode.RESOURCE_EXHAUSTED),
    (errors.UnavailableError("x"), grpc.StatusCode.UNAVAILABLE),
    (errors.DeadlineError("x"), grpc.StatusCode.DEADLINE_EXCEEDED),
    (errors.ChecksumError("x"), grpc.StatusCode.DATA_LOSS),
    (engine_errors.InvalidRequestError("x"), grpc.StatusCode.INVALID_ARGUMENT),
    (engine_errors.UnsupportedModelError("x"), grpc.StatusCode.INVALID_ARGUMENT),
    (engine_errors.OutOfBlocksError("x"), grpc.StatusCode.RESOURCE_EXHAUSTED),
    (engine_errors.EngineError("x"), grpc.StatusCode.INTERNAL),
    (TimeoutError(), grpc.StatusCode.DEADLINE_EXCEEDED),
    (asyncio.TimeoutError(), grpc.StatusCode.DEADLINE_EXCEEDED),
    (ConnectionResetError(), grpc.StatusCode.UNAVAILABLE),
    (TransportGone(), grpc.StatusCode.UNAVAILABLE),
    (TransportGoneSoon(), grpc.StatusCode.UNAVAILABLE),
    (RuntimeError("bug"), grpc.StatusCode.INTERNAL),
])
def test_status_for(exc, code):
    assert errors.status_for(exc) == code


def test_describe_uses_the_message_or_the_class_name():
    assert errors.describe(errors.NotFoundError("worker w1")) == "worker w1"
    assert errors.describe(TransportGone()) == "TransportGone"


def test_peer_text_passes_on_answers_and_hides_transport_text():
    from kvmesh.services.common.errors import ANSWERED_KEY, peer_text

    reset = grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(),
                                 "recvmsg:Connection reset by peer")
    assert "recvmsg" not in peer_text(reset) and "connection" in peer_text(reset)
    answered = grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(),
                                    grpc.aio.Metadata((ANSWERED_KEY, "1")), "no decode worker is registered")
    assert peer_text(answered) == "no decode worker is registered"
    odd = grpc.aio.AioRpcError(grpc.StatusCode.UNKNOWN, grpc.aio.Metadata(), grpc.aio.Metadata(),
                               "Exception calling application: Traceback ...")
    assert "Traceback" not in peer_text(odd) and "UNKNOWN" in peer_text(odd)
