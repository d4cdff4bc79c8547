"""`kvmesh up`: start the whole mesh on this machine as child processes, watch it, stop it.

Children are started in dependency order (scheduler, cache, prefill and decode workers, gateway), each on
127.0.0.1 and each awaited until its grpc.health.v1 service says SERVING. On SIGINT/SIGTERM, or when any child
dies, every child gets SIGTERM (reverse order), then SIGKILL after a grace period. Children also get
PR_SET_PDEATHSIG, so a launcher killed outright leaves no orphan behind.
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

PR_SET_PDEATHSIG = 1


def free_port(host: str = "127.0.0.1") -> int:
    """A port nobody listens on right now."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:  # runs in the child between fork and exec
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        pass


@dataclass
class Child:
    """One service process of the mesh."""

    name: str
    argv: list[str]
    address: str
    env: dict[str, str] = field(default_factory=dict)
    process: subprocess.Popen | None = None

    def start(self) -> None:
        cmd = [sys.executable, "-m", "kvmesh.services.cli", *self.argv]
        self.process = subprocess.Popen(cmd, env={**os.environ, **self.env}, preexec_fn=_die_with_parent)

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None


def wait_serving(child: Child, timeout_s: float) -> None:
    """Block until the child's health service says SERVING; raise if it dies or time runs out."""
    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(child.address) as channel:
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
    """SIGTERM every live child (last started first), then SIGKILL what is left after the grace period."""
    for child in reversed(children):
        if child.alive():
            child.process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for child in reversed(children):
        if child.process is None:
            continue
        try:
            child.process.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            child.process.kill()
            child.process.wait()


class Mesh:
    """The processes of one mesh, started in order and stopped together."""

    def __init__(self, children: list[Child], start_timeout_s: float = 180.0):
        self.children = children
        self.start_timeout_s = start_timeout_s

    def start(self) -> None:
        try:
            for child in self.children:
                child.start()
                wait_serving(child, self.start_timeout_s)
                print(f"kvmesh up: {child.name:<12} serving on {child.address}", flush=True)
        except BaseException:
            stop_all(self.children)
            raise

    def watch(self) -> int:
        """Sleep until a signal or a child's death; stop everything; return the exit status."""
        stop = {"signal": None}

        def on_signal(signum, _frame):
            stop["signal"] = signum

        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, on_signal)
        try:
            while stop["signal"] is None:
                dead = [c for c in self.children if not c.alive()]
                if dead:
                    print(f"kvmesh up: {dead[0].name} exited with status {dead[0].process.returncode}; "
                          "stopping the mesh", file=sys.stderr, flush=True)
                    return 1
                time.sleep(0.2)
            return 0
        finally:
            stop_all(self.children)

    def stop(self) -> None:
        stop_all(self.children)
