"""The "grpc" backend: one client-streaming Push per transfer, chunks of at most 1 MiB written straight into the
receiver's region. Works between any two hosts; the fallback when nothing faster is shared.

Copies: sender — one, when a chunk is assembled (header + raw bytes joined from a view of the pool, no protobuf
copy of the data); receiver — protobuf's bytes object, then one numpy copy into the region. Large layers are
encoded in a worker thread, one batch ahead of the writes.
"""

from __future__ import annotations

import asyncio

import numpy as np
import xxhash

from kvmesh.transports import errors
from kvmesh.transports.base import OFFLOAD_BYTES, Backend, Transfer
from kvmesh.transports.blocks import Run
from kvmesh.v1 import kv_pb2

DATA_TAG = bytes([15 << 3 | 2])  # KVChunk.data: field 15, length-delimited
BATCH_CHUNKS = 8  # chunks encoded per thread hop


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


class ChunkView:
    """A received KVChunk whose `data` is a view into the message bytes (no copy); other fields from `header`."""

    __slots__ = ("header", "data")

    def __init__(self, header: kv_pb2.KVChunk, data) -> None:
        self.header, self.data = header, data

    def __getattr__(self, name: str):
        return getattr(self.header, name)


def _read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
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


class GrpcTransfer(Transfer):
    """Streams a transfer's chunks on one Push call."""

    async def _begin(self) -> None:
        self.call = self.link.peer.push(timeout=self._remaining())

    async def _write_runs(self, runs: list[Run]) -> None:
        chunks = self._pack(runs)
        if sum(r.nbytes for r in runs) < OFFLOAD_BYTES:
            await self._write(self._encode(chunks))
            return
        batches = [chunks[i:i + BATCH_CHUNKS] for i in range(0, len(chunks), BATCH_CHUNKS)]
        ahead = asyncio.ensure_future(asyncio.to_thread(self._encode, batches[0]))
        try:
            for i in range(len(batches)):
                messages = await ahead
                if i + 1 < len(batches):
                    ahead = asyncio.ensure_future(asyncio.to_thread(self._encode, batches[i + 1]))
                await self._write(messages)
        finally:
            ahead.cancel()

    async def _end(self) -> None:
        try:  # the receiver checks the byte count at Commit, and reports missing bytes as data loss
            await self.call.done_writing()
            await self.call
        except Exception as exc:
            raise await self._call_error(exc) from None

    async def _cancel(self) -> None:
        call = getattr(self, "call", None)
        if call is not None:
            call.cancel()

    def _pack(self, runs: list[Run]) -> list[list[tuple[Run, int, memoryview]]]:
        """Group runs into chunks of <= chunk_bytes: many small runs share a chunk, long runs are split."""
        size = self.sender.chunk_bytes
        chunks, current, room = [], [], size
        for run in runs:
            flat, pos = memoryview(run.src.reshape(-1)), 0
            while pos < len(flat):
                take = min(room, len(flat) - pos)
                current.append((run, pos, flat[pos:pos + take]))
                pos, room = pos + take, room - take
                if room == 0:
                    chunks.append(current)
                    current, room = [], size
        if current:
            chunks.append(current)
        return chunks

    def _encode(self, chunks) -> list[bytes]:
        """Serialised KVChunks: header (with one span per piece), then the pieces' bytes (one copy)."""
        dtype, verify, layer = self.sender.layout.dtype, self.sender.verify, chunks[0][0][0].layer
        out = []
        for pieces in chunks:
            spans = [kv_pb2.KVSpan(kv=run.kv, dst_block_start=run.dst_start, num_blocks=run.num_blocks,
                                   offset=offset, nbytes=len(view)) for run, offset, view in pieces]
            nbytes = sum(len(view) for _, _, view in pieces)
            checksum = 0
            if verify:
                h = xxhash.xxh3_64()
                for _, _, view in pieces:
                    h.update(view)
                checksum = h.intdigest()
            header = kv_pb2.KVChunk(transfer_id=self.transfer_id, layer=layer, dtype=dtype, spans=spans,
                                    nbytes=nbytes, checksum=checksum, has_checksum=verify)
            out.append(b"".join((header.SerializeToString(), DATA_TAG, _varint(nbytes),
                                 *(view for _, _, view in pieces))))
        return out

    async def _write(self, messages: list[bytes]) -> None:
        try:
            for message in messages:
                await self.call.write(message)
        except Exception as exc:
            raise await self._call_error(exc) from None

    async def _call_error(self, exc: Exception) -> errors.TransportError:
        if isinstance(exc, errors.TransportError):
            return exc
        code = (await self.call.code()).name if self.call.done() else ""
        details = await self.call.details() if code else f"{type(exc).__name__}: {exc}"
        if code in ("", "OK", "INTERNAL", "UNKNOWN", "CANCELLED"):  # the stream broke: the receiver went away
            return errors.PeerUnavailable(f"push {self.transfer_id}: {code or 'broken'}: {details}")
        return errors.from_status(code, f"push {self.transfer_id}: {details}")


class GrpcBackend(Backend):
    """Chunks over the receiver's KVTransfer.Push; no shared memory, any host."""

    name = "grpc"
    transfer_class = GrpcTransfer


def _land(record, chunk, views: list[np.ndarray]) -> None:
    """Verify one chunk's checksum, copy its pieces into the region, and extend its layer's running checksum
    (chunks of a layer arrive in the sender's order, so that equals the sender's layer checksum)."""
    data = chunk.data
    if chunk.has_checksum and xxhash.xxh3_64_intdigest(data) != chunk.checksum:
        raise errors.DataLossError(f"transfer {chunk.transfer_id}: checksum mismatch in a chunk of layer "
                                   f"{chunk.layer}")
    if chunk.has_checksum:
        record.layer_hashers.setdefault(chunk.layer, xxhash.xxh3_64()).update(data)
    pos = 0
    for view in views:
        np.copyto(view, np.frombuffer(data, dtype=np.uint8, count=view.size, offset=pos))
        pos += view.size


async def receive_push(receiver, request_iterator) -> tuple[int, int]:
    """The receiver's side of Push: validate, verify and land each chunk. Returns (bytes, chunks).

    A damaged or out-of-bounds chunk fails its transfer; a stream that breaks before the sender closed it (the
    sender vanished) fails the transfers it carried with TransferAborted.
    """
    nbytes = num_chunks = 0
    records = {}
    try:
        async for chunk in request_iterator:
            record, views = receiver._chunk_views(chunk.transfer_id, chunk)
            records[chunk.transfer_id] = record
            try:
                _land(record, chunk, views)
            except errors.DataLossError as exc:
                receiver._fail(record, exc)
                raise
            record.nbytes += len(chunk.data)
            nbytes += len(chunk.data)
            num_chunks += 1
    except errors.InvalidTransfer as exc:
        for record in records.values():
            if record.state == "writing":
                receiver._fail(record, exc)
        raise
    except asyncio.CancelledError:
        for record in records.values():
            if record.state == "writing":
                receiver._fail(record, errors.TransferAborted(f"transfer {record.transfer_id}: sender vanished"))
        raise
    return nbytes, num_chunks
