"""Fixtures of the transport conformance suite: backends from the registry, peer processes, test data."""

from __future__ import annotations

import os

import numpy as np
import pytest

from harness import NUM_BLOCKS, PeerProcess, layout_for, pool_region, spawned
from kvmesh.transports import BACKENDS, LOCAL_POOL
from kvmesh.transports import backend_class
from kvmesh.transports.shm import list_segments


def backend_params():
    """Every backend with its pools in the memory it allocates (shm: a shared segment), and each backend that
    serves process memory again with both pools in the engine's own torch memory (`--kv-pool local`)."""
    for name in sorted(BACKENDS):
        reason = backend_class(name).unavailable_reason()
        marks = pytest.mark.skip(reason=reason) if reason else ()
        yield pytest.param((name, ""), id=name, marks=marks)
        if not backend_class(name).needs_own_pool:
            yield pytest.param((name, LOCAL_POOL), id=f"{name}-{LOCAL_POOL}pool", marks=marks)


@pytest.fixture(params=list(backend_params()))
def transport_case(request) -> tuple[str, str]:
    return request.param


@pytest.fixture
def backend(transport_case) -> str:
    return transport_case[0]


@pytest.fixture
def kv_pool(request) -> str:
    """The case's pool: "local" (the peers' and the sender's pools in the engine's own torch memory) or "" (as the
    backend allocates them; also for a test that names its backend itself rather than taking `backend`)."""
    callspec = getattr(request.node, "callspec", None)
    return callspec.params["transport_case"][1] if callspec and "transport_case" in callspec.params else ""


@pytest.fixture(scope="module")
def running_peers():
    running: dict[tuple, PeerProcess] = {}
    yield running
    for peer in running.values():
        peer.stop()


@pytest.fixture
def peers(running_peers, kv_pool):
    """peers(backend, dtype) -> a running receiver peer (with the case's pool), shared within the module."""
    def get(backend: str, dtype: str = "float32") -> PeerProcess:
        if (backend, dtype, kv_pool) not in running_peers:
            running_peers[backend, dtype, kv_pool] = PeerProcess(backend, dtype, pool=kv_pool)
        return running_peers[backend, dtype, kv_pool]

    return get


@pytest.fixture
def new_peer(kv_pool):
    """A private peer process (for tests that kill it), stopped after the test."""
    made = []

    def make(backend: str, dtype: str = "float32") -> PeerProcess:
        made.append(PeerProcess(backend, dtype, pool=kv_pool))
        return made[-1]

    yield make
    for peer in made:
        peer.stop()


@pytest.fixture
def sender_region(kv_pool):
    """Factory: a sender pool for `dtype` (with the case's pool), filled with random values of that dtype."""
    made = []

    def make(dtype: str = "float32", seed: int = 0):
        region = pool_region(layout_for(dtype), NUM_BLOCKS, "grpc", kv_pool)
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
