"""Identifiers: of this process, of its host, of requests and workers."""

from __future__ import annotations

import uuid

from kvmesh.transports.region import host_id as transport_host_id


def new_id(prefix: str) -> str:
    """A fresh random id such as `req-1f3a9c0d2b7e4a51`."""
    return f"{prefix}-{uuid.uuid4().hex[:16]}"


def request_id() -> str:
    """A fresh request id."""
    return new_id("req")


def host_id() -> str:
    """This host's identity: `KVMESH_HOST_ID` when set, else hostname + kernel boot id — the transports' own
    answer, so a worker registers with the scheduler the host id its sender and receiver negotiate with.

    Two workers with equal host ids may exchange KV through same-host transports such as shared memory.
    """
    return transport_host_id()


_INSTANCE_ID = new_id("inst")


def instance_id() -> str:
    """This process's identity, unique per start (the same value for the process's whole life)."""
    return _INSTANCE_ID
