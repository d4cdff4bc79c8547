"""Fresh load between heartbeats: a worker heartbeats at once when asked (heartbeat_soon), and its heartbeats say
which routed requests reached it, so the scheduler stops counting exactly those and keeps counting the routes
still on their way."""

import asyncio

from kvmesh.services.common.registration import RegistrationClient, heartbeat_everywhere
from kvmesh.services.common.server import MeshServer
from kvmesh.services.scheduler import main as scheduler_main
from kvmesh.services.scheduler.config import SchedulerConfig
from kvmesh.v1 import scheduler_pb2

from test_registration import decode_request


def test_heartbeat_soon_shows_the_scheduler_the_load_now_and_which_routes_arrived():
    async def body():
        scheduler = MeshServer(SchedulerConfig(port=0, lease_s=60), "scheduler")  # regular heartbeats every 20 s
        servicer = scheduler_main.setup(scheduler.config, scheduler)
        await scheduler.start()
        load = {"waiting": 0}
        client = RegistrationClient(scheduler.address, decode_request,
                                    lambda: scheduler_pb2.WorkerLoad(num_waiting=load["waiting"]),
                                    reports_arrivals=True)
        task = asyncio.create_task(client.run())
        await asyncio.wait_for(client.registered.wait(), 5)
        worker = servicer.registry.workers()[0]
        for rid in ("a", "b", "c"):  # three routes; two reach the worker
            servicer.registry.routed(worker, 10, 2, rid)
        client.note_arrival("a")
        client.note_arrival("b")
        load["waiting"] = 2
        await asyncio.wait_for(heartbeat_everywhere([client], 5.0), 6)
        assert worker.load.num_waiting == 2
        assert (worker.num_routed, worker.num_routed_tokens, worker.num_routed_blocks) == (1, 10, 2)
        assert list(worker.in_transit) == ["c"]
        client.note_arrival("c")
        load["waiting"] = 0  # all three done
        await asyncio.wait_for(client.heartbeat_soon(), 5)
        assert worker.load.num_waiting == 0 and worker.num_routed == 0
        task.cancel()
        await client.deregister()
        await scheduler.stop(0)

    asyncio.run(body())


def test_a_failed_heartbeat_reports_its_arrivals_again():
    async def body():
        scheduler = MeshServer(SchedulerConfig(port=0, lease_s=60), "scheduler")
        servicer = scheduler_main.setup(scheduler.config, scheduler)
        await scheduler.start()
        client = RegistrationClient(scheduler.address, decode_request, scheduler_pb2.WorkerLoad,
                                    reports_arrivals=True, rpc_timeout_s=0.5)
        await client.register()
        worker = servicer.registry.workers()[0]
        servicer.registry.routed(worker, 10, 2, "a")
        client.note_arrival("a")
        good = client._channels
        client.scheduler_address = "127.0.0.1:1"  # nobody there: the heartbeat fails
        try:
            await client.heartbeat()
        except Exception as e:  # noqa: BLE001 - grpc.aio.AioRpcError
            assert "UNAVAILABLE" in str(e.code())
        client.scheduler_address, client._channels = scheduler.address, good
        assert worker.num_routed == 1
        await client.heartbeat()
        assert worker.num_routed == 0
        await client.deregister()
        await scheduler.stop(0)

    asyncio.run(body())


def test_a_withdrawn_worker_leaves_the_registry_until_restored():
    async def body():
        scheduler = MeshServer(SchedulerConfig(port=0, lease_s=0.6), "scheduler")  # heartbeats every 0.2 s
        servicer = scheduler_main.setup(scheduler.config, scheduler)
        await scheduler.start()
        client = RegistrationClient(scheduler.address, decode_request, scheduler_pb2.WorkerLoad)
        task = asyncio.create_task(client.run())
        await asyncio.wait_for(client.registered.wait(), 5)
        await client.withdraw()
        assert servicer.registry.workers() == []
        await asyncio.sleep(1.0)  # several heartbeat periods: it neither heartbeats nor registers again
        assert servicer.registry.workers() == [] and client.num_registrations == 1
        client.restore()
        await asyncio.wait_for(client.registered.wait(), 5)
        assert [w.worker_id for w in servicer.registry.workers()] == [client.worker_id]
        task.cancel()
        await client.deregister()
        await scheduler.stop(0)

    asyncio.run(body())
