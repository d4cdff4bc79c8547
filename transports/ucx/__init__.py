"""The "ucx" backend: one-sided NIXL/UCX WRITEs into the receiver's registered pool (backend.py)."""

from kvmesh.transports.ucx.backend import UcxBackend, UcxTransfer

__all__ = ["UcxBackend", "UcxTransfer"]
