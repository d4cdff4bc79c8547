"""The "grpc" backend: KV chunks over the receiver's KVTransfer.Push (backend.py: sending side and registration;
push.py: receiving side). Works between any two hosts."""

from kvmesh.transports.grpc.backend import GrpcBackend, GrpcTransfer, keep_freed_memory
from kvmesh.transports.grpc.push import decode_chunk, receive_push

__all__ = ["GrpcBackend", "GrpcTransfer", "decode_chunk", "keep_freed_memory", "receive_push"]
