"""systemd's sd_notify protocol in a few lines: readiness, stopping, and the watchdog.

Every function is a no-op returning False/None when the process does not run under a `Type=notify` unit
(`NOTIFY_SOCKET` unset), so services call them unconditionally. The server skeleton calls `ready()` only once its
port answers grpc.health.v1 checks, `stopping()` on SIGTERM, and runs `watchdog_loop()` beside the server.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from typing import Awaitable, Callable

log = logging.getLogger(__name__)


def _address(path: str) -> str:
    # A leading '@' names a socket in Linux's abstract namespace, spelt with a NUL byte.
    return "\0" + path[1:] if path.startswith("@") else path


def notify(state: str) -> bool:
    """Send one state string (e.g. "READY=1\\nSTATUS=serving") to $NOTIFY_SOCKET; True when sent."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(state.encode(), _address(path))
    except OSError as exc:
        log.warning("sd_notify to %s failed: %s", path, exc)
        return False
    return True


def ready(status: str | None = None) -> bool:
    """Tell systemd the service is up (it starts dependants and `systemctl start` returns)."""
    return notify("READY=1" + (f"\nSTATUS={status}" if status else ""))


def stopping() -> bool:
    """Tell systemd the service is shutting down on purpose."""
    return notify("STOPPING=1")


def watchdog_interval() -> float | None:
    """The watchdog period in seconds systemd expects pings within, or None when no watchdog is for us."""
    usec = os.environ.get("WATCHDOG_USEC")
    if not usec:
        return None
    pid = os.environ.get("WATCHDOG_PID")
    if pid and pid.strip() != str(os.getpid()):
        return None
    try:
        seconds = int(usec) / 1e6
    except ValueError:
        log.warning("ignoring WATCHDOG_USEC=%r: not an integer", usec)
        return None
    return seconds if seconds > 0 else None


async def watchdog_loop(is_healthy: Callable[[], Awaitable[bool]]) -> None:
    """Ping WATCHDOG=1 every half interval while `is_healthy()` says so; returns at once with no watchdog.

    An unhealthy (or hanging) check skips the ping, so systemd restarts a service that stops serving.
    """
    interval = watchdog_interval()
    if interval is None:
        return
    half = interval / 2
    while True:
        await asyncio.sleep(half)
        try:
            healthy = await asyncio.wait_for(is_healthy(), timeout=half)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a failing check is an unhealthy service, not a crashed loop
            log.warning("watchdog health check failed: %r", exc)
            healthy = False
        if healthy:
            notify("WATCHDOG=1")
