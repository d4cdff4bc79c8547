"""Readiness that means something: before a decode worker says SERVING (and so before it registers), one block of
real KV moves from its pool into its pool through every transport it offers — the gRPC stream through its own
port, the shared-memory segment mapped as a peer maps it, the UCX agent up — and lands byte for byte. A worker
whose transport cannot move KV refuses to start, naming the backend, instead of failing its first requests.
"""

from __future__ import annotations

import logging
import time

import numpy as np

from kvmesh.services.common import tls
from kvmesh.services.common.server import NotReadyError
from kvmesh.transports.sender import Sender

log = logging.getLogger(__name__)

SELF_TEST_TIMEOUT_S = 30.0


class TransportNotReady(NotReadyError):
    """A backend failed the self-transfer: the worker must not serve."""


async def self_transfer(region, layout, receiver, descriptor, backends: list[str],
                        timeout_s: float = SELF_TEST_TIMEOUT_S, blocks: tuple[int, int] | None = None
                        ) -> dict[str, float]:
    """Move one block into another over each backend, and check the bytes; seconds per backend. The blocks: the
    pool's last two at start (the pool is still empty), else two the caller reserved; both are zeroed after."""
    src, dst = blocks or (region.num_blocks - 1, region.num_blocks - 2)
    array = region.array  # [layers, 2, blocks, block_bytes]
    rng = np.random.default_rng(region.num_blocks)
    seconds = {}
    try:
        for backend in backends:
            array[:, :, src] = rng.integers(0, 256, array[:, :, src].shape, dtype=np.uint8)
            array[:, :, dst] = 0
            started = time.perf_counter()
            await _one(region, layout, receiver, descriptor, backend, src, dst, timeout_s)
            if not np.array_equal(array[:, :, dst], array[:, :, src]):
                raise TransportNotReady(f"the {backend} self-transfer landed different bytes")
            seconds[backend] = time.perf_counter() - started
    finally:
        array[:, :, [src, dst]] = 0
    log.log(logging.DEBUG if blocks else logging.INFO, "transports ready: %s", ", ".join(f"{b} ({s * 1e3:.0f} ms)" for b, s in seconds.items()))
    return seconds


async def _one(region, layout, receiver, descriptor, backend: str, src: int, dst: int, timeout_s: float) -> None:
    transfer_id = f"readiness-{backend}-{time.monotonic_ns()}"
    sender = Sender(region, layout, backends=[backend], force=backend, tls=tls.current())  # as a peer would dial
    receiver.expect(transfer_id, [dst], lease_s=timeout_s)
    try:
        transfer = await sender.open(descriptor, transfer_id, [dst], timeout=timeout_s)
        for layer in range(layout.num_layers):
            await transfer.send_layer(layer, [src])
        await transfer.commit()
        await receiver.wait(transfer_id, timeout=timeout_s)
    except Exception as e:  # noqa: BLE001 — any failure means this backend cannot serve
        raise TransportNotReady(f"the {backend} transport failed its self-transfer: {type(e).__name__}: {e}") from e
    finally:
        await receiver.retire(transfer_id)
        await sender.close()
