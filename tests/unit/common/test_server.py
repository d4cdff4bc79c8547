"""The server skeleton in process: health, reflection, error mapping, draining, tasks and hooks at stop."""

import asyncio
import socket

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from kvmesh.services.common.config import ServerConfig
from kvmesh.services.common.errors import ChecksumError, UnavailableError
from kvmesh.services.common.server import BindError, MeshServer, Service
from kvmesh.v1 import cache_pb2, cache_pb2_grpc, scheduler_pb2, scheduler_pb2_grpc


class SlowScheduler(scheduler_pb2_grpc.SchedulerServicer):
    """ListWorkers takes a while; Route raises a typed error."""

    def __init__(self):
        self.started = asyncio.Event()

    async def ListWorkers(self, request, context):
        self.started.set()
        await asyncio.sleep(0.5)
        return scheduler_pb2.ListWorkersResponse()

    async def Route(self, request, context):
        raise UnavailableError("no workers at all")


def make_server(servicer, **overrides):
    server = MeshServer(ServerConfig(port=0, **overrides), "test")
    server.add_service(Service.of(scheduler_pb2, scheduler_pb2_grpc, servicer))
    return server


async def health(channel, service=""):
    reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service),
                                                            timeout=2)
    return reply.status


def test_health_serving_and_reflection_lists_the_services():
    async def body():
        async with make_server(SlowScheduler()) as server:
            assert server.port > 0
            async with grpc.aio.insecure_channel(server.address) as channel:
                assert await health(channel) == health_pb2.HealthCheckResponse.SERVING
                assert await health(channel, "kvmesh.v1.Scheduler") == health_pb2.HealthCheckResponse.SERVING
                stub = reflection_pb2_grpc.ServerReflectionStub(channel)
                replies = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
                names = {s.name async for r in replies for s in r.list_services_response.service}
        assert {"kvmesh.v1.Scheduler", "grpc.health.v1.Health"} <= names

    asyncio.run(body())


def test_typed_errors_become_statuses():
    async def body():
        async with make_server(SlowScheduler()) as server:
            async with grpc.aio.insecure_channel(server.address) as channel:
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await scheduler_pb2_grpc.SchedulerStub(channel).Route(scheduler_pb2.RouteRequest(), timeout=2)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        assert caught.value.details() == "no workers at all"

    asyncio.run(body())


def test_stop_says_not_serving_cancels_tasks_and_drains_in_flight_rpcs():
    async def body():
        servicer = SlowScheduler()
        server = make_server(servicer)
        seen = {}

        async def forever(_server):
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                seen["cancelled"] = True
                raise

        async def hook():
            seen["status_at_stop"] = await health(channel)

        server.add_task(forever)
        server.on_stop(hook)
        await server.start()
        channel = grpc.aio.insecure_channel(server.address)
        call = asyncio.ensure_future(scheduler_pb2_grpc.SchedulerStub(channel).ListWorkers(
            scheduler_pb2.ListWorkersRequest(), timeout=5))
        await servicer.started.wait()
        await server.stop(grace_s=3)
        reply = await call  # finished inside the grace period, not cut off
        await channel.close()
        assert isinstance(reply, scheduler_pb2.ListWorkersResponse)
        assert seen == {"cancelled": True, "status_at_stop": health_pb2.HealthCheckResponse.NOT_SERVING}

    asyncio.run(body())


def test_a_taken_port_raises_bind_error():
    async def body():
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            server = make_server(SlowScheduler(), host="127.0.0.1")
            server.config = ServerConfig(port=taken.getsockname()[1])
            with pytest.raises(BindError, match="already in use"):
                await server.start()

    asyncio.run(body())


def test_a_failing_background_task_is_logged_at_once(caplog):
    async def body():
        async def broken(_server):
            raise RuntimeError("heartbeat loop broke")

        server = make_server(SlowScheduler())
        server.add_task(broken)
        await server.start()
        await asyncio.sleep(0.05)
        assert "background task broken failed" in caplog.text
        await asyncio.gather(server.stop(0), server.stop(0))  # concurrent stops are safe

    asyncio.run(body())


def test_stop_before_start_is_a_no_op():
    asyncio.run(make_server(SlowScheduler()).stop())


class PeerGone(Exception):
    """An error class from elsewhere that names its own status."""

    grpc_status = grpc.StatusCode.UNAVAILABLE


class BrokenCache(cache_pb2_grpc.CacheServicer):
    """Get fails after its first block; Stats raises a foreign error; Clear has a bug."""

    async def Get(self, request, context):
        yield cache_pb2.CachedBlock(block_hash=b"first")
        raise ChecksumError("block 2 is corrupt")

    async def Stats(self, request, context):
        raise PeerGone("tier host went away")

    async def Clear(self, request, context):
        return {}["missing"]


def test_errors_mid_stream_and_foreign_errors_become_statuses():
    async def body():
        server = MeshServer(ServerConfig(port=0), "test")
        server.add_service(Service.of(cache_pb2, cache_pb2_grpc, BrokenCache()))
        async with server:
            async with grpc.aio.insecure_channel(server.address) as channel:
                stub = cache_pb2_grpc.CacheStub(channel)
                got = []
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    async for block in stub.Get(cache_pb2.GetRequest(), timeout=2):
                        got.append(block.block_hash)
                assert got == [b"first"] and caught.value.code() == grpc.StatusCode.DATA_LOSS
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await stub.Stats(cache_pb2.StatsRequest(), timeout=2)
                assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
                assert caught.value.details() == "tier host went away"
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await stub.Clear(cache_pb2.ClearRequest(), timeout=2)
                assert caught.value.code() == grpc.StatusCode.INTERNAL

    asyncio.run(body())
