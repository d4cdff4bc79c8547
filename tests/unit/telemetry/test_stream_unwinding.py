"""A server-streaming handler cut short between two messages unwinds in its own context (grpc/grpc#42295): the
context tokens it set (as the tracing instrumentation sets them around every yield) are reset where they were set,
not by the garbage collector's close in another context."""

import asyncio
import contextvars

import pytest

from kvmesh.services.common.rpc_tracing import _in_own_task

VAR = contextvars.ContextVar("span", default=None)


def make_stream(unwound: list):
    async def stream(request, context):
        token = VAR.set("inside")  # as `start_as_current_span` does, held across the yields
        try:
            yield 1
            yield 2
            yield 3
        finally:
            VAR.reset(token)  # ValueError when run in another context
            unwound.append(True)

    return stream


async def cut_short(handler) -> None:
    """Take one message in one task, then drop the generator from another (grpc ends the RPC; GC closes it)."""
    messages = handler(None, None)
    assert await asyncio.ensure_future(messages.__anext__()) == 1
    await asyncio.ensure_future(messages.aclose())


def test_the_bare_generator_cannot_unwind_outside_its_context():
    unwound = []
    with pytest.raises(ValueError, match="different Context"):  # the failure the wrapper exists for
        asyncio.run(cut_short(make_stream(unwound)))


def test_in_its_own_task_it_unwinds_where_it_began():
    unwound = []

    async def run():
        await cut_short(_in_own_task(make_stream(unwound)))
        for _ in range(10):  # the cancelled producer task unwinds on the loop
            await asyncio.sleep(0)

    asyncio.run(run())
    assert unwound == [True]


def test_messages_and_errors_pass_through_in_order():
    async def failing(request, context):
        yield "a"
        yield "b"
        raise RuntimeError("handler failed")

    async def run():
        got = []
        with pytest.raises(RuntimeError, match="handler failed"):
            async for message in _in_own_task(failing)(None, None):
                got.append(message)
        return got

    assert asyncio.run(run()) == ["a", "b"]
