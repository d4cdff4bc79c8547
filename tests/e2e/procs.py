"""Real `kvmesh <service>` processes for end-to-end tests: start on a free 127.0.0.1 port, wait until the
standard grpc.health.v1 service says SERVING, stop with SIGTERM (asserting exit code 0), kill on teardown.

    with ServiceProcess("scheduler", "--lease-s", "2") as scheduler:   # started and SERVING
        stub = SchedulerStub(grpc.insecure_channel(scheduler.address))
    # leaving the block stops it with SIGTERM and asserts exit 0

The `procs` fixture in conftest.py starts any number of them and kills whatever is left at teardown.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from kvmesh.services.common import tls
from kvmesh.services.common.config import ConfigError

LISTENING = re.compile(r"listening on (\S+):(\d+)")
# How long a service may take to say SERVING. A process that exits fails the wait at once, with its output; one that
# is alive is only slow (imports on a loaded machine take tens of seconds), so the bound is generous.
START_TIMEOUT_S = 120.0


def health_status(address: str, service: str = "", timeout_s: float = 1.0,
                  identity: tls.TlsIdentity | None = None) -> str:
    """The grpc.health.v1 status name of service at address ("SERVING", "NOT_SERVING", ...) or the RPC error's
    code name ("UNAVAILABLE", ...) when the check itself fails; over mTLS with `identity` when given."""
    with tls.open_channel(address, aio=False, identity=identity) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout_s)
        except grpc.RpcError as exc:
            return exc.code().name
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def _admin(tls_dir: str) -> tls.TlsIdentity | None:
    """The admin certificate of a certs folder (None without one: a test of a service that refuses to start)."""
    try:
        return tls.load(tls_dir, "admin") if tls_dir else None
    except ConfigError:
        return None


class ServiceProcess:
    """One `kvmesh <service> --host 127.0.0.1 --port 0 ...` subprocess, its output collected line by line.

    prefix is argv put before the command (`ip netns exec NAME` runs it on another emulated host, netns.py), host
    the address it binds and is dialled at."""

    def __init__(self, service: str, *args: str, env: dict[str, str] | None = None, port: int = 0,
                 prefix: list[str] | None = None, host: str = "127.0.0.1") -> None:
        self.service = service
        self.host = host
        self.args = [*(prefix or []), sys.executable, "-m", "kvmesh.services.cli", service, "--host", host,
                     "--port", str(port), *args]
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", "KVMESH_TORCH_THREADS": "1", **(env or {})}
        tls_dir = args[args.index("--tls-dir") + 1] if "--tls-dir" in args else self.env.get("KVMESH_TLS_DIR", "")
        #: The certificate a test presents to this service (an internal one of a mesh with mTLS), or None.
        self.identity = _admin(tls_dir) if service != "gateway" else None
        self.proc: subprocess.Popen | None = None
        self.port = 0
        self.stdout_lines: list[str] = []
        self.stderr_lines: list[str] = []
        self._listening = threading.Event()

    @property
    def address(self) -> str:
        """host:port the process bound."""
        return f"{self.host}:{self.port}"

    @property
    def stdout(self) -> str:
        return "".join(self.stdout_lines)

    @property
    def stderr(self) -> str:
        return "".join(self.stderr_lines)

    def _read(self, stream, lines: list[str], watch: bool) -> None:
        for line in stream:
            lines.append(line)
            match = LISTENING.search(line) if watch else None
            if match and not self._listening.is_set():
                self.port = int(match.group(2))
                self._listening.set()

    def launch(self) -> ServiceProcess:
        """Start the process without waiting for it."""
        self.proc = subprocess.Popen(self.args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     env=self.env, start_new_session=True)
        for stream, lines, watch in ((self.proc.stdout, self.stdout_lines, True),
                                     (self.proc.stderr, self.stderr_lines, False)):
            threading.Thread(target=self._read, args=(stream, lines, watch), daemon=True).start()
        return self

    def start(self, timeout_s: float = START_TIMEOUT_S) -> ServiceProcess:
        """Start the process and wait until its health service says SERVING (AssertionError with its output if
        it exits or is not SERVING within timeout_s)."""
        self.launch()
        self.wait_serving(timeout_s)
        return self

    def wait_serving(self, timeout_s: float = START_TIMEOUT_S) -> None:
        """Wait for the listening line, then for SERVING."""
        deadline = time.monotonic() + timeout_s
        while not self._listening.wait(0.05):
            self._fail_if_exited()
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.service} did not start within {timeout_s}s:\n{self.stderr}")
        while health_status(self.address, identity=self.identity) != "SERVING":
            self._fail_if_exited()
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.service} not SERVING within {timeout_s}s:\n{self.stderr}")
            time.sleep(0.05)

    def _fail_if_exited(self) -> None:
        if self.proc.poll() is not None:
            time.sleep(0.1)  # let the readers catch the last lines
            raise AssertionError(f"{self.service} exited with {self.proc.returncode}:\n{self.stderr}")

    def wait(self, timeout_s: float = 10.0) -> int:
        """Wait for the process to exit; its exit code."""
        code = self.proc.wait(timeout_s)
        time.sleep(0.05)
        return code

    def terminate(self, timeout_s: float = 10.0) -> int:
        """SIGTERM, then wait for exit; the exit code (kills and raises if it does not exit in time)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"{self.service} ignored SIGTERM for {timeout_s}s:\n{self.stderr}") from None

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM and assert a clean exit (code 0) within timeout_s."""
        code = self.terminate(timeout_s)
        assert code == 0, f"{self.service} exited with {code} after SIGTERM:\n{self.stderr}"

    def kill(self) -> None:
        """SIGKILL the process if it still runs (teardown)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)

    def __enter__(self) -> ServiceProcess:
        return self.start() if self.proc is None else self

    def __exit__(self, exc_type, *_exc) -> None:
        try:
            if exc_type is None and self.proc.poll() is None:
                self.stop()
        finally:
            self.kill()


class Procs:
    """Starts service processes for one test and kills every one still running at teardown."""

    def __init__(self) -> None:
        self.started: list[ServiceProcess] = []

    def start(self, service: str, *args: str, env: dict[str, str] | None = None,
              timeout_s: float = START_TIMEOUT_S, **where) -> ServiceProcess:
        """Start `kvmesh <service> *args` and wait until SERVING (where: ServiceProcess's prefix and host)."""
        proc = ServiceProcess(service, *args, env=env, **where)
        self.started.append(proc)
        return proc.start(timeout_s)

    def launch(self, service: str, *args: str, env: dict[str, str] | None = None, port: int = 0,
               **where) -> ServiceProcess:
        """Start `kvmesh <service> *args` without waiting (for tests of failing starts)."""
        proc = ServiceProcess(service, *args, env=env, port=port, **where)
        self.started.append(proc)
        return proc.launch()

    def kill_all(self) -> None:
        """SIGKILL every process still running."""
        for proc in self.started:
            proc.kill()
