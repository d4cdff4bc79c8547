"""Cache fan-out benchmark: N concurrent Fetch deliveries of one 128-block prefix (2,048 tokens of the small
preset's layout, 32 MiB) from the cache's Delivery into one shared-memory receiver, in one process — the system
prompt every request of a burst starts with.

    python bench/cache_fanout.py [--n 8,16] [--rounds 3]

Prints, per N and round, the wall time until every delivery is verified and how many delivered the whole chain.
Round 0 is cold (staging region and receiver pages first touched; nothing staged yet); later rounds find the
prefix staged if the cache keeps it.
"""

from __future__ import annotations

import argparse
import asyncio
import time

import numpy as np
import xxhash

CHAIN = 128


async def fanout(n: int, rounds: int) -> list[tuple[float, int]]:
    import grpc

    from kvmesh.services.cache.delivery import Delivery, layout_key
    from kvmesh.services.cache.store import BlockStore
    from kvmesh.services.cache.tiers import DramTier
    from kvmesh.transports import allocate_region, block_nbytes, make_layout
    from kvmesh.transports.receiver import Receiver

    layout = make_layout(num_layers=8, block_size=16, num_kv_heads=4, head_dim=64, dtype="float32", model_id="small")
    layer_bytes = block_nbytes(layout)
    store = BlockStore(DramTier(1 << 30))
    hashes = []
    for i in range(CHAIN):
        data = np.random.default_rng(i).integers(0, 256, layout.num_layers * 2 * layer_bytes, np.uint8).tobytes()
        hashes.append(i.to_bytes(16, "little"))
        store.put_verified(layout_key(layout), hashes[-1], data, xxhash.xxh3_64_intdigest(data))
    server = grpc.aio.server()
    port = server.add_insecure_port("127.0.0.1:0")
    region = allocate_region(layout.num_layers, n * CHAIN, layer_bytes, ["shm"])
    receiver = Receiver(region, layout, address=f"127.0.0.1:{port}", backends=["shm"])
    receiver.mount(server)
    await server.start()
    delivery = Delivery(store, staging_blocks=1024, backends=["shm"])

    async def one(k: int, tid: str) -> int:
        dst = list(range(k * CHAIN, (k + 1) * CHAIN))
        receiver.expect(tid, dst, lease_s=60)
        landed = asyncio.ensure_future(receiver.wait(tid, timeout=60))
        done = await delivery.deliver(layout, hashes, receiver.descriptor(), dst, tid, timeout=60)
        if done.num_blocks:
            await landed
        else:
            landed.cancel()
            await receiver.retire(tid)
        return done.num_blocks

    rows = []
    try:
        for r in range(rounds):
            start = time.perf_counter()
            got = await asyncio.gather(*(one(k, f"r{r}-{k}") for k in range(n)))
            rows.append((time.perf_counter() - start, sum(g == CHAIN for g in got)))
    finally:
        await delivery.close()
        receiver.close()
        await server.stop(0)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", default="8,16", help="concurrent deliveries, comma-separated")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    for n in (int(x) for x in args.n.split(",")):
        for r, (seconds, full) in enumerate(asyncio.run(fanout(n, args.rounds))):
            print(f"n={n:3d} round {r}: {seconds * 1e3:7.1f} ms, whole chain delivered {full}/{n}", flush=True)


if __name__ == "__main__":
    main()
