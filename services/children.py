"""The child processes of `kvmesh up`: how one is started (inheriting the environment, dying with the launcher),
awaited until it serves, and how all of them are stopped."""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from kvmesh.services.ports import free_port, reserve_ports  # noqa: F401 - kvmesh up's, re-exported
from kvmesh.services.common.tls import open_channel

PR_SET_PDEATHSIG = 1


try:  # resolved now: between fork and exec the child must not dlopen (another thread may hold its lock)
    _prctl = ctypes.CDLL(None, use_errno=True).prctl
except (OSError, AttributeError):
    _prctl = None


def _die_with_parent() -> None:  # runs in the child between fork and exec
    if _prctl is not None:
        _prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


@dataclass
class Child:
    """One service process of the mesh."""

    name: str
    argv: list[str]
    address: str
    env: dict[str, str] = field(default_factory=dict)
    process: subprocess.Popen | None = None
    metrics_url: str = ""
    #: Children of one stage start together; a stage starts once every child of the one before serves.
    stage: int = 1
    #: The certificate health checks of the child present (a mesh with mTLS), or None.
    tls: object = None

    def start(self) -> None:
        # the child inherits this environment, so OTEL_* and KVMESH_TRACES_FILE reach every service
        cmd = [sys.executable, "-m", "kvmesh.services.cli", *self.argv]
        # PR_SET_PDEATHSIG follows the forking *thread*: children are started (and restarted) by the main thread only
        self.process = subprocess.Popen(cmd, env={**os.environ, **self.env},
                                        preexec_fn=_die_with_parent)  # noqa: PLW1509 — no lock is taken in it

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None


def wait_serving(child: Child, timeout_s: float) -> None:
    """Block until the child's health service says SERVING; raise if it dies or time runs out."""
    deadline = time.monotonic() + timeout_s
    with open_channel(child.address, aio=False, identity=child.tls) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if not child.alive():
                raise RuntimeError(f"{child.name} exited with status {child.process.returncode} while starting")
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=1.0)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.2)
    raise RuntimeError(f"{child.name} at {child.address} was not serving after {timeout_s:.0f} s")


def stop_all(children: list[Child], grace_s: float = 10.0) -> None:
    """SIGTERM the workers and the gateway, then the first stage's children (the schedulers, so the others can
    deregister); SIGKILL whatever is left after the grace period."""
    for wave in ([c for c in children if c.stage], [c for c in children if not c.stage]):
        for child in reversed(wave):
            if child.alive():
                child.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for child in reversed(wave):
            if child.process is None:
                continue
            try:
                child.process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                child.process.kill()
                child.process.wait()
