"""The gRPC side of tracing: the interceptors that continue a caller's trace on the server and put the current
trace context into `traceparent` metadata on the client, and which RPCs are left untraced.

`MeshServer` installs `server_interceptors()`, `ChannelCache` installs `client_interceptors()`; the spans go to
the provider `telemetry.setup()` installed. The instrumentation's client interceptors are patched here so that a
cancelled call ends its span and a cancelled awaiting task cancels its RPC, and its server interceptor so that a
streaming handler cut short unwinds its span in its own context.
"""

from __future__ import annotations

import asyncio
import os

from opentelemetry import trace

# RPCs that would drown the requests in traces: probes every few seconds, a heartbeat per worker per second.
UNTRACED_SERVICES = ("grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection",
                     "grpc.reflection.v1.ServerReflection")
UNTRACED_METHODS = ("/kvmesh.v1.Scheduler/Heartbeat",)
# Server side only: the gateway opens the request's root span `gateway.Generate` itself (from the caller's
# `traceparent`), and KV transfers are traced as `kv.transfer` spans by the workers (the transports' control
# channel carries no trace context, so its server spans would only be stray one-span traces).
SERVER_UNTRACED_SERVICES = ("kvmesh.v1.KVTransfer",)
SERVER_UNTRACED_METHODS = ("/kvmesh.v1.Gateway/Generate",)


def untraced_filter(server: bool = False):
    """A filter keeping the RPCs worth a span; `OTEL_PYTHON_GRPC_EXCLUDED_SERVICES` adds services to skip."""
    from opentelemetry.instrumentation.grpc.filters import any_of, full_method_name, negate, service_name

    extra = [s.strip() for s in os.environ.get("OTEL_PYTHON_GRPC_EXCLUDED_SERVICES", "").split(",") if s.strip()]
    services = (*UNTRACED_SERVICES, *extra, *(SERVER_UNTRACED_SERVICES if server else ()))
    methods = (*UNTRACED_METHODS, *(SERVER_UNTRACED_METHODS if server else ()))
    skipped = [service_name(s) for s in services] + [full_method_name(m) for m in methods]
    return negate(any_of(*skipped))


def server_interceptors() -> list:
    """grpc.aio server interceptors that continue the caller's trace (from `traceparent` metadata)."""
    from opentelemetry.instrumentation.grpc import aio_server_interceptor

    interceptor = aio_server_interceptor(filter_=untraced_filter(server=True))
    _stream_in_own_task(interceptor)
    return [interceptor]


_END = object()


def _in_own_task(stream):
    """A server-streaming handler whose generator runs in a task of its own, handing its messages over one at a
    time. grpc.aio drops a handler's generator, unfinished, when the RPC ends while it waits between messages (a
    client that cancels); the garbage collector then closes it in another context, where the instrumentation's
    context tokens cannot be reset ("Failed to detach context" tracebacks, grpc/grpc#42295). Here the dropped
    generator only cancels the task, and the instrumentation unwinds inside it, where it entered."""

    async def handler(request, context):
        asked, out = asyncio.Queue(), asyncio.Queue()  # in lock step: the handler never runs a message ahead

        async def produce() -> None:
            messages = stream(request, context)
            try:
                while await asked.get():
                    try:
                        out.put_nowait((await messages.__anext__(), None))
                    except StopAsyncIteration:
                        out.put_nowait((_END, None))
                        return
            except asyncio.CancelledError:
                pass  # the RPC ended: nobody reads on
            except BaseException as e:  # noqa: BLE001 — an abort or a failure: raised where grpc awaits it
                out.put_nowait((None, e))
            finally:
                await messages.aclose()  # here, in the context it entered, however it ended

        task = asyncio.ensure_future(produce())
        try:
            while True:
                asked.put_nowait(True)
                message, error = await out.get()
                if error is not None:
                    raise error
                if message is _END:
                    return
                yield message
        finally:
            task.cancel()

    return handler


def _stream_in_own_task(interceptor) -> None:
    """Make the server interceptor run every server-streaming handler through `_in_own_task`."""
    base = type(interceptor)

    class OwnTask(base):
        def _intercept_aio_server_stream(self, behavior, handler_call_details):
            return _in_own_task(super()._intercept_aio_server_stream(behavior, handler_call_details))

    if hasattr(base, "_intercept_aio_server_stream"):
        interceptor.__class__ = OwnTask


class _EndOnce:
    """A span proxy whose end() is idempotent, so two paths may each end it."""

    def __init__(self, span: trace.Span):
        self._span = span
        self._ended = False

    def end(self, end_time: int | None = None) -> None:
        if not self._ended:
            self._ended = True
            self._span.end(end_time)

    def __getattr__(self, name: str):
        return getattr(self._span, name)


def _end_span_on_cancel(interceptor) -> None:
    """Make a streaming client interceptor end its span when the call is cancelled.

    The instrumentation ends a streaming call's span only when its response iterator finishes; a consumer that
    stops reading and cancels (the gateway on a client disconnect) would leave the span open and unexported.
    """
    base = type(interceptor)

    class EndOnCancel(base):
        def _wrap_stream_response(self, span, call):
            once = _EndOnce(span)

            def on_done(done_call) -> None:
                if done_call.cancelled():
                    once.set_attribute("rpc.grpc.status_code", 1)  # CANCELLED
                    once.end()

            call.add_done_callback(on_done)
            return super()._wrap_stream_response(once, call)

    if hasattr(base, "_wrap_stream_response"):
        interceptor.__class__ = EndOnCancel


def _cancel_call_on_cancel(interceptor) -> None:
    """Make a unary-response client interceptor cancel the RPC when the task awaiting it is cancelled.

    The instrumentation awaits the call's status inside the interceptor, so cancelling the awaiting task cancels
    only that wait: the RPC itself would run on, and the server would never learn that its caller gave up (a
    cancelled request would keep its prefill worker and cache busy until they finished on their own).
    """
    base = type(interceptor)

    class CancelCall(base):
        async def _wrap_unary_response(self, continuation, span):
            started = []

            async def start():
                started.append(await continuation())
                return started[-1]

            try:
                return await super()._wrap_unary_response(start, span)
            except asyncio.CancelledError:
                for call in started:
                    call.cancel()
                raise

    if hasattr(base, "_wrap_unary_response"):
        interceptor.__class__ = CancelCall


def client_interceptors() -> list:
    """grpc.aio channel interceptors that put the current trace context into `traceparent` metadata."""
    from opentelemetry.instrumentation.grpc import aio_client_interceptors

    import grpc

    interceptors = list(aio_client_interceptors(filter_=untraced_filter()))
    for interceptor in interceptors:
        if isinstance(interceptor, (grpc.aio.UnaryStreamClientInterceptor, grpc.aio.StreamStreamClientInterceptor)):
            _end_span_on_cancel(interceptor)
        else:
            _cancel_call_on_cancel(interceptor)
    return interceptors
