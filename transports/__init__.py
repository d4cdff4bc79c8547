"""KV transports: move KV blocks between worker processes' pools; they know nothing of models.

A pool is one uint8 array [num_layers, 2 (K, V), num_blocks, block_nbytes] (`allocate_region`). A transfer copies,
for every layer, K and V of the sender's blocks src[i] into the receiver's blocks dst[i]:

    # receiving worker (decode, cache), on its event loop
    region = allocate_region(layers, num_blocks, block_nbytes(layout), ["shm", "ucx", "grpc"])
    receiver = Receiver(region, layout, address="10.0.0.7:50051")
    receiver.mount(server)                        # its grpc.aio server, before server.start()
    receiver.expect("req-1", dst_block_ids, lease_s=30)
    ...hand receiver.descriptor() to the sender (e.g. in the Prefill request)...
    stats = await receiver.wait("req-1", timeout=30)   # DataLossError / TransferTimeout / TransferAborted

    # sending worker (prefill, cache), on its event loop
    sender = Sender(my_region, layout)            # backends best first; shm only on the same host
    async with await sender.open(descriptor, "req-1", dst_block_ids, timeout=10) as transfer:
        for layer in range(layers):               # as soon as each layer is computed
            await transfer.send_layer(layer, src_block_ids)
        stats = await transfer.commit()           # returns once the receiver verified every layer

    # receiving worker, before reusing the blocks of a request that ended any other way
    await receiver.retire("req-1")               # waits until a one-sided sender can no longer write into them

Modules: base.py (contract, registry, shared helpers), sender.py and transfer.py (the sending side: one Sender,
one Transfer per transfer), receiver.py and record.py (the receiving side: one Receiver, one Record per transfer),
region.py (pools, layouts, host id), blocks.py (runs, checksums), service.py (the KVTransfer gRPC service),
local.py (the same control messages over a Unix socket for same-host senders), grpc.py / shm.py / ucx.py
(backends), staging.py (small shm transfers staged in the sender's own segment: one Commit instead of Open +
Commit), chaos.py (fault and bandwidth injection), errors.py (typed errors with their gRPC status).
"""

from kvmesh.transports.base import BACKENDS, PREFERENCE, Backend, TransferStats, available_backends
from kvmesh.transports.errors import (DataLossError, InvalidTransfer, LayoutMismatch, NoCommonBackend,
                                      PeerUnavailable, TransferAborted, TransferTimeout, TransportError,
                                      UnknownTransfer)
from kvmesh.transports.receiver import Receiver
from kvmesh.transports.region import KVRegion, allocate_region, block_nbytes, host_id, make_layout
from kvmesh.transports.sender import Sender
from kvmesh.transports.shm import reclaim_stale_segments
from kvmesh.transports.transfer import Transfer

__all__ = [
    "BACKENDS", "PREFERENCE", "Backend", "Transfer", "TransferStats", "available_backends", "DataLossError",
    "InvalidTransfer", "LayoutMismatch", "NoCommonBackend", "PeerUnavailable", "TransferAborted",
    "TransferTimeout", "TransportError", "UnknownTransfer", "Receiver", "KVRegion", "allocate_region",
    "block_nbytes", "host_id", "make_layout", "Sender", "reclaim_stale_segments",
]
