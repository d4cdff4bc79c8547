"""The transport contract: capability flags, the registry, and what both sides share.

Public wraps private: `Receiver`, `Sender` and `Transfer` validate, enforce deadlines and leases, checksum,
measure, trace and clean up — once, for every backend. A backend (`grpc.py`, `shm.py`, `ucx.py`) subclasses
`Backend` (here) and `Transfer` (`transfer.py`) and fills in only the private hooks (`_begin`, `_write_runs`,
`_end`, `_cancel`, and the `attach`/`connect`/`close` hooks of `Backend`). See `receiver.py` for the receiving side.
"""

from __future__ import annotations

import asyncio
import time
from abc import ABC
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, ClassVar

from kvmesh.transports import errors

if TYPE_CHECKING:  # pragma: no cover
    from kvmesh.transports.receiver import Receiver
    from kvmesh.transports.sender import Sender
    from kvmesh.transports.service import Peer
    from kvmesh.transports.transfer import Transfer

# Best first. A receiver lists what it accepts in this order unless told otherwise.
PREFERENCE = ("shm", "ucx", "grpc")
# Large enough that a layer's copy is worth a thread hop (~50 us); smaller copies run inline on the loop.
OFFLOAD_BYTES = 1 << 20
# The same for hashing alone, which runs at ~30 GB/s: 4 MiB blocks the loop for ~0.15 ms.
HASH_OFFLOAD_BYTES = 4 << 20
# One-sided backends tell the receiver a layer of at least this size is written (LayerWritten), so it verifies
# that layer while later ones are written; smaller layers are not worth the extra message.
EARLY_VERIFY_BYTES = 4 << 20


@dataclass(frozen=True)
class TransferStats:
    """What one transfer moved and how fast; services put these on spans and metrics."""

    backend: str
    bytes: int
    blocks: int
    layers: int
    seconds: float
    #: Time spent on checksums apart from the copies (0 where a backend fuses them into its copy, as shm does).
    checksum_seconds: float = 0.0

    @property
    def gbps(self) -> float:
        """Gigabytes (1e9 bytes) per second."""
        return self.bytes / self.seconds / 1e9 if self.seconds > 0 else 0.0

    def to_dict(self) -> dict:
        return {"backend": self.backend, "bytes": self.bytes, "blocks": self.blocks, "layers": self.layers,
                "seconds": self.seconds, "checksum_seconds": self.checksum_seconds, "gbps": self.gbps}


@dataclass(frozen=True)
class Attachment:
    """A backend's state on one receiver: its descriptor entry, how to release it, and (for libraries that need
    the target to make progress, like UCX without a progress thread) a non-blocking call the receiver makes
    about every millisecond while a transfer through this backend is open."""

    params: bytes = b""
    close: Callable[[], None] = lambda: None
    progress: Callable[[], None] | None = None


class Backend(ABC):
    """One way of moving bytes. Class flags say what it can do; an instance is a sender's link to one receiver.

    Sender side: the `Sender` makes one instance per receiver (cached), awaits `connect()` once, creates
    `transfer_class` objects for each transfer, and awaits `close()` when the receiver goes away or on
    `Sender.close()`. Receiver side: `attach()` is a classmethod called once by `Receiver.__init__`.
    """

    name: ClassVar[str]
    #: The sender must be on the receiver's host (equal host ids).
    same_host_only: ClassVar[bool] = False
    #: The receiver's pool must live in shared memory (`allocate_region` then makes a shm segment).
    needs_shared_region: ClassVar[bool] = False
    #: The sender writes directly into the receiver's memory; the receiver sees no data messages.
    one_sided: ClassVar[bool] = False
    #: A layer is in the receiver's memory once `_write_runs` returns (shm; not ucx, whose completion may precede
    #: visibility to the receiver's CPU), so the receiver may verify it early (LayerWritten).
    early_verify: ClassVar[bool] = False
    #: The receiver lands every byte itself and checks it against the reservation (grpc), so the Open may travel
    #: with the data and the Commit instead of costing a round trip of its own.
    opens_with_data: ClassVar[bool] = False
    transfer_class: ClassVar[type["Transfer"]]

    def __init__(self, sender: "Sender", descriptor, peer: "Peer") -> None:
        self.sender, self.descriptor, self.peer = sender, descriptor, peer
        self.users = 0  # open transfers using this link

    @classmethod
    def unavailable_reason(cls) -> str | None:
        """Why this backend cannot run in this process (a missing library), or None. Must be cheap."""
        return None

    @classmethod
    def attach(cls, receiver: "Receiver") -> "Attachment | None":
        """Receiver side, once at start: what the receiver publishes and must release, or None if this receiver's
        region cannot be served by this backend. Must not touch the network or block for long."""
        return Attachment()

    async def connect(self) -> None:
        """Sender side, once per receiver before its first transfer (map its memory, exchange metadata)."""

    async def close(self) -> None:
        """Release what `connect` took. Called once; must not raise."""


def _grpc() -> type[Backend]:
    from kvmesh.transports.grpc import GrpcBackend
    return GrpcBackend


def _shm() -> type[Backend]:
    from kvmesh.transports.shm import ShmBackend
    return ShmBackend


def _ucx() -> type[Backend]:
    from kvmesh.transports.ucx import UcxBackend
    return UcxBackend


# The registry: one explicit line per backend; creators import implementations lazily.
BACKENDS: dict[str, Callable[[], type[Backend]]] = {"grpc": _grpc, "shm": _shm, "ucx": _ucx}


def backend_class(name: str) -> type[Backend]:
    """The Backend subclass registered under `name`; ValueError for an unknown name."""
    if name not in BACKENDS:
        raise ValueError(f"unknown transport backend {name!r}; known: {sorted(BACKENDS)}")
    return BACKENDS[name]()


def available_backends() -> list[str]:
    """Registered backends that can run in this process, best first."""
    return [n for n in sorted(BACKENDS, key=_rank) if backend_class(n).unavailable_reason() is None]


def _rank(name: str) -> int:
    return PREFERENCE.index(name) if name in PREFERENCE else len(PREFERENCE)


def report(stats: TransferStats, direction: str, span=None) -> None:
    """Put a finished transfer's figures on its span (conventional `kvmesh.kv.*` attributes, plus the raw
    `kv.*` stats) and on the Prometheus metrics; `direction` is "send" or "recv". Never raises."""
    try:
        from kvmesh.services.common import metrics
        from kvmesh.services.trace import conventions as names
    except ImportError:  # pragma: no cover - transports used without the services package
        return
    metrics.observe_kv_transfer(stats.backend, direction, stats.bytes, stats.seconds)
    if span is not None:
        span.set_attributes({f"kv.{k}": v for k, v in stats.to_dict().items()})
        span.set_attributes({names.ATTR_KV_BACKEND: stats.backend, names.ATTR_KV_DIRECTION: direction,
                             names.ATTR_KV_BYTES: stats.bytes, names.ATTR_KV_BLOCKS: stats.blocks,
                             names.ATTR_KV_GBPS: stats.gbps, "kvmesh.kv.seconds": stats.seconds})


def report_recv(transfer_id: str, stats: TransferStats) -> None:
    """The receiver's `kv.transfer` span (from Open to verified Commit, made after the fact) and metrics."""
    end = time.time_ns()
    span = _start_span(stats.backend, transfer_id, "recv", start_time=end - int(stats.seconds * 1e9))
    report(stats, "recv", span)
    if span is not None:
        span.end(end_time=end)


async def _first_failure(*aws) -> list:
    """Await all; on the first failure cancel the rest and raise it (asyncio.gather would leave them running)."""
    tasks = [asyncio.ensure_future(a) for a in aws]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        failures = [task.exception() for task in done if task.exception() is not None]  # all retrieved
        if failures:
            raise failures[0]
        return [t.result() for t in tasks]
    finally:
        for task in tasks:
            if not task.done():
                task.cancel()


async def _within(make: Callable[[], object], seconds: float):
    if hasattr(asyncio, "timeout"):  # 3.11+: no extra task per await
        async with asyncio.timeout(seconds):
            return await make()
    return await asyncio.wait_for(make(), seconds)  # pragma: no cover - python 3.10


def _typed(exc: BaseException, where: str) -> errors.TransportError:
    if isinstance(exc, errors.TransportError):
        return exc
    if isinstance(exc, (asyncio.TimeoutError, TimeoutError)):
        return errors.TransferTimeout(f"{where}: deadline passed")
    if isinstance(exc, asyncio.CancelledError):
        return errors.TransferAborted(f"{where}: cancelled")
    if isinstance(exc, (ConnectionError, OSError)):
        return errors.PeerUnavailable(f"{where}: {exc}")
    return errors.TransportError(f"{where}: {type(exc).__name__}: {exc}")


def _start_span(backend: str, transfer_id: str, direction: str = "send", start_time: int | None = None):
    """A `kv.transfer` span, child of the caller's current span; `start_time` in epoch ns (default now)."""
    try:
        from opentelemetry import trace
    except ImportError:  # pragma: no cover - opentelemetry-api is a dependency
        return None
    span = trace.get_tracer("kvmesh.transports").start_span("kv.transfer", start_time=start_time)
    span.set_attributes({"kv.backend": backend, "kv.transfer_id": transfer_id, "kvmesh.kv.backend": backend,
                         "kvmesh.kv.direction": direction})
    return span
