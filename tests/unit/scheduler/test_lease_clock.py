"""Leases run on the time the scheduler watched: a scheduler that could not run (a loaded machine, a pause) never
takes its workers for dead when it resumes, and a dead worker still lapses after a lease of watched time."""

import pytest

from kvmesh.services.common.errors import NotFoundError
from kvmesh.services.kv_identity import KVLayout
from kvmesh.services.scheduler.lease_clock import WatchedClock
from kvmesh.services.scheduler.registry import Load, Registry, Role, WorkerSpec


LAYOUT = KVLayout("tiny", "float32", 16, 2, 2, 8)


class FakeTime:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


def ticks(clock, time, seconds):
    """The ticker reads the clock every tick for `seconds`: a scheduler that runs."""
    for _ in range(round(seconds / clock.tick_s)):
        time.t += clock.tick_s
        clock()


def test_a_stalled_scheduler_keeps_its_workers_and_a_dead_worker_still_lapses():
    time = FakeTime()
    clock = WatchedClock(tick_s=0.1, now=time)
    registry = Registry(lease_s=2.0, clock=clock)
    alive = registry.register(WorkerSpec(Role.DECODE, "127.0.0.1:1", layout=LAYOUT))
    dead = registry.register(WorkerSpec(Role.PREFILL, "127.0.0.1:2", layout=LAYOUT))
    ticks(clock, time, 1.0)
    time.t += 30.0  # the scheduler could not run for 30 s: both workers' heartbeats wait in its socket
    registry.heartbeat(alive.worker_id, Load())  # read first after the pause: its lease still holds
    assert clock.unwatched_s == pytest.approx(29.9)
    assert registry.expire() == [] and len(registry.workers()) == 2
    ticks(clock, time, 0.9)  # 1.9 s of watched time since the dead one's last beat
    assert registry.expire() == []
    registry.heartbeat(alive.worker_id, Load())
    ticks(clock, time, 0.2)
    assert registry.expire() == [dead]  # 2.1 s watched without a beat: dead
    with pytest.raises(NotFoundError):
        registry.heartbeat(dead.worker_id, Load())
    assert [w.worker_id for w in registry.workers()] == [alive.worker_id]


def test_ticks_late_by_less_than_a_tick_count_in_full():
    time = FakeTime()
    clock = WatchedClock(tick_s=0.1, now=time)
    start = clock()
    for _ in range(10):
        time.t += 0.19  # a loaded loop: every tick nearly a tick late, but the loop runs
        clock()
    assert clock() - start == pytest.approx(1.9) and clock.unwatched_s == 0.0
