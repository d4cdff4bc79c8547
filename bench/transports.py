"""Transport micro-benchmark: GB/s of each backend at 1, 16 and 256 MiB, with memcpy and raw loopback TCP
measured in the same run as baselines (this machine is noisy: compare ratios, not absolute figures).

    python bench/transports.py [--out FILE.json] [--quick] [--no-checksums] [--window N] [--results bench/RESULTS.md]

Each backend's receiver runs in its own process (a Receiver on a grpc.aio server on 127.0.0.1); the sender runs
here. A transfer is timed from Sender.open until the receiver's `wait` returns, i.e. until the receiving worker
holds KV whose every layer's checksum it verified (both processes read the same CLOCK_MONOTONIC).

By default one transfer is in flight at a time, so small sizes measure a transfer's latency (its fixed cost).
`--window N` measures bandwidth as osu_bw does: N transfers of 1 MiB in flight at once (as a prefill worker's
batch sends them), fewer at larger sizes. Rows: {"backend", "size_bytes", "window", "gbps", "open_ms",
"commit_ms", "gbps_after_open", "memcpy_gbps", "tcp_gbps", "grpc_ceiling_gbps", "loadavg_1m"}.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from baselines import bench_grpc_ceiling, bench_memcpy, bench_tcp, median_gbps  # noqa: E402
from transports_report import goals, plot, write_results  # noqa: E402

MiB = 1 << 20
LAYERS, BLOCK_SIZE, HEADS, HEAD_DIM, DTYPE = 8, 16, 8, 128, "bfloat16"  # 32 KiB blocks, Llama-8B-like
BLOCK_NBYTES = BLOCK_SIZE * HEADS * HEAD_DIM * 2


def layout():
    """The benchmark's KV layout (Llama-8B-like blocks)."""
    from kvmesh.transports import make_layout
    return make_layout(LAYERS, BLOCK_SIZE, HEADS, HEAD_DIM, DTYPE, "bench")


def blocks_for(size: int) -> int:
    """Blocks of one transfer of `size` bytes (all layers, K and V)."""
    return max(1, size // (LAYERS * 2 * BLOCK_NBYTES))


async def serve(backend: str, num_blocks: int) -> None:
    """The receiver side: a region, a Receiver and its service; commands on stdin: expect/wait <tid> <n>."""
    import grpc
    from kvmesh.transports import allocate_region
    from kvmesh.transports.receiver import Receiver

    replies = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # libraries that log to stdout (NIXL) must not garble the replies

    region = allocate_region(LAYERS, num_blocks, BLOCK_NBYTES, backend)
    region.array[:] = 0  # fault the pages in, as a long-running worker's pool would be
    from kvmesh.transports.service import SERVER_OPTIONS
    server = grpc.aio.server(options=SERVER_OPTIONS if os.environ.get("KVMESH_BENCH_OPTS", "1") == "1" else [])
    identity = _tls("decode")  # KVMESH_BENCH_TLS_DIR: the receiver serves mTLS, as a decode worker with --tls-dir
    port = (server.add_secure_port("127.0.0.1:0", identity.server_credentials()) if identity
            else server.add_insecure_port("127.0.0.1:0"))
    receiver = Receiver(region, layout(), address=f"127.0.0.1:{port}", backends=[backend])
    receiver.mount(server)
    await server.start()
    print(base64.b64encode(receiver.descriptor().SerializeToString()).decode(), file=replies, flush=True)
    loop = asyncio.get_running_loop()
    waiters = {}

    async def verified(tid: str) -> tuple:
        """Wait as a decode worker does; note when the verified KV is usable (perf_counter is CLOCK_MONOTONIC, so
        the sender can compare it with its own clock)."""
        stats = await receiver.wait(tid, 60)
        return stats, time.perf_counter()

    while line := await loop.run_in_executor(None, sys.stdin.readline):
        op, tid, n, first = line.split()
        if op == "expect":
            receiver.expect(tid, list(range(int(first), int(first) + int(n))), lease_s=60)
            waiters[tid] = asyncio.ensure_future(verified(tid))
            print("ok", file=replies, flush=True)
        else:
            stats, at = await waiters.pop(tid)
            print(json.dumps({**stats.to_dict(), "verified_at": at}), file=replies, flush=True)
    await server.stop(0)
    receiver.close()


def _tls(role: str):
    """The role's certificate from $KVMESH_BENCH_TLS_DIR (a `kvmesh certs init` folder), or None: plaintext."""
    folder = os.environ.get("KVMESH_BENCH_TLS_DIR")
    if not folder:
        return None
    from kvmesh.services.common.tls import load
    return load(folder, role)


def window_for(size: int, window: int) -> int:
    """Transfers in flight at once: `window` of them at 1 MiB, fewer as they grow (32 MiB in flight at most;
    from 32 MiB up a single transfer is already bound by the copy, not by its fixed cost)."""
    return max(1, min(window, WINDOW_BYTES // size))


WINDOW_BYTES = 32 * MiB


async def bench_backend(backend: str, sizes: list[int], reps: int, verify: bool, window: int = 1
                        ) -> dict[int, dict]:
    """Per size: median GB/s from Open until the receiver holds verified KV, median Open and Commit (sender's
    view) milliseconds, and GB/s from the first write until the receiver holds verified KV (a worker opens before
    it computes, so Open is off the request's critical path; the Commit reply is too, as the receiver admits the
    sequence before the sender hears back).

    With `window` > 1 (osu_bw's method), `window_for(size)` transfers of that size run at once, as a prefill
    worker's batch of prompts sends them, each into its own blocks; GB/s is their bytes from the first Open until
    the receiver holds the last one verified, and the phase times are each transfer's own."""
    from kvmesh.transports import allocate_region
    from kvmesh.transports.sender import Sender
    from kvmesh.v1 import common_pb2

    num_blocks = max(blocks_for(s) * window_for(s, window) for s in sizes)
    proc = subprocess.Popen([sys.executable, __file__, "--serve", backend, "--blocks", str(num_blocks)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
    region = allocate_region(LAYERS, num_blocks, BLOCK_NBYTES)  # a sender's pool: process memory
    region.array[:] = np.random.default_rng(0).integers(0, 256, region.array.shape, np.uint8)
    descriptor = common_pb2.TransportDescriptor.FromString(base64.b64decode(proc.stdout.readline()))
    sender = Sender(region, layout(), backends=[backend], force=backend, verify=verify, tls=_tls("prefill"))

    def ask(line: str) -> str:
        proc.stdin.write(line + "\n")
        return proc.stdout.readline()

    async def one(tid: str, ids: list[int]) -> tuple:
        t = time.perf_counter()
        transfer = await sender.open(descriptor, tid, ids, timeout=60)
        opened = time.perf_counter()
        for layer in range(LAYERS):
            await transfer.send_layer(layer, ids)
        sent = time.perf_counter()
        stats = await transfer.commit()
        return stats, (t, opened, sent, time.perf_counter())

    results, counter = {}, 0
    try:
        for size in sizes:
            n, w = blocks_for(size), window_for(size, window)
            results[size], counter = await _rounds(one, ask, n, w, reps, counter)
            print(f"  {backend:5s} {size // MiB:4d} MiB  {results[size]['gbps']:6.2f} GB/s", file=sys.stderr)
    finally:
        await sender.close()
        proc.stdin.close()
        proc.wait(10)
        region.close()
    return results


async def _rounds(one, ask, n: int, w: int, reps: int, counter: int) -> tuple[dict, int]:
    """`reps` timed rounds (after one warm-up) of `w` concurrent transfers of `n` blocks each; the figures of
    `bench_backend` for this size, and the next transfer number."""
    times, phases = [], []
    for i in range(reps + 1):
        tids = [f"b{counter + k}" for k in range(w)]
        counter += w
        for k, tid in enumerate(tids):
            ask(f"expect {tid} {n} {k * n}")
        done = await asyncio.gather(*(one(tid, list(range(k * n, (k + 1) * n))) for k, tid in enumerate(tids)))
        verified_at = [json.loads(ask(f"wait {tid} 0 0"))["verified_at"] for tid in tids]
        if i:  # the first round warms up connections and pages
            start = min(t for _, (t, *_) in done)
            times.append(max(verified_at) - start)
            phases += [(opened - t, committed - sent, at - opened)
                       for (_, (t, opened, sent, committed)), at in zip(done, verified_at)]
    open_s, commit_s, after_open_s = (statistics.median(p) for p in zip(*phases))
    nbytes = done[0][0].bytes
    return {"gbps": median_gbps(w * nbytes, times), "open_ms": open_s * 1e3, "commit_ms": commit_s * 1e3,
            "gbps_after_open": nbytes / after_open_s / 1e9, "window": w}, counter


async def bench_one_loop(size: int, reps: int) -> dict[str, float]:
    """A staged shm transfer with the sender and the receiver on one event loop, so no message wakes another
    process: what each step of a small transfer costs in CPU alone (median µs), and the part of it that is
    moving bytes (each side's copy and xxh3 of `size`, timed on their own)."""
    import grpc
    import xxhash
    from kvmesh.transports import allocate_region
    from kvmesh.transports.receiver import Receiver
    from kvmesh.transports.sender import Sender

    n = blocks_for(size)
    receiving, sending = allocate_region(LAYERS, n, BLOCK_NBYTES, "shm"), allocate_region(LAYERS, n, BLOCK_NBYTES)
    sending.array[:] = 1
    server = grpc.aio.server()
    port = server.add_insecure_port("127.0.0.1:0")
    receiver = Receiver(receiving, layout(), address=f"127.0.0.1:{port}", backends=["shm"])
    receiver.mount(server)
    await server.start()
    sender = Sender(sending, layout(), backends=["shm"], force="shm")
    descriptor, ids, steps = receiver.descriptor(), list(range(n)), []
    try:
        for i in range(reps + 20):  # the first 20 warm up
            receiver.expect(f"l{i}", ids, lease_s=60)
            t0 = time.perf_counter()
            transfer = await sender.open(descriptor, f"l{i}", ids, timeout=60)
            t1 = time.perf_counter()
            for layer in range(LAYERS):
                await transfer.send_layer(layer, ids)
            t2 = time.perf_counter()
            await transfer.commit()
            t3 = time.perf_counter()
            await receiver.wait(f"l{i}", 10)
            steps.append((t1 - t0, t2 - t1, t3 - t2, time.perf_counter() - t3, time.perf_counter() - t0))
    finally:
        await sender.close()
        receiver.close()
        await server.stop(0)
        receiving.close()
        sending.close()
    src, dst = np.ones(size, np.uint8), np.empty(size, np.uint8)
    data = []
    for _ in range(reps):
        t = time.perf_counter()
        np.copyto(dst, src)
        xxhash.xxh3_64(dst).intdigest()
        data.append(time.perf_counter() - t)
    names = ("open_us", "layers_us", "commit_us", "wait_us", "total_us")
    got = {k: statistics.median(v) * 1e6 for k, v in zip(names, zip(*steps[20:]))}
    return {**got, "bytes_us": 2 * statistics.median(data) * 1e6}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="write the rows as JSON here")
    parser.add_argument("--quick", action="store_true", help="fewer repetitions")
    parser.add_argument("--no-checksums", action="store_true", help="switch per-layer/chunk checksums off")
    parser.add_argument("--window", type=int, default=1,
                        help="transfers in flight at once at 1 MiB (fewer at larger sizes; see window_for)")
    parser.add_argument("--backends", default="", help="comma-separated (default: every available backend)")
    parser.add_argument("--results", type=Path, help="append a table to this markdown file, and a PNG beside it")
    parser.add_argument("--serve", help=argparse.SUPPRESS)
    parser.add_argument("--blocks", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        asyncio.run(serve(args.serve, args.blocks))
        return
    from kvmesh.transports import available_backends

    sizes, reps = [1 * MiB, 16 * MiB, 256 * MiB], (3 if args.quick else 7)
    backends = args.backends.split(",") if args.backends else available_backends()
    memcpy = {s: bench_memcpy(s, reps * 3) for s in sizes}
    tcp = {s: bench_tcp(s, reps) for s in sizes}
    ceiling = {s: bench_grpc_ceiling(s, reps) for s in sizes}
    rows = []
    for backend in backends:
        for size, got in asyncio.run(bench_backend(backend, sizes, reps, not args.no_checksums,
                                                           args.window)).items():
            rows.append({"backend": backend, "size_bytes": size, **{k: round(v, 3) for k, v in got.items()},
                         "memcpy_gbps": round(memcpy[size], 3), "tcp_gbps": round(tcp[size], 3),
                         "grpc_ceiling_gbps": round(ceiling[size], 3),
                         "loadavg_1m": round(os.getloadavg()[0], 2)})
    one_loop = asyncio.run(bench_one_loop(MiB, reps * 30)) if "shm" in backends and not args.no_checksums else None
    print(json.dumps(rows, indent=1))
    print("\n".join(goals(rows)), file=sys.stderr)
    if one_loop:
        print("one loop, staged shm, 1 MiB (µs):", {k: round(v) for k, v in one_loop.items()}, file=sys.stderr)
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1) + "\n")
    if args.results:
        png = args.results.with_name("transports" + ("-nochecksums" if args.no_checksums else "")
                                     + (f"-window{args.window}" if args.window > 1 else "") + ".png")
        plot(rows, png)
        write_results(rows, "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]), args.results, png,
                      one_loop)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
