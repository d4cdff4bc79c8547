"""The worker-side registration client against a real in-process scheduler."""

import asyncio

from kvmesh.services.common.registration import RegistrationClient, advertise_address
from kvmesh.services.common.server import MeshServer
from kvmesh.services.scheduler import main as scheduler_main
from kvmesh.services.scheduler.config import SchedulerConfig
from kvmesh.v1 import common_pb2, scheduler_pb2

LAYOUT = common_pb2.KVLayout(model_id="tiny", dtype="float32", block_size=16, num_layers=2, num_kv_heads=2,
                             head_dim=8)


def decode_request():
    return scheduler_pb2.RegisterRequest(role=scheduler_pb2.WORKER_ROLE_DECODE, address="127.0.0.1:9",
                                         layout=LAYOUT)


async def until(predicate, timeout_s=5.0):
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached"
        await asyncio.sleep(0.02)


def test_registers_heartbeats_load_reregisters_and_deregisters():
    async def body():
        scheduler = MeshServer(SchedulerConfig(port=0, lease_s=0.6), "scheduler")
        servicer = scheduler_main.setup(scheduler.config, scheduler)
        await scheduler.start()
        waiting = {"n": 3}
        client = RegistrationClient(scheduler.address, decode_request,
                                    lambda: scheduler_pb2.WorkerLoad(num_waiting=waiting["n"]))
        task = asyncio.create_task(client.run())
        await asyncio.wait_for(client.registered.wait(), 5)
        registry = servicer.registry
        assert [w.worker_id for w in registry.workers()] == [client.worker_id]
        waiting["n"] = 7
        await until(lambda: registry.workers()[0].load.num_waiting == 7)
        # The scheduler forgets every worker (as after a restart): the next heartbeat gets NOT_FOUND.
        first_id = client.worker_id
        registry._workers.clear()
        await until(lambda: client.num_registrations == 2)
        assert client.worker_id != first_id and len(registry.workers()) == 1
        task.cancel()
        await client.deregister()
        assert registry.workers() == []
        await scheduler.stop(0)

    asyncio.run(body())


def test_keeps_retrying_until_the_scheduler_is_up():
    async def body():
        scheduler = MeshServer(SchedulerConfig(port=0), "scheduler")
        scheduler_main.setup(scheduler.config, scheduler)
        await scheduler.start()
        address = scheduler.address
        await scheduler.stop(0)
        client = RegistrationClient(address, decode_request, scheduler_pb2.WorkerLoad, retry_s=0.1,
                                    rpc_timeout_s=0.5)
        task = asyncio.create_task(client.run())
        await asyncio.sleep(0.3)
        assert not client.registered.is_set()
        port = int(address.rsplit(":", 1)[1])
        again = MeshServer(SchedulerConfig(port=port), "scheduler")
        scheduler_main.setup(again.config, again)
        await again.start()
        await asyncio.wait_for(client.registered.wait(), 5)
        task.cancel()
        await client.deregister()
        await again.stop(0)

    asyncio.run(body())


def test_advertise_address_never_gives_a_wildcard():
    assert advertise_address("127.0.0.1", 7001) == "127.0.0.1:7001"
    assert advertise_address("0.0.0.0", 7001, "node-3") == "node-3:7001"
    assert not advertise_address("0.0.0.0", 7001).startswith("0.0.0.0")
    assert not advertise_address("[::]", 7001).startswith("[::]")


def test_kv_events_are_deltas_until_a_heartbeat_fails_then_a_full_resync():
    import grpc
    import pytest

    calls = []

    async def kv_events(full: bool) -> scheduler_pb2.KVEvents:
        calls.append(full)
        return scheduler_pb2.KVEvents(stored=[b"h" * 16], full=full)

    async def body():
        scheduler = MeshServer(SchedulerConfig(port=0, lease_s=5), "scheduler")
        scheduler_main.setup(scheduler.config, scheduler)
        await scheduler.start()
        client = RegistrationClient(scheduler.address, decode_request, lambda: scheduler_pb2.WorkerLoad(),
                                    kv_events=kv_events, rpc_timeout_s=0.5)
        try:
            await client.register()
            await client.heartbeat()
            await client.heartbeat()
            assert calls == [True, False]  # a resync after registering, then deltas
            await scheduler.stop(0)
            for _ in range(2):
                with pytest.raises(grpc.aio.AioRpcError):
                    await client.heartbeat()
            assert calls == [True, False, False, True]  # the failed one may or may not have landed: resync
        finally:
            await client.deregister()

    asyncio.run(body())


def test_slow_kv_events_do_not_hold_the_heartbeat_back_and_force_a_resync():
    calls = []

    async def kv_events(full: bool) -> scheduler_pb2.KVEvents:
        calls.append(full)
        if len(calls) == 2:
            await asyncio.sleep(5)  # an engine step that takes longer than the heartbeat may wait
        return scheduler_pb2.KVEvents(stored=[b"h" * 16], full=full)

    async def body():
        scheduler = MeshServer(SchedulerConfig(port=0, lease_s=5), "scheduler")
        servicer = scheduler_main.setup(scheduler.config, scheduler)
        await scheduler.start()
        client = RegistrationClient(scheduler.address, decode_request, lambda: scheduler_pb2.WorkerLoad(),
                                    kv_events=kv_events, rpc_timeout_s=0.3)
        try:
            await client.register()
            for _ in range(3):
                await client.heartbeat()  # the slow second one goes without events, within the timeout
            assert calls == [True, False, True]
            assert servicer.registry.kv_index.num_hashes(client.worker_id) == 1
        finally:
            await client.deregister()
            await scheduler.stop(0)

    asyncio.run(body())
