"""The transport contract: what a backend fills in, and what every transfer reports. Nothing else lives here.

Public wraps private, as in tinygrad's devices: `Sender`, `Transfer` (sender side) and `Receiver` (receiving side)
validate, enforce deadlines and leases, checksum, time and clean up — once, for every backend. A backend is a
package `transports/<name>/` with one `Backend` subclass and one `Transfer` subclass (`transfer.py`), registered
by one line in `transports/__init__.py`. It fills in these hooks and nothing more:

    Backend (a sender's link to one receiver; classmethods act for the whole process or a receiver)
        unavailable_reason()   can it run here          make_region(shape)    where a receiver's pool must live
        attach(receiver)       receiver side, at start  connect() / close()   sender side, once per receiver
        new_transfer(...)      which Transfer a sender opens through this link
        reclaim_stale()        free what dead processes left behind (a worker calls it at start)
    Transfer (sender side, one per transfer; private hooks, called only by the generic Transfer: transfer.py)
        _begin, _write, _write_inline, _flush, _settle, _cancel, _commit_fields
    Attachment (receiver side, what `attach` returns): params, close, progress, handlers, land_staged

Backends use only the public API of the generic layer (`Sender.rpc_peer`, `Sender.state`, `Transfer.remaining`,
`Receiver.on_*`, `Receiver.record`, `Receiver.fail`), never its underscore members; the generic layer never
names a backend: it asks the class flags below, and the hooks. This module imports nothing of the package but
the leaf `region`, and nothing of `kvmesh.services`: a transfer returns a `TransferStats`, and whoever made the
Sender or Receiver (a service) turns it into metrics and spans through the `observer` it passed in.
"""

from __future__ import annotations

from abc import ABC
from dataclasses import dataclass, field
from typing import Callable, ClassVar

import numpy as np

from kvmesh.transports.region import KVRegion  # a leaf; the generic classes are not imported (see below)

# `sender` (a sender.Sender), `receiver` (a receiver.Receiver) and the transfers (transfer.Transfer) go
# unannotated here: importing those modules would make the contract depend on what implements it.

# Large enough that a layer's copy is worth a thread hop (~50 us); smaller copies run inline on the loop.
OFFLOAD_BYTES = 1 << 20
# The same for hashing alone, which runs at ~30 GB/s: 4 MiB blocks the loop for ~0.15 ms.
HASH_OFFLOAD_BYTES = 4 << 20
# One-sided backends tell the receiver a layer of at least this size is written (LayerWritten), so it verifies
# that layer while later ones are written; smaller layers are not worth the extra message.
EARLY_VERIFY_BYTES = 4 << 20
# A receiver's lease lapses only when nothing of a transfer arrived for its length. Bytes it cannot see yet
# (coalesced into a later chunk, staged, written one-sided) do not renew it, so a sender whose last word to the
# receiver is this old tells it the transfer moves: a LayerWritten for PROGRESS_LAYER, which names no layer.
PROGRESS_HINT_S = 0.2
PROGRESS_LAYER = -1


@dataclass(frozen=True)
class TransferStats:
    """What one transfer moved and how fast, and its timeline: services put these on spans and metrics.

    A failed transfer's record has `error` set (its byte counts are what was sent before it failed)."""

    backend: str
    bytes: int
    blocks: int
    layers: int
    seconds: float
    #: Time spent on checksums apart from the copies (0 where a backend fuses them into its copy, as shm does).
    checksum_seconds: float = 0.0
    transfer_id: str = ""
    direction: str = "send"  # "send" or "recv"
    #: Wall-clock bounds of the transfer in epoch nanoseconds (sender: open to commit; receiver: Open to verified).
    start_ns: int = 0
    end_ns: int = 0
    #: (layer, bytes, epoch ns) as each layer was handed to the backend (sender side only).
    layer_times: tuple[tuple[int, int, int], ...] = field(default=(), compare=False)
    error: str = ""
    #: The receiver's transport address (sender side): whose link these figures measure.
    peer: str = ""
    #: Seconds the sender spent inside the transport (layer writes and the commit), without the gaps in which it
    #: waited for its next layer to be computed (0: not measured, as on the receiver side).
    busy_seconds: float = 0.0

    @property
    def gbps(self) -> float:
        """Gigabytes (1e9 bytes) per second."""
        return self.bytes / self.seconds / 1e9 if self.seconds > 0 else 0.0

    def to_dict(self) -> dict:
        """The figures (not the timeline), as the `kv.*` span attributes and the benchmarks show them."""
        return {"backend": self.backend, "bytes": self.bytes, "blocks": self.blocks, "layers": self.layers,
                "seconds": self.seconds, "checksum_seconds": self.checksum_seconds, "gbps": self.gbps}


#: Called with every finished (or failed) transfer's stats, in the context (contextvars) of the call that opened
#: it (sender) or waited for it (receiver), so a span made there joins the right trace. Must not raise or block.
Observer = Callable[[TransferStats], None]


@dataclass(frozen=True)
class Attachment:
    """A backend's state on one receiver, made by `Backend.attach`; the receiver calls what it holds.

    `params`: its entry in the receiver's descriptor. `close`: release it (once, when the receiver closes).
    `progress`: a non-blocking call made about every millisecond while a transfer through this backend is open
    (for libraries that need the target to make progress, like UCX without a progress thread). `handlers`: gRPC
    method handlers of the KVTransfer service this backend serves (grpc: Push), added by `Receiver.mount`.
    `land_staged`: lands a transfer whose Commit carries its bytes (an eager, staged transfer): called on the
    loop as `land_staged(record, staged, verify) -> layer checksums`; None where the backend never stages.
    """

    params: bytes = b""
    close: Callable[[], None] = lambda: None
    progress: Callable[[], None] | None = None
    handlers: dict = field(default_factory=dict)
    land_staged: Callable | None = None


class Backend(ABC):
    """One way of moving bytes. Class flags say what it can do; an instance is a sender's link to one receiver.

    Sender side: the `Sender` makes one instance per receiver (cached), awaits `connect()` once, asks
    `new_transfer()` for each transfer, and awaits `close()` when the receiver goes away or on `Sender.close()`.
    Receiver side: `attach()` is a classmethod called once by `Receiver.__init__`. Every hook runs on the event
    loop of the Sender or Receiver that calls it.
    """

    name: ClassVar[str]
    #: The sender must be on the receiver's host (equal host ids).
    same_host_only: ClassVar[bool] = False
    #: The sender writes directly into the receiver's memory; the receiver sees no data messages, cannot fence
    #: writes, and verifies what landed by reading its region.
    one_sided: ClassVar[bool] = False
    #: A layer is in the receiver's memory once `Transfer._write` returns (shm; not ucx, whose completion may
    #: precede visibility to the receiver's CPU), so the sender may tell the receiver to verify it early.
    early_verify: ClassVar[bool] = False
    #: A receiver's pool must live in this backend's own memory (`make_region`: shm's shared segment), so a pool in
    #: the process's own memory (`--kv-pool local`, a device pool) cannot be served by it.
    needs_own_pool: ClassVar[bool] = False
    transfer_class: ClassVar[type]  # its Transfer subclass

    def __init__(self, sender, descriptor, peer) -> None:
        self.sender, self.descriptor, self.peer = sender, descriptor, peer
        self.users = 0  # open transfers using this link

    @classmethod
    def unavailable_reason(cls) -> str | None:
        """Why this backend cannot run in this process (a missing library), or None.

        Called by the registry and by Sender/Receiver construction, any number of times: must be cheap, must not
        block or touch the network."""
        return None

    @classmethod
    def make_region(cls, shape: tuple[int, int, int, int]) -> KVRegion | None:
        """A receiver's pool of `shape` in the memory this backend needs (shm: a shared segment), or None when
        ordinary process memory serves. Called by `allocate_region` once per pool, before any loop runs."""
        return None

    @classmethod
    def attach(cls, receiver) -> Attachment | None:
        """Receiver side, once at start: what the receiver publishes and must release, or None if this receiver's
        region cannot be served by this backend. Must not touch the network or block for long; may keep
        `receiver` to call its public `on_*` methods later."""
        return Attachment()

    @classmethod
    def reclaim_stale(cls) -> list[str]:
        """Free what processes that died left behind for this backend (shm: their segments); names of what was
        freed. Called by a worker at start (`reclaim_stale` in the registry), before it allocates anything."""
        return []

    def stale(self) -> bool:
        """Sender side: the receiver this link reaches is gone for good (shm: the segment's owner died), so the
        sender closes the link instead of keeping a dead pool mapped. Called before each open; must be cheap."""
        return False

    async def connect(self) -> None:
        """Sender side, once per receiver before its first transfer (map its memory, exchange metadata).
        May await; runs under the first transfer's deadline. Must not write into the receiver's blocks."""

    async def close(self) -> None:
        """Release what `connect` took. Called once, by the Sender; must not raise."""

    def new_transfer(self, transfer_id: str, dst_ids: np.ndarray, deadline: float, *, local: bool,
                     rendezvous: bool):
        """The Transfer a sender opens through this link (called by `Sender.open`, before any Open is sent).

        `local`: the receiver's control channel is its same-host socket; `rendezvous`: the caller asks for an Open
        round trip before any write (no eager protocol). A backend may return a transfer whose `carries_open` is
        set (its data or Commit carries the Open). Must not block or touch the network."""
        return self.transfer_class(self, transfer_id, dst_ids, deadline)
