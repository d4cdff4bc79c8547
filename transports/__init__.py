"""KV transports: move KV blocks between worker processes' pools; they know nothing of models.

    region = allocate_region(num_layers, num_blocks, block_nbytes, backend=["shm", "grpc"])
    receiver = Receiver(region, layout, address="127.0.0.1:50051")   # on the receiving worker
    receiver.mount(server)                                            # its grpc.aio server
    sender = Sender(region2, layout)                                  # on the sending worker
    transfer = await sender.open(receiver.descriptor(), "req-1", dst_block_ids, timeout=10)

See base.py for the contract, receiver.py / sender.py for each side, and the backend modules for the rest.
"""

from kvmesh.transports.base import BACKENDS, PREFERENCE, Backend, Transfer, TransferStats, available_backends
from kvmesh.transports.errors import (DataLossError, InvalidTransfer, LayoutMismatch, NoCommonBackend,
                                      PeerUnavailable, TransferAborted, TransferTimeout, TransportError,
                                      UnknownTransfer)
from kvmesh.transports.receiver import Receiver
from kvmesh.transports.region import KVRegion, allocate_region, block_nbytes, host_id, make_layout
from kvmesh.transports.sender import Sender

__all__ = [
    "BACKENDS", "PREFERENCE", "Backend", "Transfer", "TransferStats", "available_backends", "DataLossError",
    "InvalidTransfer", "LayoutMismatch", "NoCommonBackend", "PeerUnavailable", "TransferAborted",
    "TransferTimeout", "TransportError", "UnknownTransfer", "Receiver", "KVRegion", "allocate_region",
    "block_nbytes", "host_id", "make_layout", "Sender",
]
