"""Fixtures of the transport conformance suite: backends from the registry, peer processes, test data."""

from __future__ import annotations

import base64
import itertools
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from kvmesh.transports import BACKENDS, allocate_region, block_nbytes, make_layout
from kvmesh.transports.base import backend_class
from kvmesh.transports.shm import list_segments
from kvmesh.v1 import common_pb2

PEER = Path(__file__).with_name("peer.py")
NUM_BLOCKS = 12_000
DTYPES = ("float32", "bfloat16", "float16")
_spawned: set[int] = set()


def layout_for(dtype: str) -> common_pb2.KVLayout:
    """Two layers of 256-byte blocks whatever the dtype, so every peer's pool is the same size."""
    return make_layout(2, 4, 2, 8 if dtype == "float32" else 16, dtype, "conformance")


class RemoteError(Exception):
    """An exception raised inside a peer process; `kind` is its class name."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(f"{kind}: {message}")
        self.kind = kind


class PeerProcess:
    """A peer.py process: a receiver on 127.0.0.1 (and sender on demand), called with `call(op, **args)`."""

    def __init__(self, backend: str, dtype: str = "float32", num_blocks: int = NUM_BLOCKS) -> None:
        lay = layout_for(dtype)
        cmd = [sys.executable, str(PEER), "--backends", backend, "--dtype", dtype, "--blocks", str(num_blocks),
               "--layers", str(lay.num_layers), "--block-size", str(lay.block_size), "--heads",
               str(lay.num_kv_heads), "--head-dim", str(lay.head_dim)]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
        _spawned.add(self.proc.pid)
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


def backend_params():
    for name in sorted(BACKENDS):
        reason = backend_class(name).unavailable_reason()
        yield pytest.param(name, id=name, marks=pytest.mark.skip(reason=reason) if reason else ())


@pytest.fixture(params=list(backend_params()))
def backend(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def peers():
    """peers(backend, dtype) -> a running receiver peer, shared within the module."""
    running: dict[tuple, PeerProcess] = {}

    def get(backend: str, dtype: str = "float32") -> PeerProcess:
        if (backend, dtype) not in running:
            running[backend, dtype] = PeerProcess(backend, dtype)
        return running[backend, dtype]

    yield get
    for peer in running.values():
        peer.stop()


@pytest.fixture
def new_peer():
    """A private peer process (for tests that kill it), stopped after the test."""
    made = []

    def make(backend: str, dtype: str = "float32") -> PeerProcess:
        made.append(PeerProcess(backend, dtype))
        return made[-1]

    yield make
    for peer in made:
        peer.stop()


@pytest.fixture
def sender_region():
    """Factory: a sender pool for `dtype`, filled with random values of that dtype."""
    made = []

    def make(dtype: str = "float32", seed: int = 0):
        lay = layout_for(dtype)
        region = allocate_region(lay.num_layers, NUM_BLOCKS, block_nbytes(lay), "grpc")
        values = np.random.default_rng(seed).standard_normal(region.array.size // 4, dtype=np.float32)
        if dtype == "float16":
            values = values.astype(np.float16)
        elif dtype == "bfloat16":  # the high half of each float32
            values = (values.view(np.uint32) >> 16).astype(np.uint16)
        raw = values.view(np.uint8)
        region.array.reshape(-1)[:raw.size] = raw
        region.array.reshape(-1)[raw.size:] = 7
        made.append(region)
        return region

    yield make
    for region in made:
        region.close()


@pytest.fixture(scope="session", autouse=True)
def no_leaked_segments():
    """After the suite, no kvmesh shm segment owned by this process or any peer it started may remain."""
    yield
    ours = {os.getpid(), *_spawned}
    leaked = [n for n in list_segments() if int(n.split("-")[1]) in ours]
    assert not leaked, f"leaked shm segments: {leaked}"
