"""Typed transport errors. Each carries the name of the gRPC status a service should map it to (`status`)."""

from __future__ import annotations


class TransportError(Exception):
    """Base of every kvmesh transport error."""

    status = "INTERNAL"


class InvalidTransfer(TransportError, ValueError):
    """A caller broke the contract: block ids out of range, wrong count, layer twice, missing layers."""

    status = "INVALID_ARGUMENT"


class LayoutMismatch(InvalidTransfer):
    """Sender and receiver KV layouts differ, so their blocks cannot be exchanged."""


class NoCommonBackend(TransportError):
    """The receiver accepts no backend that this sender can use (or the forced one is not offered)."""

    status = "FAILED_PRECONDITION"


class UnknownTransfer(TransportError, KeyError):
    """The receiver holds no record of this transfer (never expected, already finished, expired or cancelled)."""

    status = "NOT_FOUND"

    def __str__(self) -> str:  # KeyError quotes its message; we want plain text
        return Exception.__str__(self)


class DataLossError(TransportError):
    """Bytes arrived damaged or incomplete (checksum or byte-count mismatch); the blocks must not be used."""

    status = "DATA_LOSS"


class TransferTimeout(TransportError, TimeoutError):
    """A deadline or the receiver's lease lapsed before the transfer completed."""

    status = "DEADLINE_EXCEEDED"


class TransferAborted(TransportError):
    """The peer aborted the transfer (or vanished mid-stream), or it was cancelled locally."""

    status = "ABORTED"


class PeerUnavailable(TransportError, ConnectionError):
    """The peer cannot be reached or went away mid-transfer."""

    status = "UNAVAILABLE"


BY_STATUS: dict[str, type[TransportError]] = {
    cls.status: cls for cls in (InvalidTransfer, NoCommonBackend, UnknownTransfer, DataLossError,
                                TransferTimeout, TransferAborted, PeerUnavailable)
}
BY_STATUS["INTERNAL"] = TransportError


def from_status(status_name: str, message: str) -> TransportError:
    """The typed error for a gRPC status name (the inverse of `TransportError.status`)."""
    return BY_STATUS.get(status_name, PeerUnavailable if status_name == "CANCELLED" else TransportError)(message)
