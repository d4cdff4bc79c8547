"""`kvmesh role`: ask the scheduler to flip a flexible worker (`kvmesh worker --role auto`) to another role."""

from __future__ import annotations

import argparse
import os
import sys

ROLES = {"prefill": 1, "decode": 2}  # the proto's WorkerRole numbers


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """`kvmesh role [--scheduler ADDR] [--tls-dir DIR] WORKER_ADDRESS prefill|decode`."""
    parser.add_argument("--scheduler", default="127.0.0.1:50050", help="the scheduler's address (host:port)")
    parser.add_argument("--reason", default="operator", help="why, for the scheduler's log")
    parser.add_argument("--timeout-s", type=float, default=5.0, help="deadline of the call")
    parser.add_argument("--tls-dir", default=os.environ.get("KVMESH_TLS_DIR", ""),
                        help="certs folder of a mesh with mTLS (env KVMESH_TLS_DIR): call with its admin certificate")
    parser.add_argument("--tls-server-name", default=os.environ.get("KVMESH_TLS_SERVER_NAME", ""),
                        help="check the scheduler's certificate against this name (env KVMESH_TLS_SERVER_NAME)")
    parser.add_argument("worker_address", help="the flexible worker's address as registered (host:port)")
    parser.add_argument("role", choices=list(ROLES))


def run(args: argparse.Namespace) -> int:
    """Send SetWorkerRole; 0 when the flip is pending, 1 when refused (no flexible worker there, or the role is
    its own already), 2 on a failed call."""
    import grpc

    from kvmesh.services.common import tls
    from kvmesh.services.common.config import ConfigError
    from kvmesh.v1 import scheduler_pb2, scheduler_pb2_grpc

    try:  # SetWorkerRole is for operators: with mTLS, only the admin certificate may call it
        identity = tls.load(args.tls_dir, "admin", args.tls_server_name) if args.tls_dir else None
    except ConfigError as exc:
        print(f"kvmesh role: {exc}", file=sys.stderr)
        return 2
    request = scheduler_pb2.SetWorkerRoleRequest(address=args.worker_address, role=ROLES[args.role],
                                                 reason=args.reason)
    with tls.open_channel(args.scheduler, aio=False, identity=identity) as channel:
        try:
            reply = scheduler_pb2_grpc.SchedulerStub(channel).SetWorkerRole(request, timeout=args.timeout_s)
        except grpc.RpcError as exc:
            print(f"kvmesh role: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 2
    if not reply.accepted:
        print(f"kvmesh role: refused: no flexible worker at {args.worker_address}, or it is a {args.role} worker "
              "already (see ListWorkers)", file=sys.stderr)
        return 1
    print(f"{args.worker_address}: flip to {args.role} pending (it drains, then registers as {args.role})")
    return 0
