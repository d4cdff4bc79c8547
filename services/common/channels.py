"""Client channels to peers: keepalive, message limits, telemetry interceptors, one channel per address, and
deadlines derived from the caller's.

gRPC Python does not propagate deadlines: every outgoing call inside a handler must pass
`timeout=call_timeout(context, default)`. A hung (SIGSTOPped) peer is found only by a deadline or by keepalive
pings, which is why every channel here pings.
"""

from __future__ import annotations

import asyncio

import grpc

from kvmesh.services.common import errors, rpc_tracing, tls

DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024
DEFAULT_TIMEOUT_S = 10.0


def channel_options(max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES, keepalive_ms: int = 10_000,
                    ping_timeout_ms: int = 5_000) -> list[tuple[str, int]]:
    """Options of every client channel: ping every keepalive_ms (even with no call in flight), give up on a peer
    that does not answer a ping within ping_timeout_ms."""
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.keepalive_time_ms", keepalive_ms),
        ("grpc.keepalive_timeout_ms", ping_timeout_ms),
        ("grpc.http2.ping_timeout_ms", ping_timeout_ms),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
    ]


def open_channel(address: str, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> grpc.aio.Channel:
    """A new channel to address (host:port) with the standard options and telemetry interceptors; over mTLS
    with this process's certificate when it has one (`tls.use`)."""
    return tls.open_channel(address, options=channel_options(max_message_bytes),
                            interceptors=rpc_tracing.client_interceptors() or None)


RETIRE_GRACE_S = 120.0  # a channel opened under a renewed certificate closes this long after its replacement


class ChannelCache:
    """One channel per peer address, opened on first use and closed together.

    Channels belong to the event loop they were made on: keep one cache per loop (the server skeleton's). After
    the process's certificate is renewed (`tls_reload`), the next call to an address opens a new channel that
    presents it; the old one serves calls already on it and closes RETIRE_GRACE_S later.
    """

    def __init__(self, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> None:
        self._max_message_bytes = max_message_bytes
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._generations: dict[str, int] = {}
        self._retired: set[grpc.aio.Channel] = set()

    def get(self, address: str) -> grpc.aio.Channel:
        """The channel to address, opened now if there is none (or it predates the certificate in use)."""
        channel = self._channels.get(address)
        if channel is not None and self._generations[address] != tls.generation():
            self._retire(channel)
            channel = None
        if channel is None:
            channel = self._channels[address] = open_channel(address, self._max_message_bytes)
            self._generations[address] = tls.generation()
        return channel

    def _retire(self, channel: grpc.aio.Channel) -> None:
        self._retired.add(channel)

        def close() -> None:
            if channel in self._retired:
                self._retired.discard(channel)
                asyncio.ensure_future(channel.close())

        asyncio.get_running_loop().call_later(RETIRE_GRACE_S, close)

    async def drop(self, address: str) -> None:
        """Close and forget the channel to address (e.g. after the peer deregistered)."""
        channel = self._channels.pop(address, None)
        self._generations.pop(address, None)
        if channel is not None:
            await channel.close()

    async def close(self) -> None:
        """Close every channel."""
        channels, self._channels = [*self._channels.values(), *self._retired], {}
        self._generations, self._retired = {}, set()
        await asyncio.gather(*(c.close() for c in channels), return_exceptions=True)

    def __len__(self) -> int:
        return len(self._channels)


def call_timeout(context: grpc.aio.ServicerContext | None, default_s: float = DEFAULT_TIMEOUT_S) -> float:
    """Timeout for an outgoing call made while serving `context`: the caller's remaining time, capped at default_s.

    Raises errors.DeadlineError when the caller's deadline has already passed, so no doomed call is started.
    """
    remaining = context.time_remaining() if context is not None else None
    if remaining is None:
        return default_s
    if remaining <= 0:
        raise errors.DeadlineError("the caller's deadline passed before the downstream call")
    return min(remaining, default_s)
