"""grpc.health.v1 checks: the probe command for containers and the readiness wait before sd_notify READY.

    python -m kvmesh.services.common.healthcheck 127.0.0.1:50051 [--service NAME] [--timeout 2]

exits 0 when the server answers SERVING, 1 otherwise (as Docker and compose healthchecks expect).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from kvmesh.services.common import tls


def check(target: str, service: str = "", timeout: float = 2.0, identity=tls.CURRENT) -> bool:
    """True when `target` answers grpc.health.v1 Check with SERVING within `timeout` seconds (over mTLS presenting
    `identity`, by default this process's if it has one; None: plaintext)."""
    with tls.open_channel(target, aio=False, identity=identity) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        except grpc.RpcError:
            return False
    return reply.status == health_pb2.HealthCheckResponse.SERVING


async def check_async(target: str, service: str = "", timeout: float = 2.0, identity=tls.CURRENT) -> bool:
    """check() for the asyncio loop."""
    async with tls.open_channel(target, identity=identity) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        except grpc.RpcError:
            return False
    return reply.status == health_pb2.HealthCheckResponse.SERVING


async def wait_serving(target: str, service: str = "", timeout: float = 30.0, poll: float = 0.05,
                       identity=tls.CURRENT) -> bool:
    """Poll `target` until it answers SERVING (True) or `timeout` seconds pass (False)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        remaining = deadline - loop.time()
        if remaining <= 0:
            return False
        if await check_async(target, service, timeout=min(1.0, remaining), identity=identity):
            return True
        await asyncio.sleep(poll)


def main(argv: list[str] | None = None) -> int:
    """Exit status 0 when SERVING, 1 when not (or unreachable)."""
    parser = argparse.ArgumentParser(prog="python -m kvmesh.services.common.healthcheck")
    parser.add_argument("target", help="host:port of a grpc.health.v1 server")
    parser.add_argument("--service", default="", help="service name to ask about ('' = the whole server)")
    parser.add_argument("--timeout", type=float, default=2.0, help="seconds to wait for the answer")
    parser.add_argument("--tls-dir", default=os.environ.get("KVMESH_TLS_DIR", ""),
                        help="certs folder of a mesh with mTLS (env KVMESH_TLS_DIR)")
    parser.add_argument("--role", default="admin", help="whose certificate to present from --tls-dir")
    parser.add_argument("--tls-server-name", default=os.environ.get("KVMESH_TLS_SERVER_NAME", ""),
                        help="check the server's certificate against this name (env KVMESH_TLS_SERVER_NAME)")
    args = parser.parse_args(argv)
    try:
        identity = tls.load(args.tls_dir, args.role, args.tls_server_name) if args.tls_dir else None
    except ValueError as exc:  # ConfigError: a missing certificate, named with the fix
        print(f"NOT SERVING: {exc}")
        return 1
    ok = check(args.target, args.service, args.timeout, identity)
    print("SERVING" if ok else "NOT SERVING")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
