"""The health prober: a failed check counts against the breaker (and keeps an open one open), a healthy one
ends a run of failures but never closes an open breaker."""

import asyncio

from kvmesh.services.kv_identity import KVLayout
from kvmesh.services.scheduler.breaker import Breaker, BreakerState
from kvmesh.services.scheduler.health_probe import HealthProber
from kvmesh.services.scheduler.registry import Registry, Role, WorkerSpec

LAYOUT = KVLayout("tiny", "float32", 16, 2, 2, 8)


def setup(answers: list[bool]):
    now = [0.0]
    registry = Registry(lease_s=100, clock=lambda: now[0], breaker=lambda: Breaker(2, cooldown_s=1.0))
    worker = registry.register(WorkerSpec(Role.DECODE, "127.0.0.1:1", layout=LAYOUT))
    checked = []

    async def check(address, service, timeout):
        checked.append(address)
        return answers.pop(0)

    return now, registry, worker, HealthProber(registry, check=check), checked


async def settle():
    """Let the background check run to its end."""
    await asyncio.sleep(0)
    await asyncio.sleep(0)


def test_a_failed_check_after_a_report_opens_and_later_failed_checks_hold_it_open():
    async def main():
        now, registry, worker, prober, checked = setup([False, False])
        registry.record_failure(worker)  # the report
        prober.check_soon(worker)
        await settle()
        assert registry.breaker_state(worker) is BreakerState.OPEN and checked == ["127.0.0.1:1"]
        now[0] = 0.9
        prober.check_soon(worker)  # what watch_open does for an open breaker
        await settle()
        now[0] = 1.5  # past the first cool-down, not past the restarted one
        assert registry.breaker_state(worker) is BreakerState.OPEN and worker not in registry.routable()
        await prober.close()

    asyncio.run(main())


def test_a_healthy_check_ends_the_run_but_does_not_close_an_open_breaker():
    async def main():
        now, registry, worker, prober, _ = setup([True, True])
        registry.record_failure(worker)
        prober.check_soon(worker)
        await settle()
        registry.record_failure(worker)
        assert registry.breaker_state(worker) is BreakerState.CLOSED  # the healthy check reset the count
        registry.record_failure(worker)
        assert registry.breaker_state(worker) is BreakerState.OPEN
        prober.check_soon(worker)
        await settle()
        assert registry.breaker_state(worker) is BreakerState.OPEN
        await prober.close()

    asyncio.run(main())


def test_one_check_at_a_time_per_worker():
    async def main():
        _, registry, worker, prober, checked = setup([False])
        prober.check_soon(worker)
        prober.check_soon(worker)
        await settle()
        assert checked == ["127.0.0.1:1"]
        await prober.close()

    asyncio.run(main())
