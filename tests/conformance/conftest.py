"""Fixtures of the transport conformance suite: backends from the registry, peer processes, test data."""

from __future__ import annotations

import os

import numpy as np
import pytest

from harness import NUM_BLOCKS, PeerProcess, layout_for, spawned
from kvmesh.transports import BACKENDS, allocate_region, block_nbytes
from kvmesh.transports import backend_class
from kvmesh.transports.shm import list_segments


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
    ours = {os.getpid(), *spawned}
    leaked = [n for n in list_segments() if int(n.split("-")[1]) in ours]
    assert not leaked, f"leaked shm segments: {leaked}"
