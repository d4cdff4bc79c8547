"""The health checks of silent streams: one per worker per period, however many streams wait on it. (The check
itself is replaced by a counter here; tests/e2e/test_migration.py freezes a real worker.)"""

import asyncio

from kvmesh.services.gateway import stall


def test_silent_streams_on_one_worker_share_one_check_a_period(monkeypatch):
    calls = []

    async def check(address, timeout):
        calls.append(address)
        await asyncio.sleep(0.01)
        return True

    monkeypatch.setattr(stall, "check_async", check)
    monkeypatch.setattr(stall, "_probes", {})

    async def run():
        probes = [stall._probe("w1:1", 0.5) for _ in range(1000)]
        assert len({id(p) for p in probes}) == 1  # one in flight for all of them
        await asyncio.gather(*probes)
        assert stall._probe("w1:1", 0.5) is probes[0]  # its answer stands for the period
        stall._probe("w2:1", 0.5)  # another worker: its own check
        await asyncio.sleep(0.6)
        fresh = stall._probe("w1:1", 0.5)  # the period is over: asked again
        await fresh
        assert fresh is not probes[0]

    asyncio.run(run())
    assert calls == ["w1:1", "w2:1", "w1:1"]
