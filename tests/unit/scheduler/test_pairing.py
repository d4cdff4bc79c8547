"""Pairs only with a common transport backend usable between their hosts: a prefill worker offering only shm and
a decode worker on another host offering only ucx are never paired (UNAVAILABLE naming the backends), shm pairs
only within one host id, and in a mesh of mixed backends every route's pair can move its KV."""

import pytest

from kvmesh.services.common.errors import UnavailableError
from kvmesh.services.kv_identity import KVLayout as Layout
from kvmesh.services.scheduler.pairing import pairs
from kvmesh.services.scheduler.policies import POLICIES, RouteQuery, get_policy
from kvmesh.services.scheduler.registry import Load, Registry, Role, WorkerSpec
from kvmesh.services.scheduler.router import route
from kvmesh.transports import usable_backends

FP32 = Layout("tiny", "float32", 16, 2, 2, 8)
QUERY = RouteQuery("r", tuple(range(40)))


def add(registry, role, port, host, transports, colocated=False):
    worker = registry.register(WorkerSpec(role, f"10.0.0.{port}:7000", host_id=host, transports=transports,
                                          layout=FP32, colocated=colocated))
    registry.heartbeat(worker.worker_id, Load())
    return worker


def test_shm_only_prefill_and_ucx_only_decode_on_another_host_are_unavailable_naming_the_backends():
    registry = Registry(lease_s=10)
    add(registry, Role.PREFILL, 1, "host-a", ("shm",))
    add(registry, Role.DECODE, 2, "host-b", ("ucx",))
    with pytest.raises(UnavailableError, match="shares a transport backend") as refused:
        route(QUERY, registry.workers(), get_policy("slo_aware"), 64)
    text = str(refused.value)
    assert "shm on host host-a" in text and "ucx on host host-b" in text and "same-host only: shm" in text


def test_shm_pairs_only_within_one_host():
    registry = Registry(lease_s=10)
    prefill = add(registry, Role.PREFILL, 1, "host-a", ("shm",))
    far = add(registry, Role.DECODE, 2, "host-b", ("shm", "grpc"))
    near = add(registry, Role.DECODE, 3, "host-a", ("shm",))
    assert not pairs(prefill, far) and pairs(prefill, near)
    for name in POLICIES:
        assert route(QUERY, registry.workers(), get_policy(name), 64).decode is near
    registry.deregister(near.worker_id)
    with pytest.raises(UnavailableError):
        route(QUERY, registry.workers(), get_policy("least_loaded"), 64)


@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_in_a_mesh_of_disjoint_backends_every_route_is_a_pair_that_can_move_its_kv(policy):
    registry = Registry(lease_s=10)
    prefills = [add(registry, Role.PREFILL, 1, "host-a", ("shm",)), add(registry, Role.PREFILL, 2, "host-b", ("grpc",))]
    decodes = [add(registry, Role.DECODE, 3, "host-a", ("shm",)), add(registry, Role.DECODE, 4, "host-c", ("ucx",)),
               add(registry, Role.DECODE, 5, "host-d", ("ucx", "grpc"))]
    chosen = set()
    for i in range(12):
        plan = route(RouteQuery(f"r{i}", tuple(range(40))), registry.workers(), get_policy(policy), 64)
        assert plan.decode is not decodes[1]  # no prefill worker offers ucx
        assert usable_backends(plan.decode.spec.transports, plan.prefill.spec.transports,
                               plan.decode.spec.host_id == plan.prefill.spec.host_id)
        registry.routed(plan.decode, 40, 3, f"r{i}")
        registry.routed(plan.prefill, 40)
        chosen.add((plan.prefill.worker_id, plan.decode.worker_id))
    assert chosen <= {(prefills[0].worker_id, decodes[0].worker_id), (prefills[1].worker_id, decodes[2].worker_id)}


def test_colocated_workers_and_workers_that_name_no_backend_are_not_constrained():
    registry = Registry(lease_s=10)
    colocated = add(registry, Role.DECODE, 1, "host-a", ("shm",), colocated=True)
    assert route(QUERY, registry.workers(), get_policy("slo_aware"), 64).decode is colocated
    registry = Registry(lease_s=10)
    add(registry, Role.PREFILL, 1, "host-a", ())
    decode = add(registry, Role.DECODE, 2, "host-b", ("ucx",))
    assert route(QUERY, registry.workers(), get_policy("slo_aware"), 64).decode is decode
