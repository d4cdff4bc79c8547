"""Role flips of flexible workers at the scheduler: request_role, a pending flip takes the worker out of its old
role's routing, and its re-registration in the new role completes the flip."""


import asyncio

import grpc
import pytest

from kvmesh.services.common.errors import InvalidArgumentError
from kvmesh.services.kv_identity import KVLayout as Layout
from kvmesh.services.common.server import MeshServer
from kvmesh.services.scheduler import main as scheduler_main
from kvmesh.services.scheduler.config import SchedulerConfig
from kvmesh.services.scheduler.registry import Load, Registry, Role, WorkerSpec
from kvmesh.v1 import common_pb2, scheduler_pb2, scheduler_pb2_grpc

LAYOUT = Layout("tiny", "float32", 16, 2, 2, 8)
P, D = scheduler_pb2.WORKER_ROLE_PREFILL, scheduler_pb2.WORKER_ROLE_DECODE


def layout():
    return common_pb2.KVLayout(model_id="tiny", dtype="float32", block_size=16, num_layers=2, num_kv_heads=2,
                               head_dim=8)


def run_with_scheduler(body):
    """Run body(stub, address) against an in-process scheduler."""
    async def main():
        server = MeshServer(SchedulerConfig(port=0), "scheduler")
        scheduler_main.setup(server.config, server)
        await server.start()
        try:
            async with grpc.aio.insecure_channel(server.address) as channel:
                await body(scheduler_pb2_grpc.SchedulerStub(channel), server.address)
        finally:
            await server.stop(0)

    asyncio.run(main())


def spec(role, port, flexible=True):
    return WorkerSpec(role, f"127.0.0.1:{port}", layout=LAYOUT, flexible=flexible)


def test_request_role_needs_a_flexible_worker_of_another_role():
    registry = Registry(lease_s=10)
    registry.register(spec(Role.DECODE, 7001, flexible=False))
    flexible = registry.register(spec(Role.PREFILL, 7002))
    assert not registry.request_role("127.0.0.1:7001", Role.PREFILL, "fixed role")
    assert not registry.request_role("127.0.0.1:7999", Role.PREFILL, "nobody there")
    assert not registry.request_role("127.0.0.1:7002", Role.PREFILL, "its own role")
    assert registry.desired_role(flexible) is None
    assert [w.spec.address for w in registry.flexible()] == ["127.0.0.1:7002"]
    assert registry.request_role("127.0.0.1:7002", Role.DECODE, "planner")
    assert registry.desired_role(flexible) is Role.DECODE
    with pytest.raises(InvalidArgumentError, match="PREFILL or DECODE"):
        registry.request_role("127.0.0.1:7002", Role.CACHE)


def test_a_pending_flip_takes_the_worker_out_of_its_old_roles_routing_only():
    registry = Registry(lease_s=10)
    leaving = registry.register(spec(Role.PREFILL, 7001))
    staying = registry.register(spec(Role.PREFILL, 7002))
    assert {w.worker_id for w in registry.routable(Role.PREFILL)} == {leaving.worker_id, staying.worker_id}
    registry.request_role("127.0.0.1:7001", Role.DECODE, "more decode")
    assert [w.worker_id for w in registry.routable(Role.PREFILL)] == [staying.worker_id]
    assert registry.routable(Role.DECODE) == []  # not a decode worker until it registers as one
    assert [w.worker_id for w in registry.workers(Role.PREFILL)] == [leaving.worker_id, staying.worker_id]
    registry.heartbeat(leaving.worker_id, Load())  # still alive and heartbeating while it drains
    assert registry.desired_role(registry.find(leaving.worker_id)) is Role.DECODE


def test_reregistering_in_the_new_role_completes_the_flip_and_replaces_the_old_entry():
    registry = Registry(lease_s=10)
    old = registry.register(spec(Role.PREFILL, 7001))
    registry.request_role("127.0.0.1:7001", Role.DECODE)
    again = registry.register(spec(Role.PREFILL, 7001))  # the scheduler forgot it mid-drain: still asked to flip
    assert registry.desired_role(again) is Role.DECODE
    new = registry.register(spec(Role.DECODE, 7001))  # no Deregister first: the old entry goes anyway
    assert registry.desired_role(new) is None
    assert [(w.worker_id, w.spec.role) for w in registry.workers()] == [(new.worker_id, Role.DECODE)]
    assert [w.worker_id for w in registry.routable(Role.DECODE)] == [new.worker_id]
    assert old.worker_id != new.worker_id
    assert not registry.request_role("127.0.0.1:7001", Role.DECODE)  # done: nothing pending any more


def test_asking_a_worker_for_its_own_role_withdraws_a_pending_flip():
    registry = Registry(lease_s=10)
    worker = registry.register(spec(Role.DECODE, 7001))
    assert registry.request_role("127.0.0.1:7001", Role.PREFILL)
    assert registry.routable(Role.DECODE) == []
    assert not registry.request_role("127.0.0.1:7001", Role.DECODE)
    assert registry.desired_role(worker) is None
    assert [w.worker_id for w in registry.routable(Role.DECODE)] == [worker.worker_id]


def test_a_lapsed_worker_leaves_no_pending_flip_behind():
    now = [100.0]
    registry = Registry(lease_s=10, clock=lambda: now[0])
    registry.register(spec(Role.DECODE, 7001))
    registry.request_role("127.0.0.1:7001", Role.PREFILL)
    now[0] += 11
    assert len(registry.expire()) == 1
    fresh = registry.register(spec(Role.DECODE, 7001))  # a new process at the address starts without a flip
    assert registry.desired_role(fresh) is None


def test_only_an_engine_worker_that_is_not_colocated_can_be_flexible():
    with pytest.raises(InvalidArgumentError, match="can be flexible"):
        WorkerSpec(Role.CACHE, "127.0.0.1:7001", flexible=True).validate()
    with pytest.raises(InvalidArgumentError, match="colocated"):
        WorkerSpec(Role.DECODE, "127.0.0.1:7001", layout=LAYOUT, colocated=True, flexible=True).validate()


def test_set_worker_role_answers_in_the_heartbeat_and_the_listing():
    async def body(stub, _address):
        request = scheduler_pb2.RegisterRequest(role=P, address="127.0.0.1:7101", layout=layout(), flexible=True)
        reply = await stub.Register(request, timeout=2)
        fixed = scheduler_pb2.RegisterRequest(role=D, address="127.0.0.1:7102", layout=layout())
        await stub.Register(fixed, timeout=2)
        ask = scheduler_pb2.SetWorkerRoleRequest
        assert (await stub.SetWorkerRole(ask(address="127.0.0.1:7101", role=D, reason="test"), timeout=2)).accepted
        assert not (await stub.SetWorkerRole(ask(address="127.0.0.1:7102", role=P), timeout=2)).accepted
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.SetWorkerRole(ask(address="127.0.0.1:7101", role=scheduler_pb2.WORKER_ROLE_CACHE), timeout=2)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "PREFILL or DECODE" in caught.value.details()
        answer = await stub.Heartbeat(scheduler_pb2.HeartbeatRequest(worker_id=reply.worker_id,
                                                                     lease_token=reply.lease_token), timeout=2)
        assert answer.desired_role == D
        listed = {w.address: w for w in (await stub.ListWorkers(scheduler_pb2.ListWorkersRequest())).workers}
        assert listed["127.0.0.1:7101"].flexible and listed["127.0.0.1:7101"].desired_role == D
        assert not listed["127.0.0.1:7102"].flexible and listed["127.0.0.1:7102"].desired_role == 0

    run_with_scheduler(body)


def test_kvmesh_role_asks_the_scheduler_and_says_when_it_refuses(capsys):
    from kvmesh.services.cli import build_parser

    async def body(stub, address):
        request = scheduler_pb2.RegisterRequest(role=D, address="127.0.0.1:7201", layout=layout(), flexible=True)
        await stub.Register(request, timeout=2)

        def role(*argv):
            args = build_parser().parse_args(["role", "--scheduler", address, *argv])
            return args.func(args)

        assert await asyncio.to_thread(role, "127.0.0.1:7201", "prefill") == 0
        assert await asyncio.to_thread(role, "127.0.0.1:7299", "prefill") == 1
        listed = (await stub.ListWorkers(scheduler_pb2.ListWorkersRequest())).workers
        assert [w.desired_role for w in listed] == [P]

    run_with_scheduler(body)
    out, err = capsys.readouterr()
    assert "flip to prefill pending" in out and "no flexible worker at 127.0.0.1:7299" in err
