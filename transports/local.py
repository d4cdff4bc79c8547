"""The local control channel: a receiver's control messages (Open, Commit, Abort, LayerWritten) over an abstract
Unix socket, for senders on its host.

Same messages, semantics and errors as the gRPC KVTransfer service (both call `service.control`), but a round trip
costs tens of microseconds instead of a grpc.aio call's ~0.5 ms — most of a small transfer's time. The data still
goes through the negotiated backend; only the control messages move here.

Frames, both ways: a 9-byte header `!IBI` (payload length, kind, call id), then a protobuf payload: one of
kv.proto's request messages, or in a reply (same call id) the reply message (kind OK) or "STATUS\\nmessage"
(kind ERROR). Nothing is ever unpickled. Only processes of the receiver's own user may connect (checked with
SO_PEERCRED), as only they can map its shm segment anyway. Abstract socket names vanish with the socket, so
nothing is left behind in the file system, whatever way the process ends.

The connection also tells the receiver when a same-host sender vanishes: transfers it opened and had not
finished fail at once (TransferAborted), instead of when their lease lapses.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import secrets
import socket
import struct

from google.protobuf.message import DecodeError

import kvmesh.transports.errors as errors
from kvmesh.transports.aio import within
from kvmesh.transports.service import ABORT_TIMEOUT_S, CONTROL_TYPES, control

log = logging.getLogger(__name__)

HEADER = struct.Struct("!IBI")
MAX_PAYLOAD = 4 << 20  # an Open for 100k blocks is ~0.5 MB; anything larger is not ours
OK, ERROR = 0x80, 0x81
KINDS = {1: "Open", 2: "Commit", 3: "Abort", 4: "LayerWritten"}
KIND_OF = {name: kind for kind, name in KINDS.items()}
_PEERCRED = struct.Struct("3i")  # pid, uid, gid


def new_name() -> str:
    """A fresh socket name carrying our pid (for a person reading `ss -xl`)."""
    return f"kvmesh-ctl-{os.getpid()}-{secrets.token_hex(6)}"


class LocalControlServer:
    """The receiver's side. The socket is bound and listening from construction (so the descriptor can name it
    at once: early connections wait in the backlog); serving starts on the first `start()` from the event loop."""

    def __init__(self, receiver) -> None:
        self.receiver = receiver
        self.name = new_name()
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.bind("\0" + self.name)
        self._sock.listen(128)
        self._sock.setblocking(False)
        self._server: asyncio.AbstractServer | None = None
        self._starting: asyncio.Future | None = None
        self._tasks: set[asyncio.Task] = set()  # answers being computed
        self._writers: set[asyncio.StreamWriter] = set()  # connected senders

    def start(self) -> None:
        """Begin serving on the running loop. Idempotent; called by the Receiver on its loop."""
        if self._starting is None:
            self._starting = asyncio.ensure_future(asyncio.start_unix_server(self._client, sock=self._sock))
            self._starting.add_done_callback(self._started)

    def _started(self, future: asyncio.Future) -> None:
        if not future.cancelled() and future.exception() is None:
            self._server = future.result()

    def close(self) -> None:
        """Stop serving and release the name. Idempotent; never raises."""
        if self._starting is not None and not self._starting.done():
            self._starting.cancel()
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        for writer in list(self._writers):
            writer.close()  # their readers see EOF and end
        self._sock.close()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        _, uid, _ = _PEERCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size))
        if uid != os.getuid():
            log.warning("local control: refused a connection from uid %d", uid)
            writer.close()
            return
        opened: set[str] = set()  # transfers this sender opened here: failed if it vanishes mid-transfer
        self._writers.add(writer)
        try:
            while True:
                length, kind, call_id = HEADER.unpack(await reader.readexactly(HEADER.size))
                if length > MAX_PAYLOAD or kind not in KINDS:
                    log.warning("local control: bad frame (kind %d, %d bytes); closing", kind, length)
                    return
                payload = await reader.readexactly(length)
                handler = asyncio.ensure_future(self._answer(writer, KINDS[kind], call_id, payload, opened))
                self._tasks.add(handler)
                handler.add_done_callback(self._tasks.discard)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass  # the sender closed its link or died
        except asyncio.CancelledError:
            pass  # we are closing (the streams' callback would log a cancelled task as an error)
        finally:
            self._writers.discard(writer)
            writer.close()
            for transfer_id in opened:
                self.receiver.on_sender_gone(transfer_id)

    async def _answer(self, writer, method: str, call_id: int, payload: bytes, opened: set[str]) -> None:
        request_type, _ = CONTROL_TYPES[method]
        try:
            request = request_type.FromString(payload)
            if method == "Open":
                opened.add(request.transfer_id)
            elif method in ("Commit", "Abort"):
                opened.discard(request.transfer_id)
            kind, body = OK, (await control(self.receiver, method, request, same_host=True)).SerializeToString()
        except DecodeError as exc:
            kind, body = ERROR, f"INVALID_ARGUMENT\nmalformed {method}: {exc}".encode()
        except errors.TransportError as exc:
            kind, body = ERROR, f"{exc.status}\n{exc}".encode()
        except Exception as exc:  # noqa: BLE001 - answer, never leave the sender waiting
            log.exception("local control: %s failed", method)
            kind, body = ERROR, f"INTERNAL\n{type(exc).__name__}: {exc}".encode()
        if not writer.is_closing():
            writer.write(HEADER.pack(len(body), kind, call_id) + body)


class LocalPeer:
    """The sender's side: the same calls as `service.Peer`, over one connection (many calls in flight)."""

    def __init__(self, name: str, address: str = "") -> None:
        self.name, self.address = name, address
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future] = {}
        self._writer: asyncio.StreamWriter | None = None
        self._reader_task: asyncio.Task | None = None
        self._lock = asyncio.Lock()

    async def open(self, transfer_id, dst_ids, layout, backend, host_id, timeout) -> float:
        """Send an Open and return the seconds left on the transfer's lease."""
        request = CONTROL_TYPES["Open"][0](transfer_id=transfer_id, dst_block_ids=dst_ids.tolist(), layout=layout,
                                           backend=backend, sender_host_id=host_id)
        return (await self.call("Open", request, timeout, f"open {transfer_id}")).lease_remaining_s

    async def post_open(self, request, timeout: float) -> asyncio.Task:
        """Send an Open now and return a task for its answer, instead of waiting for it (the sender carries the same
        Open in its data or Commit): the receiver ties the transfer to this connection at once, and a refusal
        reaches the sender while it is still computing."""
        what = f"open {request.transfer_id}"
        answer = await self._post("Open", request, what)
        return asyncio.ensure_future(self._answer(answer, "Open", timeout, what))

    async def commit(self, transfer_id, backend, nbytes, checksums, has_checksums, timeout, push_streams=0,
                     open=None, staged=None):
        """Send a Commit and return the receiver's verdict (raises its typed error)."""
        request = CONTROL_TYPES["Commit"][0](transfer_id=transfer_id, backend=backend, nbytes=nbytes,
                                             layer_checksums=checksums, has_checksums=has_checksums,
                                             push_streams=push_streams, open=open, staged=staged)
        return await self.call("Commit", request, timeout, f"commit {transfer_id}")

    async def abort(self, transfer_id: str, reason: str) -> None:
        """Best effort: never raises (the receiver's lease, or our vanishing, cleans up if this is lost)."""
        request = CONTROL_TYPES["Abort"][0](transfer_id=transfer_id, reason=reason)
        try:
            await self.call("Abort", request, ABORT_TIMEOUT_S, f"abort {transfer_id}")
        except errors.TransportError:
            pass

    async def layer_written(self, transfer_id: str, layer: int) -> None:
        """A hint; never raises."""
        request = CONTROL_TYPES["LayerWritten"][0](transfer_id=transfer_id, layer=layer)
        try:
            await self.call("LayerWritten", request, ABORT_TIMEOUT_S, f"layer_written {transfer_id}")
        except errors.TransportError:
            pass

    async def close(self) -> None:
        """Close the connection; pending calls fail with PeerUnavailable."""
        writer, self._writer = self._writer, None
        if self._reader_task is not None:
            self._reader_task.cancel()
        if writer is not None:
            writer.close()
        self._fail_pending(errors.PeerUnavailable(f"control channel {self.name} closed"))

    async def call(self, method: str, request, timeout: float, what: str):
        """One control call: send `request` and await its typed reply (TransportError on a refusal)."""
        return await self._answer(await self._post(method, request, what), method, timeout, what)

    # ---- private ----

    async def _post(self, method: str, request, what: str) -> tuple[int, asyncio.Future]:
        """Write one request; return its call id and the future its raw answer will resolve."""
        writer = await self._connect(what)
        call_id = next(self._ids)
        future = asyncio.get_running_loop().create_future()
        self._pending[call_id] = future
        body = request.SerializeToString()
        writer.write(HEADER.pack(len(body), KIND_OF[method], call_id) + body)
        return call_id, future

    async def _answer(self, posted: tuple[int, asyncio.Future], method: str, timeout: float, what: str):
        call_id, future = posted
        try:
            kind, payload = await within(lambda: future, timeout)
        except (asyncio.TimeoutError, TimeoutError):
            raise errors.TransferTimeout(f"{what}: deadline passed") from None
        finally:
            self._pending.pop(call_id, None)
        if kind == ERROR:
            status, _, message = payload.decode(errors="replace").partition("\n")
            raise errors.from_status(status, f"{what}: {status}: {message}")
        return CONTROL_TYPES[method][1].FromString(payload)

    async def _connect(self, what: str) -> asyncio.StreamWriter:
        async with self._lock:
            if self._writer is None or self._writer.is_closing():
                try:
                    reader, self._writer = await asyncio.open_unix_connection(sock=_connected(self.name))
                except OSError as exc:
                    raise errors.PeerUnavailable(f"{what}: local control {self.name}: {exc}") from None
                self._reader_task = asyncio.ensure_future(self._read(reader))
            return self._writer

    async def _read(self, reader: asyncio.StreamReader) -> None:
        try:
            while True:
                length, kind, call_id = HEADER.unpack(await reader.readexactly(HEADER.size))
                if length > MAX_PAYLOAD or kind not in (OK, ERROR):
                    break
                payload = await reader.readexactly(length)
                future = self._pending.get(call_id)
                if future is not None and not future.done():
                    future.set_result((kind, payload))
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        except asyncio.CancelledError:
            return
        if self._writer is not None:
            self._writer.close()
        self._fail_pending(errors.PeerUnavailable(f"local control {self.name}: receiver went away"))

    def _fail_pending(self, error: errors.TransportError) -> None:
        for future in self._pending.values():
            if not future.done():
                future.set_exception(error)
        self._pending.clear()


def _connected(name: str) -> socket.socket:
    """A socket connected to an abstract name. Connecting a Unix socket never waits (it succeeds or is refused at
    once), so it is done here rather than by the loop: uvloop cannot name abstract sockets itself."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect("\0" + name)
    except OSError:
        sock.close()
        raise
    sock.setblocking(False)
    return sock
