"""Ports for processes this one starts (children of `kvmesh up`, tensor-parallel ranks' rendezvous): chosen now,
bound by someone else later, so never in the range the kernel hands outgoing connections, and never twice. A
leaf: it imports nothing of the package (the engine uses it)."""

from __future__ import annotations

import random
import socket

_handed_out: set[int] = set()  # ports given to children that may not have bound them yet


_PICK = random.SystemRandom()  # not the module's generator: a test's seed must neither steer nor shift it


def _listen_range() -> range:
    """Ports to hand out: the half below the kernel's ephemeral range. Outgoing connections take their local port
    from that range, so a port chosen there can be taken by any connection between its choice and the child's bind
    (seen on a loaded machine: "address already in use" at a gateway's start); one below it cannot."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return range(0)
    return range(max(1024, low // 2), low) if low > 4096 else range(0)


def free_port(host: str = "127.0.0.1") -> int:
    """A port nobody listens on right now, outside the ephemeral range where the host can, and that this process
    has not handed out before (a child given a port binds it only when it starts, so the kernel may offer the same
    port again meanwhile)."""
    ports = _listen_range()
    for _ in range(200 if ports else 0):
        port = _PICK.choice(ports)
        if port in _handed_out:
            continue
        with socket.socket() as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    while True:
        with socket.socket() as s:
            s.bind((host, 0))
            port = s.getsockname()[1]
        if port not in _handed_out:
            _handed_out.add(port)
            return port


def reserve_ports(*ports: int) -> None:
    """Ports the caller chose itself (the gateway's): never handed out by free_port."""
    _handed_out.update(ports)
