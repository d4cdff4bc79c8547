"""Client channels: keepalive options, one channel per address, deadlines derived from the caller's."""

import asyncio

import pytest

from kvmesh.services.common import channels, errors


class FakeContext:
    def __init__(self, remaining):
        self.remaining = remaining

    def time_remaining(self):
        return self.remaining


def test_call_timeout_is_the_callers_remaining_time_capped_by_the_default():
    assert channels.call_timeout(FakeContext(None), 5.0) == 5.0
    assert channels.call_timeout(FakeContext(2.5), 5.0) == 2.5
    assert channels.call_timeout(FakeContext(50.0), 5.0) == 5.0
    assert channels.call_timeout(None, 3.0) == 3.0
    with pytest.raises(errors.DeadlineError):
        channels.call_timeout(FakeContext(0.0), 5.0)


def test_channel_options_ping_so_a_hung_peer_is_found():
    options = dict(channels.channel_options(keepalive_ms=1000, ping_timeout_ms=500))
    assert options["grpc.keepalive_time_ms"] == 1000
    assert options["grpc.http2.ping_timeout_ms"] == 500
    assert options["grpc.keepalive_timeout_ms"] == 500
    assert options["grpc.max_receive_message_length"] == channels.DEFAULT_MAX_MESSAGE_BYTES


def test_channel_cache_keeps_one_channel_per_address():
    async def body():
        cache = channels.ChannelCache()
        first = cache.get("127.0.0.1:1")
        assert cache.get("127.0.0.1:1") is first
        assert cache.get("127.0.0.1:2") is not first
        assert len(cache) == 2
        await cache.drop("127.0.0.1:1")
        assert len(cache) == 1 and cache.get("127.0.0.1:1") is not first
        await cache.close()
        assert len(cache) == 0

    asyncio.run(body())


def test_cancelling_a_unary_call_cancels_the_rpc_on_the_server():
    """The telemetry interceptor awaits the call's status; cancelling the caller must still reach the server."""
    import grpc

    async def body():
        handler_cancelled = asyncio.Event()

        async def slow(request, context):
            try:
                await asyncio.sleep(10)
                return b""
            except asyncio.CancelledError:
                handler_cancelled.set()
                raise

        server = grpc.aio.server()
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
            "test.Slow", {"Call": grpc.unary_unary_rpc_method_handler(slow)}),))
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        channel = channels.open_channel(f"127.0.0.1:{port}")
        try:
            call = asyncio.ensure_future(channel.unary_unary("/test.Slow/Call")(b"x", timeout=10))
            await asyncio.sleep(0.2)
            call.cancel()
            await asyncio.gather(call, return_exceptions=True)
            await asyncio.wait_for(handler_cancelled.wait(), 2)
        finally:
            await channel.close()
            await server.stop(0)

    asyncio.run(body())
