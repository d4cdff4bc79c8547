"""The baselines bench/transports.py measures in the same run as the transports: numpy memcpy into a reused
buffer, a raw TCP socket on loopback, and bare gRPC Python streaming ready-made messages (the grpc backend's
bound). Each returns GB/s, the median of `reps` timed rounds after a warm-up."""

from __future__ import annotations

import asyncio
import socket
import statistics
import subprocess
import sys
import time

import numpy as np

MiB = 1 << 20


def median_gbps(nbytes: int, seconds: list[float]) -> float:
    return nbytes / statistics.median(seconds) / 1e9


def bench_memcpy(size: int, reps: int) -> float:
    src, dst = np.random.default_rng(0).integers(0, 256, size, np.uint8), np.empty(size, np.uint8)
    np.copyto(dst, src)
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        np.copyto(dst, src)
        times.append(time.perf_counter() - t)
    return median_gbps(size, times)


TCP_SINK = """
import socket, sys
size, reps = int(sys.argv[1]), int(sys.argv[2])
srv = socket.create_server(("127.0.0.1", 0)); print(srv.getsockname()[1], flush=True)
conn, _ = srv.accept(); buf = memoryview(bytearray(size))
for _ in range(reps + 1):
    got = 0
    while got < size:
        got += conn.recv_into(buf[got:], size - got)
    conn.sendall(b"k")
"""


def bench_tcp(size: int, reps: int) -> float:
    """sendall of `size` bytes to another process over loopback, until its one-byte ack."""
    sink = subprocess.Popen([sys.executable, "-c", TCP_SINK, str(size), str(reps)], stdout=subprocess.PIPE, text=True)
    try:
        conn = socket.create_connection(("127.0.0.1", int(sink.stdout.readline())))
        data, times = memoryview(np.random.default_rng(0).integers(0, 256, size, np.uint8)), []
        for i in range(reps + 1):
            t = time.perf_counter()
            conn.sendall(data)
            conn.recv(1)
            if i:  # the first round warms up
                times.append(time.perf_counter() - t)
        conn.close()
        return median_gbps(size, times)
    finally:
        sink.wait(10)


GRPC_SINK = """
import asyncio, grpc
from kvmesh.transports.grpc import keep_freed_memory
from kvmesh.transports.service import SERVER_OPTIONS
keep_freed_memory()
async def push(chunks, context):
    n = 0
    async for chunk in chunks:
        n += len(chunk)
    return n.to_bytes(8, "little")
async def main():
    server = grpc.aio.server(options=SERVER_OPTIONS + [("grpc.max_receive_message_length", 8 << 20)])
    ident = lambda b: b
    handler = grpc.stream_unary_rpc_method_handler(push, request_deserializer=ident, response_serializer=ident)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("sink.Sink", {"Push": handler}),))
    print(server.add_insecure_port("127.0.0.1:0"), flush=True)
    await server.start()
    await server.wait_for_termination()
asyncio.run(main())
"""


def bench_grpc_ceiling(size: int, reps: int) -> float:
    """What gRPC Python itself does here: a grpc.aio client stream of ready-made 1 MiB messages (no encoding,
    no landing, no checksums) into a server that only counts them, until its reply. The grpc backend's bound."""
    import grpc
    from kvmesh.transports.grpc import keep_freed_memory

    keep_freed_memory()  # as the backend does: the same allocator behaviour on both sides of the comparison
    sink = subprocess.Popen([sys.executable, "-c", GRPC_SINK], stdout=subprocess.PIPE, text=True)

    async def run() -> float:
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{int(sink.stdout.readline())}")
        push = channel.stream_unary("/sink.Sink/Push", request_serializer=None, response_deserializer=None)
        message = np.random.default_rng(0).integers(0, 256, min(size, MiB), np.uint8).tobytes()

        async def messages():
            for _ in range(max(1, size // len(message))):
                yield message

        times = []
        for i in range(reps + 1):
            t = time.perf_counter()
            await push(messages())
            if i:
                times.append(time.perf_counter() - t)
        await channel.close()
        return median_gbps(max(1, size // len(message)) * len(message), times)

    try:
        return asyncio.run(run())
    finally:
        sink.kill()
        sink.wait(10)
