"""A hung (SIGSTOPped) peer is found by the channels' keepalive pings, even by a call with no deadline."""

import asyncio
import os
import signal
import time

import grpc
import pytest

from kvmesh.services.common import channels
from kvmesh.v1 import scheduler_pb2, scheduler_pb2_grpc


def test_a_sigstopped_peer_fails_calls_with_unavailable(procs, monkeypatch):
    scheduler = procs.start("scheduler")
    fast = channels.channel_options(keepalive_ms=500, ping_timeout_ms=500)
    monkeypatch.setattr(channels, "channel_options", lambda max_message_bytes: fast)

    async def body():
        cache = channels.ChannelCache()
        stub = scheduler_pb2_grpc.SchedulerStub(cache.get(scheduler.address))
        await stub.ListWorkers(scheduler_pb2.ListWorkersRequest(), timeout=5)
        os.kill(scheduler.proc.pid, signal.SIGSTOP)
        started = time.monotonic()
        try:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                # No deadline on purpose: only keepalive can end this call.
                await asyncio.wait_for(stub.ListWorkers(scheduler_pb2.ListWorkersRequest()), 15)
        finally:
            os.kill(scheduler.proc.pid, signal.SIGCONT)
            await cache.close()
        return caught.value.code(), time.monotonic() - started

    code, elapsed = asyncio.run(body())
    assert code == grpc.StatusCode.UNAVAILABLE
    assert elapsed < 5
    scheduler.stop()
