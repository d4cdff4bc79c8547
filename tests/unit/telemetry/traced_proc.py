"""A traced grpc.aio server or client process for the telemetry tests (run as a script).

    traced_proc.py server          prints its port, serves /kvmesh.test.Echo/Echo until SIGTERM
    traced_proc.py client PORT     one `gateway.Generate` span around one Echo call (and an untraced health check)

Both call telemetry.setup() and telemetry.shutdown() as the services do; exporters come from the environment.
"""

import asyncio
import signal
import sys

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from kvmesh.services.common import rpc_tracing, telemetry


async def serve() -> None:
    telemetry.setup("prefill", "prefill", "prefill-0")

    async def echo(request: bytes, context) -> bytes:
        with telemetry.tracer().start_as_current_span("prefill.compute") as span:
            span.set_attribute("kvmesh.request_id", request.decode())
        return request

    handler = grpc.method_handlers_generic_handler(
        "kvmesh.test.Echo", {"Echo": grpc.unary_unary_rpc_method_handler(echo)})
    server = grpc.aio.server(interceptors=rpc_tracing.server_interceptors())
    server.add_generic_rpc_handlers((handler,))
    health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    print(port, flush=True)
    await stop.wait()
    await server.stop(0.5)
    telemetry.shutdown()


async def call(port: int) -> None:
    telemetry.setup("gateway", "gateway", "gateway-0")
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}",
                                         interceptors=rpc_tracing.client_interceptors()) as channel:
        echo = channel.unary_unary("/kvmesh.test.Echo/Echo")
        with telemetry.tracer().start_as_current_span("gateway.Generate") as span:
            span.set_attribute("kvmesh.request_id", "req-1")
            assert await echo(b"req-1", timeout=5) == b"req-1"
            # Health checks are filtered out of tracing on both sides: no span for this one.
            await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    telemetry.shutdown()


if __name__ == "__main__":
    asyncio.run(serve() if sys.argv[1] == "server" else call(int(sys.argv[2])))
