"""What re-chunking costs: a transfer into a receiver of another block size (16 -> 32, 32 -> 16) against one of the
same block size (16 -> 16), measured in the same run on each backend, as a ratio of median times.

    python bench/rechunk.py [--tokens 2048] [--repeats 7] [--backends grpc,shm] [--out FILE.json]

Sender and receiver share this process and its event loop (a Receiver on a grpc.aio server on 127.0.0.1), so the
figures include both sides' work; a transfer is timed from Sender.open until the receiver's `wait` returned (every
layer verified). Blocks are scattered on both sides, as a paged pool's are. Layout: 8 layers, 8 KV heads of 128,
bfloat16 (4 KiB a token per layer, K and V). Rows: {"backend", "src_block", "dst_block", "tokens", "bytes",
"median_s", "ratio"} (ratio: median over the same backend's 16 -> 16 median), plus the machine (bench/machine.py).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import machine  # noqa: E402

LAYERS, HEADS, HEAD_DIM, DTYPE = 8, 8, 128, "bfloat16"
PAIRS = ((16, 16), (16, 32), (32, 16))


def layout(block_size: int):
    from kvmesh.transports import make_layout
    return make_layout(LAYERS, block_size, HEADS, HEAD_DIM, DTYPE, "bench")


def pool(block_size: int, tokens: int, backend: str):
    from kvmesh.transports import allocate_region, block_nbytes
    num_blocks = 4 * tokens // block_size  # room to scatter
    region = allocate_region(LAYERS, num_blocks, block_nbytes(layout(block_size)), backend)
    region.array[:] = np.random.default_rng(block_size).integers(0, 256, region.array.shape, np.uint8)
    return region


async def measure(backend: str, src_bs: int, dst_bs: int, tokens: int, repeats: int) -> list[float]:
    import grpc
    from kvmesh.transports.receiver import Receiver
    from kvmesh.transports.sender import Sender

    server = grpc.aio.server()
    port = server.add_insecure_port("127.0.0.1:0")
    dst_region, src_region = pool(dst_bs, tokens, backend), pool(src_bs, tokens, ())
    receiver = Receiver(dst_region, layout(dst_bs), address=f"127.0.0.1:{port}", backends=[backend])
    receiver.mount(server)
    await server.start()
    sender = Sender(src_region, layout(src_bs), backends=[backend], force=backend)
    rng, times = np.random.default_rng(0), []
    try:
        for i in range(repeats + 1):  # the first warms the links up and is not counted
            src = rng.permutation(src_region.num_blocks)[:-(-tokens // src_bs)].tolist()
            dst = rng.permutation(dst_region.num_blocks)[:-(-tokens // dst_bs)].tolist()
            receiver.expect(f"t{i}", dst, lease_s=30)
            began = time.perf_counter()
            transfer = await sender.open(receiver.descriptor(), f"t{i}", dst, timeout=60)
            for layer in range(LAYERS):
                await transfer.send_layer(layer, src)
            await transfer.commit()
            await receiver.wait(f"t{i}", timeout=60)
            if i:
                times.append(time.perf_counter() - began)
    finally:
        await sender.close()
        await server.stop(0.5)
        receiver.close()
        dst_region.close()
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--backends", default="grpc,shm")
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    rows = []
    for backend in args.backends.split(","):
        base = None
        for src_bs, dst_bs in PAIRS:
            median = statistics.median(asyncio.run(measure(backend, src_bs, dst_bs, args.tokens, args.repeats)))
            base = base or median
            rows.append({"backend": backend, "src_block": src_bs, "dst_block": dst_bs, "tokens": args.tokens,
                         "bytes": args.tokens * LAYERS * 2 * HEADS * HEAD_DIM * 2, "median_s": round(median, 5),
                         "ratio": round(median / base, 2)})
            print(json.dumps(rows[-1]), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps({"machine": machine(), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
