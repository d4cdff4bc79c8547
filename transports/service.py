"""The KVTransfer gRPC service: the receiver's control servicer (thin: proto -> Receiver -> proto), mounted with
whatever its backends serve beside it (grpc: Push), and the sender's control-channel client (`Peer`), which turns
gRPC statuses back into typed transport errors. Backend-neutral: it names no backend."""

from __future__ import annotations

import asyncio

import grpc

import kvmesh.transports.errors as errors
from kvmesh.v1 import kv_pb2, kv_pb2_grpc

# Chunks are <= 1 MiB; leave room above grpc's 4 MiB default in neither direction, but never below a chunk.
MAX_MESSAGE_BYTES = 4 << 20
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.keepalive_permit_without_calls", 1),
]
ABORT_TIMEOUT_S = 1.0
# Options for a server that receives KV over Push: read from the socket in large pieces (grpc's default starts at
# 8 KiB and adapts slowly), which cuts the receiver's per-byte cost of big transfers.
SERVER_OPTIONS = [
    ("grpc.experimental.tcp_read_chunk_size", 4 << 20),
    ("grpc.experimental.tcp_min_read_chunk_size", 1 << 20),
    ("grpc.experimental.tcp_max_read_chunk_size", 16 << 20),
]


async def abort_with(context, exc: errors.TransportError):
    """End an RPC with the gRPC status of a transport error."""
    await context.abort(getattr(grpc.StatusCode, exc.status, grpc.StatusCode.INTERNAL), str(exc))


async def control(receiver, method: str, request, same_host: bool = False):
    """The receiver's reply to one control message (Open, Commit, Abort, LayerWritten), whichever channel carried
    it (this gRPC service or the local socket, `local.py`: `same_host`). Raises TransportError."""
    if method == "Commit" and request.HasField("staged") and not same_host:
        # The receiver would read a segment of this host named by the peer: only a same-user process on this host,
        # checked by the local socket, may ask that.
        raise errors.InvalidTransfer(f"transfer {request.transfer_id}: staged bytes only over the local socket")
    if method == "Open":
        return kv_pb2.OpenReply(lease_remaining_s=receiver.on_open(request))
    if method == "Commit":
        stats = await receiver.on_commit(request)
        return kv_pb2.CommitReply(checksum_seconds=stats.checksum_seconds, seconds=stats.seconds)
    if method == "Abort":
        return kv_pb2.AbortReply(found=receiver.on_abort(request.transfer_id, request.reason))
    if method == "LayerWritten":
        return kv_pb2.LayerWrittenReply(accepted=receiver.on_layer_written(request.transfer_id, request.layer))
    raise errors.InvalidTransfer(f"unknown control message {method!r}")


# Each control message's request and reply types, by method name.
CONTROL_TYPES = {
    "Open": (kv_pb2.OpenRequest, kv_pb2.OpenReply),
    "Commit": (kv_pb2.CommitRequest, kv_pb2.CommitReply),
    "Abort": (kv_pb2.AbortRequest, kv_pb2.AbortReply),
    "LayerWritten": (kv_pb2.LayerWrittenRequest, kv_pb2.LayerWrittenReply),
}


class KVTransferServicer(kv_pb2_grpc.KVTransferServicer):
    """Serves one Receiver's control messages; `handlers` are the gRPC method handlers its backends serve beside
    them (by method name, e.g. Push). Mount with `receiver.mount(server)` or `add_to_server`."""

    def __init__(self, receiver, handlers: dict | None = None) -> None:
        self.receiver = receiver
        self.handlers = dict(handlers or {})

    async def _control(self, method: str, request, context):
        try:
            return await control(self.receiver, method, request)
        except errors.TransportError as exc:
            await abort_with(context, exc)

    async def Open(self, request, context):
        """An Open control message."""
        return await self._control("Open", request, context)

    async def Commit(self, request, context):
        """A Commit control message."""
        return await self._control("Commit", request, context)

    async def Abort(self, request, context):
        """An Abort control message."""
        return await self._control("Abort", request, context)

    async def LayerWritten(self, request, context):
        """A LayerWritten hint."""
        return await self._control("LayerWritten", request, context)


def add_to_server(servicer: KVTransferServicer, server) -> None:
    """Register `servicer` (control messages plus its backends' handlers) on a grpc.aio server."""

    def unary(method, request):
        return grpc.unary_unary_rpc_method_handler(method, request_deserializer=request.FromString,
                                                   response_serializer=lambda reply: reply.SerializeToString())

    handlers = {
        "Open": unary(servicer.Open, kv_pb2.OpenRequest),
        "Commit": unary(servicer.Commit, kv_pb2.CommitRequest),
        "Abort": unary(servicer.Abort, kv_pb2.AbortRequest),
        "LayerWritten": unary(servicer.LayerWritten, kv_pb2.LayerWrittenRequest),
        **servicer.handlers,
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("kvmesh.v1.KVTransfer", handlers),))
    server.add_registered_method_handlers("kvmesh.v1.KVTransfer", handlers)


def open_channel(address: str, tls=None) -> grpc.aio.Channel:
    """A control channel to a receiver: over mTLS when `tls` (an object with `channel_credentials()` and
    `channel_options()`, the service's certificate) is given, else plaintext."""
    if tls is None:
        return grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)
    return grpc.aio.secure_channel(address, tls.channel_credentials(),
                                   options=[*CHANNEL_OPTIONS, *tls.channel_options()])


class Peer:
    """A sender's control channel to one receiver address (cached by the Sender)."""

    def __init__(self, address: str, tls=None) -> None:
        self.address = address
        self.generation = 0  # the sender's certificate generation this channel dials with
        self.channel = open_channel(address, tls)
        self.stub = kv_pb2_grpc.KVTransferStub(self.channel)
        # Push with a pre-serialised request (bytes): the sender builds chunks itself to avoid copies.
        self.push = self.channel.stream_unary("/kvmesh.v1.KVTransfer/Push", request_serializer=None,
                                              response_deserializer=kv_pb2.PushReply.FromString)

    async def open(self, transfer_id, dst_ids, layout, backend, host_id, timeout) -> float:
        """Send an Open and return the seconds left on the transfer's lease."""
        request = kv_pb2.OpenRequest(transfer_id=transfer_id, dst_block_ids=dst_ids.tolist(), layout=layout,
                                     backend=backend, sender_host_id=host_id)
        reply = await call(self.stub.Open, request, timeout, f"open {transfer_id}")
        return reply.lease_remaining_s

    async def commit(self, transfer_id, backend, nbytes, checksums, has_checksums, timeout,
                     push_streams: int = 0, open=None, staged=None) -> kv_pb2.CommitReply:
        """Send a Commit and return the receiver's verdict (raises its typed error)."""
        request = kv_pb2.CommitRequest(transfer_id=transfer_id, backend=backend, nbytes=nbytes,
                                       layer_checksums=checksums, has_checksums=has_checksums,
                                       push_streams=push_streams, open=open, staged=staged)
        return await call(self.stub.Commit, request, timeout, f"commit {transfer_id}")

    async def abort(self, transfer_id: str, reason: str) -> None:
        """Best effort: never raises (the receiver's lease cleans up if this is lost)."""
        try:
            await self.stub.Abort(kv_pb2.AbortRequest(transfer_id=transfer_id, reason=reason),
                                  timeout=ABORT_TIMEOUT_S)
        except (grpc.aio.AioRpcError, asyncio.TimeoutError, grpc.aio.UsageError):
            pass

    async def layer_written(self, transfer_id: str, layer: int) -> None:
        """A hint (see kv.proto); never raises: the receiver verifies the layer at Commit if this is lost."""
        try:
            await self.stub.LayerWritten(kv_pb2.LayerWrittenRequest(transfer_id=transfer_id, layer=layer),
                                         timeout=ABORT_TIMEOUT_S)
        except (grpc.aio.AioRpcError, asyncio.TimeoutError, grpc.aio.UsageError):
            pass

    async def close(self) -> None:
        """Close the channel."""
        await self.channel.close()


async def call(method, request, timeout: float, what: str):
    """A unary call under `timeout`, with gRPC errors turned into typed transport errors."""
    try:
        return await method(request, timeout=timeout)
    except grpc.aio.AioRpcError as exc:
        raise rpc_error(exc, what) from None


def rpc_error(exc: grpc.aio.AioRpcError, what: str) -> errors.TransportError:
    """The typed error for a failed RPC."""
    return errors.from_status(exc.code().name, f"{what}: {exc.code().name}: {exc.details()}")
