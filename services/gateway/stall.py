"""Telling a frozen decode worker from a slow one, mid-stream.

A worker that stops (SIGSTOP, a hung host, a partition) keeps its TCP connection open and sends nothing: its
stream neither ends nor fails. A worker that is merely slow (a loaded machine, a long prompt ahead of it) sends
nothing for a while too. The difference is whether it answers at all: its event loop serves health checks while
its engine computes. So once a stream has been silent for `stall_check_s`, the gateway asks the worker's health,
with the same deadline; an answer (however slow the tokens) keeps the stream, silence ends it as UNAVAILABLE so
that the request is migrated (failover.py), and the scheduler hears of it like of any unreachable worker.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import grpc

from kvmesh.services.common.healthcheck import check_async


def stalled(address: str, silent_s: float) -> grpc.aio.AioRpcError:
    """The error a stream that stalled on a worker that does not answer ends with (its UNAVAILABLE is the
    worker's absence, not an answer of its own, so `errors.unreachable` holds for it)."""
    return grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(),
                                f"no message for {silent_s:.1f} s and no answer to a health check within "
                                f"{silent_s:.1f} s: taken as stopped")


_probes: dict[str, tuple[float, asyncio.Future]] = {}  # address -> (when it started, the check)


def _probe(address: str, timeout_s: float) -> asyncio.Future:
    """The health check of the worker at `address` that every silent stream on it shares: one in flight at a time,
    and its answer (or its silence) stands for `timeout_s` (a thousand streams queued on one slow worker make one
    check a period, not a thousand; a frozen worker's streams all move on at once)."""
    now = time.monotonic()
    started, probe = _probes.get(address, (0.0, None))
    if probe is None or (probe.done() and now - started > timeout_s):
        probe = asyncio.ensure_future(check_async(address, timeout=timeout_s))
        _probes[address] = (now, probe)
        probe.add_done_callback(lambda _: _forget_old(now, timeout_s))
    return probe


def _forget_old(now: float, timeout_s: float) -> None:
    for address, (started, probe) in list(_probes.items()):
        if probe.done() and now - started > 2 * timeout_s:
            del _probes[address]


async def next_message(messages: AsyncIterator, address: str, stall_check_s: float):
    """The next of a stream's messages (`aiter(call)`: the tracing interceptor ends its span as that iterator
    ends, which `call.read()` would bypass), None at its end. While none comes, the worker's health is checked
    every `stall_check_s` (0: never); one that does not answer within that raises `stalled(...)`."""
    read = asyncio.ensure_future(anext(messages, None))
    try:
        while stall_check_s > 0:
            done, _ = await asyncio.wait({read}, timeout=stall_check_s)
            if done:
                break
            probe = _probe(address, stall_check_s)
            await asyncio.wait({read, probe}, return_when=asyncio.FIRST_COMPLETED)
            if read.done():
                break
            await asyncio.wait({probe})  # shared with the worker's other silent streams: never cancelled here
            if probe.cancelled() or probe.exception() is not None or not probe.result():
                raise stalled(address, stall_check_s)
        return await read
    finally:
        if not read.done():  # the iterator is free again once the cancelled read has unwound
            read.cancel()
            await asyncio.wait({read})
