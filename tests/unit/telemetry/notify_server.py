"""A tiny grpc.aio server that behaves like kvmesh's skeleton towards systemd (run as a script by the tests).

It prints its port, answers health checks NOT_SERVING until SIGUSR1 (a model still loading), sends READY=1 only
once its own port answers SERVING, then pings the watchdog while healthy and sends STOPPING=1 on SIGTERM.
"""

import asyncio
import signal

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from kvmesh.services.common import healthcheck, sdnotify


async def main() -> None:
    server = grpc.aio.server()
    servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    await servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    print(port, flush=True)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGUSR1, lambda: loop.create_task(
        servicer.set("", health_pb2.HealthCheckResponse.SERVING)))
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    target = f"127.0.0.1:{port}"
    await healthcheck.wait_serving(target, timeout=30)
    sdnotify.ready(f"serving on {target}")
    dog = asyncio.create_task(sdnotify.watchdog_loop(lambda: healthcheck.check_async(target, timeout=0.1)))
    await stop.wait()
    sdnotify.stopping()
    dog.cancel()
    await server.stop(0.5)


if __name__ == "__main__":
    asyncio.run(main())
