"""Binding a listener: a taken or unresolvable address is one clear line (BindError), not gRPC's log of a failed
bind."""

from __future__ import annotations

import socket


class BindError(RuntimeError):
    """The server could not bind its address (most often: the port is already in use)."""



def check_bindable(host: str, port: int) -> None:
    """Raise BindError when host:port cannot be bound now (checked with a plain socket, so gRPC's own multi-line
    log of a failed bind never shows in the common case)."""
    if port == 0:
        return
    try:
        infos = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise BindError(f"cannot resolve {host}: {exc.strerror}") from None
    family, kind, proto, _, sockaddr = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC does: TIME_WAIT is no conflict
        try:
            probe.bind(sockaddr)
        except OSError as exc:
            raise BindError(f"cannot bind {host}:{port}: {exc.strerror.lower()}") from None
