"""The conformance suite's harness: peer processes driven over stdin/stdout, layouts, errors from peers."""

from __future__ import annotations

import base64
import itertools
import json
import subprocess
import sys
import threading
from pathlib import Path

from kvmesh.transports import LOCAL_POOL, KVRegion, allocate_region, block_nbytes, make_layout
from kvmesh.v1 import common_pb2

PEER = Path(__file__).with_name("peer.py")
NUM_BLOCKS = 12_000
DTYPES = ("float32", "bfloat16", "float16")
spawned: set[int] = set()  # pids of every peer started


def layout_for(dtype: str) -> common_pb2.KVLayout:
    """Two layers of 256-byte blocks whatever the dtype, so every peer's pool is the same size."""
    return make_layout(2, 4, 2, 8 if dtype == "float32" else 16, dtype, "conformance")


def pool_region(layout: common_pb2.KVLayout, num_blocks: int, backends, pool: str) -> KVRegion:
    """A pool as a worker makes it: with pool "local" the engine's own KVCache (torch memory of this process, as
    `--kv-pool local` gives), else in the memory the backends need (`allocate_region`)."""
    if pool != LOCAL_POOL:
        return allocate_region(layout.num_layers, num_blocks, block_nbytes(layout), backends)
    from kvmesh.services.engine.kv_cache import KVCache
    from kvmesh.services.kv_identity import KVLayout

    return KVRegion(array=KVCache(KVLayout.from_proto(layout), num_blocks).byte_view())


class RemoteError(Exception):
    """An exception raised inside a peer process; `kind` is its class name."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(f"{kind}: {message}")
        self.kind = kind


class PeerProcess:
    """A peer.py process: a receiver on 127.0.0.1 (and sender on demand), called with `call(op, **args)`."""

    def __init__(self, backend: str, dtype: str = "float32", num_blocks: int = NUM_BLOCKS, pool: str = "") -> None:
        lay = layout_for(dtype)
        cmd = [sys.executable, str(PEER), "--backends", backend, "--dtype", dtype, "--blocks", str(num_blocks),
               "--pool", pool,
               "--layers", str(lay.num_layers), "--block-size", str(lay.block_size), "--heads",
               str(lay.num_kv_heads), "--head-dim", str(lay.head_dim)]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
        spawned.add(self.proc.pid)
        self._ids = itertools.count(1)
        self._replies: dict[int, dict] = {}
        self._cond = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()
        hello = self._await(0, 20)
        self.pid, self.segment = hello["pid"], hello["segment"]
        self.descriptor = common_pb2.TransportDescriptor.FromString(base64.b64decode(hello["descriptor"]))

    def _read(self) -> None:
        for line in self.proc.stdout:
            msg = json.loads(line)
            with self._cond:
                self._replies[msg["id"]] = msg
                self._cond.notify_all()
        with self._cond:
            self._replies[-1] = {"error": "PeerExited", "message": f"exit code {self.proc.poll()}"}
            self._cond.notify_all()

    def _await(self, rid: int, timeout: float) -> dict:
        with self._cond:
            if not self._cond.wait_for(lambda: rid in self._replies or -1 in self._replies, timeout):
                raise TimeoutError(f"peer {self.proc.pid}: no reply to #{rid} in {timeout}s")
            msg = self._replies.pop(rid, None) or self._replies[-1]
        if "error" in msg:
            raise RemoteError(msg["error"], msg["message"])
        return msg

    def call(self, op: str, reply_within: float = 30, **args) -> dict:
        rid = next(self._ids)
        self.proc.stdin.write(json.dumps({"id": rid, "op": op, **args}) + "\n")
        self.proc.stdin.flush()
        return self._await(rid, reply_within)

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(5)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.kill()
