"""KV transports: move KV blocks between worker processes' pools; they know nothing of models, nor of services.

A pool is one uint8 array [num_layers, 2 (K, V), num_blocks, block_nbytes] (`allocate_region`). A transfer copies,
for every layer, K and V of the sender's blocks src[i] into the receiver's blocks dst[i]:

    # receiving worker (decode, cache), on its event loop
    region = allocate_region(layers, num_blocks, block_nbytes(layout), available_backends())
    receiver = Receiver(region, layout, address="10.0.0.7:50051", observer=report)
    receiver.mount(server)                        # its grpc.aio server, before server.start()
    receiver.expect("req-1", dst_block_ids, lease_s=30)
    ...hand receiver.descriptor() to the sender (e.g. in the Prefill request)...
    stats = await receiver.wait("req-1", timeout=30)   # DataLossError / TransferTimeout / TransferAborted

    # sending worker (prefill, cache), on its event loop
    sender = Sender(my_region, layout, observer=report)   # backends best first; same-host ones only on its host
    async with await sender.open(descriptor, "req-1", dst_block_ids, timeout=10) as transfer:
        for layer in range(layers):               # as soon as each layer is computed
            await transfer.send_layer(layer, src_block_ids)
        stats = await transfer.commit()           # returns once the receiver verified every layer

    # receiving worker, before reusing the blocks of a request that ended any other way
    await receiver.retire("req-1")               # waits until a one-sided sender can no longer write into them

(`Sender` from `kvmesh.transports.sender`, `Receiver` from `kvmesh.transports.receiver`; `report` is the
service's observer, e.g. `kvmesh.services.common.transfer_telemetry.report`.)

Modules: this one (the registry: the one place that lists backends, and what derives from it), base.py (the
contract), sender.py and transfer.py (the sending side), receiver.py, record.py and fences.py (the receiving
side), region.py (pools, layouts, host id), blocks.py (runs, checksums), aio.py (deadlines), service.py (the
KVTransfer control service), local.py (the same control messages over a Unix socket for same-host senders),
chaos.py (fault and bandwidth injection), errors.py (typed errors with their gRPC status); one package per
backend: grpc/, shm/ (segments and the staged small-transfer protocol), ucx/.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from kvmesh.transports.base import Backend, Observer, TransferStats
from kvmesh.transports.errors import (DataLossError, InvalidTransfer, LayoutMismatch, NoCommonBackend,
                                      PeerUnavailable, TransferAborted, TransferTimeout, TransportError,
                                      UnknownTransfer)
from kvmesh.transports.region import KVRegion, block_nbytes, host_id, make_layout

# Best first: the negotiation preference. A receiver lists what it accepts in this order unless told otherwise.
PREFERENCE = ("shm", "ucx", "grpc")


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


def registered_backends() -> list[str]:
    """Every registered backend, best first, whether or not it can run in this process (e.g. for flag choices)."""
    return sorted(BACKENDS, key=_rank)


def available_backends() -> list[str]:
    """Registered backends that can run in this process, best first."""
    return [n for n in registered_backends() if backend_class(n).unavailable_reason() is None]


def same_host_only(name: str) -> bool:
    """Whether backend `name` moves KV only between processes of one host (a name not registered here: no)."""
    return name in BACKENDS and backend_class(name).same_host_only


#: Where a worker's KV pool may live: "local" (the process's own memory) or in the memory of a backend that needs
#: its own (`Backend.needs_own_pool`: shm's shared segment). The first is the default.
LOCAL_POOL = "local"


def kv_pools() -> tuple[str, ...]:
    """The kinds of KV pool a worker may choose (`--kv-pool`): each backend needing its own memory, then local."""
    return (*[n for n in registered_backends() if backend_class(n).needs_own_pool], LOCAL_POOL)


def pool_backends(backends: Sequence[str], pool: str) -> list[str]:
    """Those of `backends` that can serve a pool of kind `pool` (a local pool: none needing its own memory)."""
    return [b for b in backends if pool != LOCAL_POOL or not backend_class(b).needs_own_pool]


def usable_backends(receiver: Sequence[str], sender: Sequence[str], same_host: bool) -> list[str]:
    """The backends a sender offering `sender` may use to write into a receiver offering `receiver`, in the
    receiver's order (best first): both offer it, and a same-host-only one only when both are on one host. The
    one rule of negotiation (Sender.choose_backend) and of the scheduler's pairing."""
    return [b for b in receiver if b in sender and (same_host or not same_host_only(b))]


def _rank(name: str) -> int:
    return PREFERENCE.index(name) if name in PREFERENCE else len(PREFERENCE)


def allocate_region(num_layers: int, num_blocks: int, block_nbytes: int, backends: str | Sequence[str] = (),
                    mappable: bool = False) -> KVRegion:
    """Allocate a KV pool that a receiver accepting `backends` (a name or a list) can serve.

    Each named backend may need the pool in its own kind of memory (shm: a shared segment that a same-host sender
    maps); the first that does decides. With no backends (a sender's pool, a staging pool) it is ordinary memory.
    mappable: the pool must also be memory other processes of this host can map by the region's `path` (the
    ranks of a tensor-parallel worker share it); any available backend's kind of memory that is serves, and
    ValueError when none here is.
    """
    for n, what in ((num_layers, "num_layers"), (num_blocks, "num_blocks"), (block_nbytes, "block_nbytes")):
        if n <= 0:
            raise ValueError(f"{what} must be > 0, got {n}")
    shape = (num_layers, 2, num_blocks, block_nbytes)
    names = [backends] if isinstance(backends, str) else list(backends)
    if mappable:
        names += [n for n in available_backends() if n not in names]
    for name in names:
        region = backend_class(name).make_region(shape)
        if region is not None and (region.path or not mappable):
            return region
        if region is not None:
            region.close()
    if mappable:
        raise ValueError("no transport backend here places a KV pool in memory other processes can map")
    return KVRegion(array=np.zeros(shape, dtype=np.uint8))


def reclaim_stale(backends: Sequence[str] | None = None) -> list[str]:
    """Free what dead processes left behind for `backends` (default: every available one); names of what was
    freed. Call when a worker starts."""
    names = available_backends() if backends is None else backends
    return [item for name in names for item in backend_class(name).reclaim_stale()]


__all__ = [
    "BACKENDS", "PREFERENCE", "Backend", "Observer", "TransferStats", "available_backends", "backend_class",
    "registered_backends", "same_host_only", "usable_backends", "LOCAL_POOL", "kv_pools", "pool_backends",
    "allocate_region", "reclaim_stale", "DataLossError", "InvalidTransfer", "LayoutMismatch", "NoCommonBackend",
    "PeerUnavailable", "TransferAborted", "TransferTimeout", "TransportError", "UnknownTransfer", "KVRegion",
    "block_nbytes", "host_id", "make_layout",
]
