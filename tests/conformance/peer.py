"""A transport peer in its own process, driven by JSON lines on stdin (replies on stdout; never pickle).

Started by the conformance tests: it hosts a region, a Receiver and its KVTransfer service on a grpc.aio server on
127.0.0.1, and can also act as a sender that crashes on purpose. Commands: {"id", "op", ...}; replies: {"id",
"ok": true, ...} or {"id", "error": <exception class name>, "message"}.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import sys

import grpc
import numpy as np

from harness import pool_region
from kvmesh.transports import make_layout
from kvmesh.transports.receiver import Receiver
from kvmesh.transports.sender import Sender
from kvmesh.transports.blocks import dst_checksums
from kvmesh.v1 import common_pb2


# Replies go to the original stdout; anything libraries print (NIXL logs to stdout) goes to stderr instead.
REPLIES = os.fdopen(os.dup(1), "w")
os.dup2(2, 1)


class Peer:
    def __init__(self, args) -> None:
        self.layout = make_layout(args.layers, args.block_size, args.heads, args.head_dim, args.dtype, "conformance")
        self.backends = args.backends.split(",")
        self.num_blocks = args.blocks
        self.region = pool_region(self.layout, args.blocks, self.backends, args.pool)
        self.receiver = self.sender = None
        self.retiring: dict = {}

    async def start(self) -> dict:
        self.server = grpc.aio.server()
        port = self.server.add_insecure_port("127.0.0.1:0")
        self.receiver = Receiver(self.region, self.layout, address=f"127.0.0.1:{port}", backends=self.backends)
        self.receiver.mount(self.server)
        await self.server.start()
        return {"pid": os.getpid(), "segment": self.region.name,
                "descriptor": base64.b64encode(self.receiver.descriptor().SerializeToString()).decode()}

    async def op_expect(self, tid, blocks, lease):
        self.receiver.expect(tid, blocks, lease_s=lease)
        return {}

    async def op_wait(self, tid, timeout):
        return {"stats": (await self.receiver.wait(tid, timeout)).to_dict()}

    async def op_cancel(self, tid):
        return {"found": self.receiver.cancel(tid)}

    async def op_retire_start(self, tid):
        self.retiring[tid] = asyncio.ensure_future(self.receiver.retire(tid))
        return {}

    async def op_retired(self, tid):
        return {"done": self.retiring[tid].done()}

    async def op_retire(self, tid):
        await self.receiver.retire(tid)
        return {"fences": self.receiver.num_fences}

    async def op_records(self):
        return {"n": self.receiver.num_transfers}

    async def op_digest(self, blocks):
        ids = np.asarray(blocks, dtype=np.int64)
        return {"checksums": [str(c) for c in dst_checksums(self.region.array, ids, self.layout.num_layers)]}

    async def op_send(self, descriptor, tid, dst, src, die_after_layers, timeout):
        """Send as a sender; with die_after_layers >= 0, exit abruptly (no abort, no cleanup) after that many."""
        if self.sender is None:
            self.region.array[:] = np.random.default_rng(1).integers(0, 256, self.region.array.shape, np.uint8)
            self.sender = Sender(self.region, self.layout, backends=self.backends)
        desc = common_pb2.TransportDescriptor.FromString(base64.b64decode(descriptor))
        transfer = await self.sender.open(desc, tid, dst, timeout=timeout)
        for layer in range(self.layout.num_layers):
            if layer == die_after_layers:
                os._exit(3)
            await transfer.send_layer(layer, src)
        return {"stats": (await transfer.commit()).to_dict()}

    async def handle(self, line: str) -> None:
        msg = json.loads(line)
        rid, op = msg.pop("id"), msg.pop("op")
        try:
            reply = {"id": rid, "ok": True, **await getattr(self, f"op_{op}")(**msg)}
        except Exception as exc:  # reported to the test, which asserts on the type name
            reply = {"id": rid, "error": type(exc).__name__, "message": str(exc)}
        print(json.dumps(reply), file=REPLIES, flush=True)


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--backends", default="grpc")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--pool", default="", help="'local': the pool in the engine's own torch memory")
    for name, default in (("layers", 2), ("blocks", 1024), ("block-size", 4), ("heads", 2), ("head-dim", 8)):
        parser.add_argument(f"--{name}", type=int, default=default)
    peer = Peer(parser.parse_args())
    print(json.dumps({"id": 0, "ok": True, **await peer.start()}), file=REPLIES, flush=True)
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    tasks = set()
    while line := await reader.readline():
        task = asyncio.create_task(peer.handle(line.decode()))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    await peer.server.stop(0.5)
    peer.receiver.close()
    if peer.sender is not None:
        await peer.sender.close()


if __name__ == "__main__":
    asyncio.run(main())
