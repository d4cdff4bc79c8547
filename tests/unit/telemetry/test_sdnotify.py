"""sd_notify: readiness only after the port answers health checks, watchdog pings, stopping on SIGTERM."""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kvmesh.services.common import healthcheck, sdnotify

SCRIPT = Path(__file__).with_name("notify_server.py")


def _receive(sock: socket.socket, timeout: float) -> list[str]:
    """Every datagram that arrives within `timeout` seconds."""
    got, deadline = [], time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        sock.settimeout(left)
        try:
            got.append(sock.recv(4096).decode())
        except socket.timeout:
            break
    return got


def _wait_for(sock: socket.socket, prefix: str, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        sock.settimeout(left)
        message = sock.recv(4096).decode()
        if message.startswith(prefix):
            return message
    raise AssertionError(f"no {prefix} within {timeout} s")


def _probe(target: str) -> subprocess.CompletedProcess:
    """The container healthcheck command, as compose runs it."""
    return subprocess.run([sys.executable, "-m", "kvmesh.services.common.healthcheck", target, "--timeout", "2"],
                          capture_output=True, text=True, timeout=30)


@pytest.fixture
def notify_socket():
    name = f"@kvmesh-test-{os.getpid()}-{time.monotonic_ns()}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name[1:])
    yield name, sock
    sock.close()


def test_ready_only_after_health_serving_then_watchdog_then_stopping(notify_socket):
    name, sock = notify_socket
    # As systemd does: WATCHDOG_PID is the service's own pid (the shell's $$, kept by exec).
    command = f'WATCHDOG_PID=$$ exec "{sys.executable}" "{SCRIPT}"'
    proc = subprocess.Popen(["/bin/sh", "-c", command], stdout=subprocess.PIPE, text=True, env={
        **os.environ, "NOTIFY_SOCKET": name, "WATCHDOG_USEC": "200000"})
    try:
        port = int(proc.stdout.readline())
        target = f"127.0.0.1:{port}"
        assert not healthcheck.check(target)
        assert _probe(target).returncode == 1
        assert _receive(sock, 0.3) == [], "READY=1 (or a ping) came before the port answered SERVING"
        proc.send_signal(signal.SIGUSR1)
        message = _wait_for(sock, "READY=1", 10)
        assert healthcheck.check(target)
        probe = _probe(target)
        assert probe.returncode == 0 and probe.stdout.strip() == "SERVING"
        assert f"STATUS=serving on {target}" in message
        pings = [m for m in _receive(sock, 0.6) if m == "WATCHDOG=1"]
        assert len(pings) >= 3  # every 0.1 s for 0.6 s, with room for a slow machine
        proc.send_signal(signal.SIGTERM)
        assert _wait_for(sock, "STOPPING=1", 5) == "STOPPING=1"
        assert proc.wait(5) == 0
    finally:
        proc.kill()
        proc.wait()


def test_watchdog_interval_respects_watchdog_pid(monkeypatch):
    monkeypatch.setenv("WATCHDOG_USEC", "200000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert sdnotify.watchdog_interval() == pytest.approx(0.2)
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))
    assert sdnotify.watchdog_interval() is None
    monkeypatch.delenv("WATCHDOG_USEC")
    assert sdnotify.watchdog_interval() is None


def test_notify_without_socket_is_a_noop(monkeypatch):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert sdnotify.notify("READY=1") is False
    assert sdnotify.ready() is False


def test_notify_to_a_filesystem_socket(tmp_path, monkeypatch):
    path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        assert sdnotify.stopping()
        assert sock.recv(100) == b"STOPPING=1"


def test_healthcheck_fails_on_a_closed_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound, never listening: connections are refused
        result = _probe(f"127.0.0.1:{port}")
    assert result.returncode == 1 and "NOT SERVING" in result.stdout
