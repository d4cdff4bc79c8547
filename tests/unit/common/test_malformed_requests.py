"""Bytes that do not parse as a method's request message get INVALID_ARGUMENT naming the method, never UNKNOWN or
the parser's internal text; the server keeps serving."""

import asyncio
import random

import grpc
import pytest

from kvmesh.services.common.config import ServerConfig
from kvmesh.services.common.server import MeshServer, Service
from kvmesh.v1 import scheduler_pb2, scheduler_pb2_grpc


class Scheduler(scheduler_pb2_grpc.SchedulerServicer):
    async def ListWorkers(self, request, context):
        return scheduler_pb2.ListWorkersResponse()

    async def Route(self, request, context):
        return scheduler_pb2.RouteResponse(policy="p")


# bytes no protobuf parser accepts: a field with wire type 7, a truncated varint, a length past the end
GARBAGE = [b"\x0f", b"\x08\xff\xff\xff", b"\x0a\x7fabc", b"\xff" * 64]


@pytest.mark.parametrize("method", ["/kvmesh.v1.Scheduler/ListWorkers", "/kvmesh.v1.Scheduler/Route"])
def test_unparseable_bytes_get_invalid_argument_naming_the_method(method):
    async def body():
        server = MeshServer(ServerConfig(port=0), "test")
        server.add_service(Service.of(scheduler_pb2, scheduler_pb2_grpc, Scheduler()))
        async with server:
            async with grpc.aio.insecure_channel(server.address) as channel:
                call = channel.unary_unary(method, request_serializer=lambda b: b, response_deserializer=lambda b: b)
                rng = random.Random(0)
                for data in GARBAGE + [bytes(rng.getrandbits(8) for _ in range(40)) for _ in range(30)]:
                    try:
                        await call(data, timeout=5)  # random bytes may happen to parse: then it is served
                    except grpc.aio.AioRpcError as e:
                        assert e.code() is grpc.StatusCode.INVALID_ARGUMENT, (data, e.code(), e.details())
                        assert method in e.details() and "DecodeError" not in e.details()
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await call(GARBAGE[0], timeout=5)
                assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
                reply = await scheduler_pb2_grpc.SchedulerStub(channel).Route(scheduler_pb2.RouteRequest(), timeout=5)
                assert reply.policy == "p"  # still serving well-formed calls

    asyncio.run(body())
