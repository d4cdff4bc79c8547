"""The sending side: one `Sender` per sending worker (prefill worker, cache service), owning its KV region."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Callable, Sequence

import numpy as np

import kvmesh.transports.errors as errors
from kvmesh.transports import PREFERENCE, backend_class, usable_backends
from kvmesh.transports.aio import within
from kvmesh.transports.base import Backend, Observer
from kvmesh.transports.blocks import as_block_ids
from kvmesh.transports.chaos import Chaos
from kvmesh.transports.local import LocalPeer
from kvmesh.transports.rechunk import Rechunker, StagingPool, unmappable
from kvmesh.transports.region import KVRegion, block_nbytes, check_region, host_id as this_host_id
from kvmesh.transports.service import Peer
from kvmesh.transports.transfer import Transfer
from kvmesh.v1 import common_pb2, kv_pb2

log = logging.getLogger(__name__)

DEFAULT_CHUNK_BYTES = (1 << 20) - 1024  # data per grpc message; header + data stay within 1 MiB


RETIRE_PEER_S = 120.0  # a channel replaced after a certificate renewal closes this long after its replacement


class Sender:
    """Opens transfers from this worker's pool into receivers' pools.

    Holds one control channel per receiver address and one backend link per (backend, receiver), both cached.
    All methods run on the sender's event loop. `chaos` (a spec string, see `chaos.py`) degrades every transfer;
    `observer` is called with every finished or failed transfer's stats (see `base.Observer`); `tls` is the
    sending service's certificate for its gRPC channels (see `service.open_channel`).
    """

    def __init__(self, region: KVRegion, layout: common_pb2.KVLayout, *, backends: Sequence[str] = PREFERENCE,
                 host_id: str | None = None, force: str | None = None, verify: bool = True,
                 chunk_bytes: int = DEFAULT_CHUNK_BYTES, chaos: str | None = None, local_control: bool = True,
                 observer: Observer | None = None, tls=None) -> None:
        check_region(region, layout)
        if not 4096 <= chunk_bytes <= DEFAULT_CHUNK_BYTES:
            raise ValueError(f"chunk_bytes must be in [4096, {DEFAULT_CHUNK_BYTES}], got {chunk_bytes}")
        self.region, self.layout = region, layout
        self.backends = [b for b in backends if backend_class(b).unavailable_reason() is None]
        self.host_id = host_id or this_host_id()
        self.force, self.verify, self.chunk_bytes = force, verify, chunk_bytes
        self.local_control = local_control  # same-host receivers: control messages over their Unix socket
        self.chaos = Chaos.parse(chaos) if chaos else None
        self._options = dict(backends=self.backends, host_id=self.host_id, force=force, verify=verify,
                             chunk_bytes=chunk_bytes, chaos=chaos, local_control=local_control, observer=observer)
        self._rechunkers: dict[int, Rechunker] = {}  # receiver block size -> its re-chunking path
        self.observer = observer
        self.tls = tls
        self._peers: dict[str, object] = {}
        self._links: dict[tuple, Backend] = {}
        self._locks: dict[tuple, asyncio.Lock] = {}
        self._transfers: set[Transfer] = set()
        self._states: dict[str, object] = {}  # backends' per-sender state (see `state`)
        #: Always Open before writing (no staged transfers); for tests and benchmarks of the rendezvous path.
        self.force_rendezvous = False
        self._closed = False

    def choose_backend(self, descriptor: common_pb2.TransportDescriptor) -> str:
        """The backend for this receiver: its list (best first) ∩ ours, same-host ones only on its host, or the
        forced one. Raises NoCommonBackend."""
        same_host = descriptor.host_id == self.host_id
        usable = usable_backends(descriptor.backends, self.backends, same_host)
        if self.force:
            if self.force not in usable:
                raise errors.NoCommonBackend(f"forced backend {self.force!r} not usable; receiver offers "
                                             f"{list(descriptor.backends)}, same host: {same_host}")
            return self.force
        if not usable:
            raise errors.NoCommonBackend(f"receiver offers {list(descriptor.backends)}, we have {self.backends}, "
                                         f"same host: {same_host}")
        return usable[0]

    async def open(self, descriptor: common_pb2.TransportDescriptor, transfer_id: str,
                   dst_block_ids: Sequence[int], timeout: float = 30.0, src_token_offset: int = 0) -> Transfer:
        """Start a transfer into the receiver's `dst_block_ids` (which it must have `expect`ed).

        Called by the sending worker when it knows where the KV goes (before or while computing it). Negotiates
        the backend, checks layouts and block ids, and tells the receiver (Open). `timeout` bounds the whole
        transfer, commit included. A receiver whose layout differs from ours only in its block size gets the
        tokens re-chunked (rechunk.py): its blocks take the tokens of the src blocks from `src_token_offset` of the
        first on (0 with equal layouts). Raises LayoutMismatch (naming what cannot be mapped), InvalidTransfer,
        NoCommonBackend, UnknownTransfer, PeerUnavailable or TransferTimeout.
        """
        if self._closed:
            raise errors.InvalidTransfer("sender is closed")
        if descriptor.layout != self.layout:
            reason = unmappable(self.layout, descriptor.layout)
            if reason:
                raise errors.LayoutMismatch(f"receiver layout {_short(descriptor.layout)} cannot take ours "
                                            f"{_short(self.layout)}: {reason}")
            return await self._rechunker(descriptor.layout).open(descriptor, transfer_id, dst_block_ids, timeout,
                                                                 src_token_offset)
        if src_token_offset:
            raise errors.InvalidTransfer("src_token_offset needs a receiver of another block size")
        try:
            dst = as_block_ids(dst_block_ids, descriptor.num_blocks, "dst_block_ids")
        except ValueError as exc:
            raise errors.InvalidTransfer(str(exc)) from None
        await self._prune()
        name = self.choose_backend(descriptor)
        deadline = time.monotonic() + timeout
        peer = self.control_peer(descriptor)
        link = None
        try:
            link = await within(lambda: self._link(name, descriptor, peer), timeout)
            transfer = link.new_transfer(transfer_id, dst, deadline, local=isinstance(peer, LocalPeer),
                                         rendezvous=self.force_rendezvous)
            if not transfer.carries_open:
                await peer.open(transfer_id, dst, self.layout, name, self.host_id,
                                max(deadline - time.monotonic(), 0))
        except (asyncio.TimeoutError, TimeoutError):
            raise errors.TransferTimeout(f"open {transfer_id}: deadline passed") from None
        except errors.PeerUnavailable:
            if link is not None:
                await self.forget(link)
            raise
        link.users += 1
        self._transfers.add(transfer)
        if transfer.carries_open:
            transfer.open_request = kv_pb2.OpenRequest(
                transfer_id=transfer_id, dst_block_ids=dst.tolist(), layout=self.layout, backend=name,
                sender_host_id=self.host_id, staged=transfer.stages_bytes)
            if isinstance(peer, LocalPeer):
                await self._post_open(peer, transfer, deadline)
        await transfer.start()
        return transfer

    async def _post_open(self, peer: LocalPeer, transfer: Transfer, deadline: float) -> None:
        """Same host: still send the Open on the control socket, without waiting for its answer (the data or Commit
        carries it again, and fails as it would), so the receiver learns at once if we die before the Commit."""
        try:
            answer = await peer.post_open(transfer.open_request, max(deadline - time.monotonic(), 0))
        except BaseException as exc:  # e.g. the receiver's socket is gone: give back what the transfer took
            await transfer.abort(f"open failed: {exc}")
            raise
        transfer.watch_open(answer)

    @property
    def num_open_transfers(self) -> int:
        """Transfers opened and not yet committed or aborted, re-chunked ones included (0 when nothing leaks)."""
        return len(self._transfers) + sum(r.inner.num_open_transfers for r in self._rechunkers.values())

    @property
    def num_links(self) -> int:
        """Cached backend links (one per receiver and backend)."""
        return len(self._links)

    async def close(self) -> None:
        """Abort open transfers, close links and control channels. Called once when the worker stops."""
        self._closed = True
        for transfer in list(self._transfers):
            await transfer.abort("sender closing")
        for link in list(self._links.values()):
            await link.close()
        self._links.clear()
        for peer in self._peers.values():
            await peer.close()
        self._peers.clear()
        rechunkers, self._rechunkers = self._rechunkers, {}
        for rechunker in rechunkers.values():
            await rechunker.inner.close()
        states, self._states = self._states, {}
        for state in states.values():
            close = getattr(state, "close", None)
            if close is not None:
                close()

    @property
    def num_staging_slots_busy(self) -> int:
        """Staging slots (small transfers staged in this sender's memory: the eager protocol) held by transfers or
        quarantined after a failed one, over every backend that stages (0 when nothing leaks)."""
        return (sum(getattr(state, "num_busy", 0) for state in self._states.values())
                + sum(r.num_busy_blocks + r.inner.num_staging_slots_busy for r in self._rechunkers.values()))

    # ---- used by backends and transfers ----

    @property
    def closed(self) -> bool:
        """`close` was called: links closing now release what they share with the sender."""
        return self._closed

    def state(self, key: str, make: Callable[[], object]) -> object:
        """A backend's per-sender state (a NIXL agent's registration, a staging area), made by `make()` on first
        use. `Sender.close` calls its `close()` (if any) after every link closed; a staging state's `num_busy`
        counts in `num_staging_slots_busy`. Called by backends on the sender's loop."""
        if key not in self._states:
            self._states[key] = make()
        return self._states[key]

    def rpc_peer(self, address: str) -> Peer:
        """The gRPC channel to a receiver's KVTransfer service (shared by control messages and data calls)."""
        if not address:
            raise errors.InvalidTransfer("descriptor has no address")
        peer = self._peers.get(address)
        generation = getattr(self.tls, "generation", 0)  # bumped when the process's certificate is renewed
        if peer is not None and peer.generation != generation:  # dial with the renewed certificate from now on;
            old = peer  # transfers already on the old channel finish there
            asyncio.get_running_loop().call_later(RETIRE_PEER_S, lambda: asyncio.ensure_future(old.close()))
            peer = None
        if peer is None:
            peer = self._peers[address] = Peer(address, self.tls)
            peer.generation = generation
        return peer

    def release(self, transfer: Transfer) -> None:
        """Called by a transfer once it committed or failed: it no longer counts as open."""
        if transfer in self._transfers:
            self._transfers.discard(transfer)
            transfer.link.users -= 1

    async def forget(self, link: Backend) -> None:
        """Drop a link whose receiver went away, so a restarted receiver gets a fresh one (called by a transfer
        that found its peer unavailable)."""
        key = _link_key(link.name, link.descriptor)
        if self._links.get(key) is link:
            del self._links[key]
            await link.close()

    def control_peer(self, descriptor: common_pb2.TransportDescriptor):
        """The control channel to this receiver (cached): its local socket when it is on our host, else gRPC."""
        if self.local_control and descriptor.control_socket and descriptor.host_id == self.host_id:
            key = "local:" + descriptor.control_socket
            if key not in self._peers:
                self._peers[key] = LocalPeer(descriptor.control_socket, descriptor.address)
            return self._peers[key]
        return self.rpc_peer(descriptor.address)

    # ---- private ----

    async def _prune(self) -> None:
        """Close idle links to receivers that are gone for good (a dead worker's pool stays in memory while any
        peer maps it), and free what they left behind, at this sender's next open rather than never."""
        for key, link in list(self._links.items()):
            if link.users == 0 and link.stale():
                del self._links[key]
                await link.close()
                freed = backend_class(link.name).reclaim_stale()
                log.info("closed the %s link to %s (its receiver died); reclaimed %s", link.name,
                         link.descriptor.address, ", ".join(freed) or "nothing")

    async def _link(self, name: str, descriptor, peer) -> Backend:
        key = _link_key(name, descriptor)
        async with self._locks.setdefault(key, asyncio.Lock()):  # concurrent first opens connect once
            if key not in self._links:
                link = backend_class(name)(self, descriptor, peer)
                await link.connect()
                self._links[key] = link
            return self._links[key]


    def _rechunker(self, layout: common_pb2.KVLayout) -> Rechunker:
        """The re-chunking path into receivers of `layout`'s block size: staging blocks of that size, as many
        bytes as our pool (made on first use), and a Sender over them with the receiver's layout."""
        if layout.block_size not in self._rechunkers:
            pool = self.region.array
            blocks = -(-pool.shape[2] * self.layout.block_size // layout.block_size) + 64  # + a partial block each
            staging = KVRegion(np.zeros((pool.shape[0], 2, blocks, block_nbytes(layout)), dtype=np.uint8))
            inner = Sender(staging, layout, **self._options, tls=self.tls)
            self._rechunkers[layout.block_size] = Rechunker(pool, self.layout.block_size, StagingPool(staging.array),
                                                            inner)
        return self._rechunkers[layout.block_size]


def _link_key(name: str, descriptor) -> tuple:
    return name, descriptor.address, bytes(descriptor.backend_params.get(name, b""))


def _short(layout: common_pb2.KVLayout) -> str:
    return (f"{layout.model_id or '?'}:{layout.dtype} L{layout.num_layers} B{layout.block_size} "
            f"H{layout.num_kv_heads}x{layout.head_dim}")
