"""The "grpc" backend, receiving side: the Push method of the receiver's KVTransfer service. Each chunk is parsed
without copying its data, checked against the transfer's reservation, and copied into the receiver's region, its
layer's running checksum extended as it lands (the Commit compares those with the sender's)."""

from __future__ import annotations

import asyncio
import logging

import grpc
import numpy as np
import xxhash
from google.protobuf.message import DecodeError

import kvmesh.transports.errors as errors
from kvmesh.transports.service import abort_with
from kvmesh.v1 import kv_pb2

log = logging.getLogger(__name__)

NAME = "grpc"  # this backend's registry name, as Open requests carry it


class ChunkView:
    """A received KVChunk whose `data` is a view into the message bytes (no copy); other fields from `header`."""

    __slots__ = ("header", "data")

    def __init__(self, header: kv_pb2.KVChunk, data) -> None:
        self.header, self.data = header, data

    def __getattr__(self, name: str):
        return getattr(self.header, name)


def _read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    """The varint at pos and the position after it; DecodeError when the bytes end first or it runs past 10."""
    value = shift = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise DecodeError("truncated or overlong varint in a KV chunk")
        byte = buf[pos]
        value |= (byte & 0x7F) << shift
        pos, shift = pos + 1, shift + 7
        if not byte & 0x80:
            return value, pos


def decode_chunk(buf: bytes):
    """Parse a serialised KVChunk without copying its data when data is the last field (as our senders write
    it); any other field order falls back to protobuf's parser."""
    pos, size = 0, len(buf)
    while pos < size:
        start = pos
        tag, pos = _read_varint(buf, pos)
        wire = tag & 7
        if wire == 0:
            _, pos = _read_varint(buf, pos)
        elif wire == 1:
            pos += 8
        elif wire == 5:
            pos += 4
        elif wire == 2:
            length, pos = _read_varint(buf, pos)
            if tag >> 3 == 15 and pos + length == size:
                return ChunkView(kv_pb2.KVChunk.FromString(buf[:start]), memoryview(buf)[pos:])
            pos += length
        else:
            break
    return kv_pb2.KVChunk.FromString(buf)


def chunk_views(receiver, transfer_id: str, chunk) -> tuple[object, list[np.ndarray]]:
    """The flat slices of the region a Push chunk's pieces go to, after checking them against the
    reservation."""
    record = receiver.record(transfer_id)
    if record.state != "writing" or record.backend != NAME:
        raise errors.InvalidTransfer(f"transfer {transfer_id} is not open for grpc chunks")
    if chunk.dtype != receiver.layout.dtype:
        raise errors.InvalidTransfer(f"chunk of transfer {transfer_id}: dtype {chunk.dtype!r}")
    views, total = [], 0
    for span in chunk.spans:
        start, end = span.dst_block_start, span.dst_block_start + span.num_blocks
        if not (0 <= span.layer < record.num_layers and span.kv in (0, 1) and span.num_blocks > 0
                and start >= 0 and end <= receiver.region.num_blocks and record.mask[start:end].all()):
            raise errors.InvalidTransfer(f"chunk outside transfer {transfer_id}'s blocks or layers")
        run = receiver.region.array[span.layer, span.kv, start:end].reshape(-1)
        if not (span.nbytes > 0 and 0 <= span.offset <= run.size - span.nbytes):
            raise errors.InvalidTransfer(f"chunk of transfer {transfer_id}: span outside its run")
        views.append(run[span.offset:span.offset + span.nbytes])
        total += span.nbytes
    if total != chunk.nbytes or total != len(chunk.data):
        raise errors.InvalidTransfer(f"chunk of transfer {transfer_id}: spans, nbytes and data disagree")
    return record, views


def land(record, chunk, views: list[np.ndarray], counts: list[int]) -> None:
    """Verify one chunk's checksum (if it has one), copy its pieces into the region, and extend its layer's running
    checksum (chunks of a layer arrive in the sender's order, so that equals the sender's layer checksum)."""
    data = chunk.data
    if chunk.has_checksum and xxhash.xxh3_64_intdigest(data) != chunk.checksum:
        raise errors.DataLossError(f"transfer {chunk.transfer_id}: chunk checksum mismatch")
    hash_layers = chunk.has_checksum or chunk.layer_checksums
    pos = 0
    for span, view in zip(chunk.spans, views):
        piece = data[pos:pos + view.size]
        np.copyto(view, np.frombuffer(piece, dtype=np.uint8))
        if hash_layers:
            record.layer_hashers.setdefault(span.layer, xxhash.xxh3_64()).update(piece)
        pos += view.size
    record.nbytes += len(data)
    record.check_landed()
    counts[0] += len(data)
    counts[1] += 1


async def receive_push(receiver, request_iterator) -> tuple[int, int]:
    """The receiver's side of Push: validate, verify and land each chunk. Returns (bytes, chunks).

    A damaged or out-of-bounds chunk fails its transfer; a stream that breaks before the sender closed it (the
    sender vanished) fails the transfers it carried with TransferAborted. (Landing large chunks in a worker thread
    while the loop receives the next one was measured slower here: a thread hop per 1 MiB chunk costs more than
    the copy it overlaps.)
    """
    counts = [0, 0]  # bytes, chunks
    records = {}
    try:
        async for chunk in request_iterator:
            if chunk.HasField("open"):  # the sender skipped the Open round trip (a call's first message)
                if chunk.open.transfer_id != chunk.transfer_id or chunk.open.backend != NAME:
                    raise errors.InvalidTransfer(f"chunk of transfer {chunk.transfer_id} carries another's Open")
                receiver.on_open(chunk.open)
            record, views = chunk_views(receiver, chunk.transfer_id, chunk)
            records[chunk.transfer_id] = record
            try:
                land(record, chunk, views, counts)
            except errors.DataLossError as exc:
                receiver.fail(record, exc)
                raise
            receiver.on_progress(record)  # a transfer that keeps moving keeps its lease, however slow
    except errors.InvalidTransfer as exc:
        for record in records.values():
            if record.state == "writing":
                receiver.fail(record, exc)
        raise
    except asyncio.CancelledError:
        for record in records.values():
            if record.state == "writing":
                receiver.fail(record, errors.TransferAborted(f"transfer {record.transfer_id}: sender vanished"))
        raise
    for record in records.values():  # the sender half-closed this call: a Commit may be waiting for it
        record.streams_done += 1
        record.check_landed()
    return counts[0], counts[1]


class MalformedChunk:
    """What a Push message that does not parse as a KVChunk becomes, so the handler can answer INVALID_ARGUMENT
    (a deserializer that raises makes gRPC answer INTERNAL)."""

    def __init__(self, reason: str) -> None:
        self.reason = reason


def _lenient(parse):
    def deserialize(buf: bytes):
        try:
            return parse(buf)
        except Exception as exc:  # noqa: BLE001 — any parse failure is the peer's malformed message
            return MalformedChunk(str(exc) or type(exc).__name__)
    return deserialize


async def _well_formed(chunks):
    async for chunk in chunks:
        if isinstance(chunk, MalformedChunk):
            log.debug("malformed KV chunk: %s", chunk.reason)  # the parser's words stay here, not in the status
            raise errors.InvalidTransfer("a Push message is not a well-formed KVChunk")
        yield chunk


def push_handlers(receiver) -> dict:
    """The KVTransfer method handlers this backend adds to `receiver`'s service: Push, decoding chunks without
    copying their data."""

    async def push(request_iterator, context):
        try:
            nbytes, num_chunks = await receive_push(receiver, _well_formed(request_iterator))
        except errors.TransportError as exc:
            await abort_with(context, exc)
        return kv_pb2.PushReply(nbytes=nbytes, num_chunks=num_chunks)

    return {"Push": grpc.stream_unary_rpc_method_handler(push, request_deserializer=_lenient(decode_chunk),
                                                         response_serializer=kv_pb2.PushReply.SerializeToString)}
