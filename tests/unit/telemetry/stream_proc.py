"""Server-streaming through both interceptors (run as a script): cancellation and deadlines must still work.

Prints one JSON line: what the client got before cancelling, whether the server saw the cancel, the deadline's
status code, and the spans (name, kind, trace id) the SDK finished.
"""

import asyncio
import json

import grpc
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from kvmesh.services.common import rpc_tracing


async def main() -> dict:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    cancelled = asyncio.Event()

    async def tokens(request: bytes, context):
        try:
            for i in range(1000):
                yield bytes([i % 256])
                await asyncio.sleep(0.01)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    handler = grpc.method_handlers_generic_handler(
        "kvmesh.test.Stream", {"Tokens": grpc.unary_stream_rpc_method_handler(tokens)})
    server = grpc.aio.server(interceptors=rpc_tracing.server_interceptors())
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    result = {}
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", interceptors=rpc_tracing.client_interceptors()) as ch:
        call = ch.unary_stream("/kvmesh.test.Stream/Tokens")(b"x", timeout=5)
        got = []
        async for message in call:
            got.append(message[0])
            if len(got) == 3:
                break
        call.cancel()
        result["got"] = got
        try:
            await asyncio.wait_for(cancelled.wait(), 5)
            result["server_cancelled"] = True
        except asyncio.TimeoutError:
            result["server_cancelled"] = False
        try:
            async for _ in ch.unary_stream("/kvmesh.test.Stream/Tokens")(b"x", timeout=0.05):
                pass
        except grpc.aio.AioRpcError as exc:
            result["deadline"] = exc.code().name
    await server.stop(0)
    result["spans"] = sorted((s.name, s.kind.name, format(s.context.trace_id, "032x"))
                             for s in exporter.get_finished_spans())
    return result


if __name__ == "__main__":
    print(json.dumps(asyncio.run(main())))
