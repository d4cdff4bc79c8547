"""The registry: registration, heartbeats renew leases, lapsed workers are dropped."""

import pytest

from kvmesh.services.common.errors import InvalidArgumentError, NotFoundError
from kvmesh.services.kv_identity import KVLayout as Layout
from kvmesh.services.scheduler.registry import Load, Registry, Role, WorkerSpec

LAYOUT = Layout("tiny", "float32", 16, 2, 2, 8)


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def decode(address="127.0.0.1:7001", layout=LAYOUT):
    return WorkerSpec(Role.DECODE, address, layout=layout)


def test_heartbeat_renews_the_lease_and_a_lapsed_worker_is_dropped():
    clock = Clock()
    registry = Registry(lease_s=10, clock=clock)
    worker = registry.register(decode())
    clock.now += 8
    registry.heartbeat(worker.worker_id, Load(num_waiting=2))
    clock.now += 8  # 16 s after registering, 8 after the heartbeat
    assert registry.expire() == []
    assert registry.workers()[0].load.num_waiting == 2
    clock.now += 2.5
    assert [w.worker_id for w in registry.expire()] == [worker.worker_id]
    assert registry.workers() == []
    with pytest.raises(NotFoundError, match="register again"):
        registry.heartbeat(worker.worker_id, Load())


def test_a_lapsed_worker_is_invisible_even_before_the_expiry_task_runs():
    clock = Clock()
    registry = Registry(lease_s=1, clock=clock)
    worker = registry.register(decode())
    clock.now += 1.5
    assert registry.workers() == []
    with pytest.raises(NotFoundError):
        registry.heartbeat(worker.worker_id, Load())


def test_reregistering_at_the_same_address_replaces_the_old_entry():
    registry = Registry(lease_s=10)
    old = registry.register(decode())
    new = registry.register(decode())
    assert old.worker_id != new.worker_id
    assert [w.worker_id for w in registry.workers()] == [new.worker_id]


def test_deregister_is_idempotent():
    registry = Registry(lease_s=10)
    worker = registry.register(decode())
    assert registry.deregister(worker.worker_id) is True
    assert registry.deregister(worker.worker_id) is False


@pytest.mark.parametrize("spec, message", [
    (WorkerSpec(Role.DECODE, "nowhere", layout=LAYOUT), "host:port"),
    (WorkerSpec(Role.DECODE, "127.0.0.1:0", layout=LAYOUT), "host:port"),
    (WorkerSpec(Role.PREFILL, "127.0.0.1:7001"), "must send its KV layout"),
    (WorkerSpec(Role.DECODE, "127.0.0.1:7001", layout=Layout("tiny", "float32", 0, 2, 2, 8)), "positive"),
])
def test_bad_registrations_are_rejected(spec, message):
    with pytest.raises(InvalidArgumentError, match=message):
        Registry(lease_s=10).register(spec)


def test_a_cache_worker_needs_no_layout():
    worker = Registry(lease_s=10).register(WorkerSpec(Role.CACHE, "127.0.0.1:7001"))
    assert worker.spec.layout is None


def test_a_heartbeat_that_reports_arrivals_keeps_counting_the_routes_still_on_their_way():
    now = [0.0]
    registry = Registry(lease_s=10, clock=lambda: now[0])
    worker = registry.register(WorkerSpec(Role.DECODE, "127.0.0.1:1", layout=LAYOUT))
    registry.routed(worker, 100, 7, "a")
    registry.routed(worker, 50, 4, "b")
    registry.heartbeat(worker.worker_id, Load(num_waiting=1), arrived=["a"])
    assert (worker.num_routed, worker.num_routed_tokens, worker.num_routed_blocks) == (1, 50, 4)
    now[0] = 5.0
    registry.heartbeat(worker.worker_id, Load(num_waiting=1), arrived=[])
    assert worker.num_routed == 1
    now[0] = 10.5  # "b" never arrived within a lease: its call failed before it reached the worker
    registry.heartbeat(worker.worker_id, Load(), arrived=[])
    assert (worker.num_routed, worker.num_routed_tokens, worker.num_routed_blocks) == (0, 0, 0)


def test_a_heartbeat_that_does_not_report_arrivals_counts_every_route_before_it():
    registry = Registry(lease_s=10)
    worker = registry.register(WorkerSpec(Role.PREFILL, "127.0.0.1:1", layout=LAYOUT))
    registry.routed(worker, 100, 0, "a")
    registry.routed(worker, 100)
    registry.heartbeat(worker.worker_id, Load(num_waiting=2))
    assert (worker.num_routed, worker.num_routed_tokens) == (0, 0) and not worker.in_transit
