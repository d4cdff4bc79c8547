"""Client-chosen request ids are unique while in flight: a second request with the id of one still running is
refused with ALREADY_EXISTS (HTTP 409), rather than made unique behind the client's back, so the id a client
uses to find its request in traces and logs names exactly one request. Ids the gateway makes are unique anyway."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from kvmesh.services.common.errors import MeshError


class AlreadyExistsError(MeshError):
    """A request with this id is already in flight: ALREADY_EXISTS."""

    grpc_status = grpc.StatusCode.ALREADY_EXISTS


class LiveIds:
    """The request ids in flight at this gateway."""

    def __init__(self):
        self._live: set[str] = set()

    def take(self, request_ids: list[str]) -> None:
        """Hold every id in request_ids, or none of them: AlreadyExistsError names one in flight."""
        clash = next((r for r in request_ids if r in self._live), None)
        if clash is not None:
            raise AlreadyExistsError(f"request id {clash!r} is already in flight; choose another request_id or "
                                     "leave it out and the gateway makes one")
        self._live.update(request_ids)

    def give_back(self, request_ids: list[str]) -> None:
        self._live.difference_update(request_ids)

    def __len__(self) -> int:
        return len(self._live)


async def held(stream: AsyncIterator, live: LiveIds, request_ids: list[str]) -> AsyncIterator:
    """`stream`'s items, with request_ids held from its first item's request to its end (however it ends: the
    ids are given back when the iteration ends, fails, is closed, or is collected)."""
    live.take(request_ids)
    try:
        async for item in stream:
            yield item
    finally:
        live.give_back(request_ids)
        aclose = getattr(stream, "aclose", None)
        if aclose is not None:
            await aclose()
