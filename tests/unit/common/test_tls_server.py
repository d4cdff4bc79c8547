"""The server skeleton with --tls-dir, in process: mTLS on its port, the role table before every handler, and
channels that check the server's name (the address's host, or the mesh's name)."""

import asyncio
import dataclasses

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from kvmesh.services.common import certs, tls
from kvmesh.services.common.config import ServerConfig
from kvmesh.services.common.server import MeshServer, Service
from kvmesh.v1 import scheduler_pb2, scheduler_pb2_grpc


class Scheduler(scheduler_pb2_grpc.SchedulerServicer):
    """Counts the handlers that ran."""

    def __init__(self):
        self.calls = 0

    async def Route(self, request, context):
        self.calls += 1
        return scheduler_pb2.RouteResponse()


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return certs.init_dir(tmp_path_factory.mktemp("tls"))


@pytest.fixture(autouse=True)
def plaintext_after():
    yield
    tls.use(None)  # the server made its identity the process's: later tests dial plaintext again


def call(server, identity, method):
    async def body():
        async with tls.open_channel(server.address, identity=identity) as channel:
            try:
                if method == "Route":
                    await scheduler_pb2_grpc.SchedulerStub(channel).Route(scheduler_pb2.RouteRequest(), timeout=5)
                else:
                    await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
            except grpc.aio.AioRpcError as exc:
                return exc.code().name
        return "OK"
    return body()


def test_the_skeleton_serves_mtls_and_checks_roles_before_the_handler(folder):
    async def body():
        servicer = Scheduler()
        server = MeshServer(ServerConfig(port=0, tls_dir=str(folder)), "scheduler")
        server.add_service(Service.of(scheduler_pb2, scheduler_pb2_grpc, servicer))
        async with server:
            assert tls.current().role == "scheduler"  # its channels present its certificate
            assert await call(server, None, "Check") == "UNAVAILABLE"  # no certificate: no handshake
            assert await call(server, tls.load(folder, "decode"), "Route") == "PERMISSION_DENIED"
            assert servicer.calls == 0  # refused before the handler ran
            assert await call(server, tls.load(folder, "gateway"), "Route") == "OK"
            assert servicer.calls == 1
            assert await call(server, tls.load(folder, "decode"), "Check") == "OK"  # health: any role
    asyncio.run(body())


def test_channels_check_the_servers_name_or_the_mesh_name(folder):
    async def body():
        server = MeshServer(ServerConfig(port=0, tls_dir=str(folder)), "scheduler")
        async with server:
            admin = tls.load(folder, "admin")
            assert await call(server, admin, "Check") == "OK"  # 127.0.0.1 is in every certificate
            mesh = dataclasses.replace(admin, server_name=certs.MESH_NAME)
            assert await call(server, mesh, "Check") == "OK"
            stranger = dataclasses.replace(admin, server_name="elsewhere.example")
            assert await call(server, stranger, "Check") == "UNAVAILABLE"  # a name no certificate lists
    asyncio.run(body())
