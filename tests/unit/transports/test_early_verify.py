"""One-sided backends: the receiver verifies big layers as soon as it learns they are written (shm: the sender's
LayerWritten; ucx: the NIXL notification that comes with the layer's write), and a damaged layer verified early
still fails the transfer with DATA_LOSS at Commit."""

import asyncio

import grpc
import numpy as np
import pytest

from kvmesh.transports import DataLossError, allocate_region, available_backends, make_layout
from kvmesh.transports.receiver import Receiver
from kvmesh.transports.sender import Sender

LAYOUT = make_layout(3, 4, 2, 8, "float32")  # 256-byte blocks
NUM_BLOCKS = 9000  # 2 x 9000 x 256 B = 4.6 MB per layer: above EARLY_VERIFY_BYTES


BACKENDS = [pytest.param(b, marks=pytest.mark.skipif(b not in available_backends(), reason=f"{b} not installed"))
            for b in ("shm", "ucx")]


def _run(chaos: str | None, backend: str = "shm"):
    # ucx: a layer whose runs are all dropped posts no write, so no notification comes
    hint_expected = not (backend == "ucx" and chaos == "drop=1")

    async def main():
        dst, src = allocate_region(3, NUM_BLOCKS, 256, backend), allocate_region(3, NUM_BLOCKS, 256)
        src.array[:] = np.random.default_rng(3).integers(0, 256, src.array.shape, np.uint8)
        server = grpc.aio.server()
        port = server.add_insecure_port("127.0.0.1:0")
        receiver = Receiver(dst, LAYOUT, address=f"127.0.0.1:{port}", backends=[backend])
        hinted = []
        real = receiver.on_layer_written
        receiver.on_layer_written = lambda tid, layer: hinted.append(layer) or real(tid, layer)
        receiver.mount(server)
        await server.start()
        sender = Sender(src, LAYOUT, backends=[backend], chaos=chaos)
        ids = list(range(NUM_BLOCKS))
        try:
            receiver.expect("t", ids)
            transfer = await sender.open(receiver.descriptor(), "t", ids, timeout=10)
            for layer in range(3):
                await transfer.send_layer(layer, ids)
                await asyncio.sleep(0.02)  # as the next layer's compute would: ucx posts and returns at once
            if hint_expected:  # a loaded machine may delay a NIXL notification past 40 ms: wait for the first one,
                deadline = asyncio.get_running_loop().time() + 10  # so Commit meets an early-verified layer
                while 0 not in hinted:
                    assert asyncio.get_running_loop().time() < deadline, "no layer-written hint within 10 s"
                    await asyncio.sleep(0.005)
            outcome = None
            try:
                await transfer.commit()
                await receiver.wait("t", 5)
            except DataLossError as e:
                outcome = e
            return hinted, outcome, np.array_equal(dst.array, src.array)
        finally:
            await sender.close()
            await server.stop(0)
            receiver.close()
            src.close()

    return asyncio.run(main())


def _early(hinted: list[int], backend: str) -> bool:
    """shm hints arrive before Commit; a NIXL notification is picked up by the receiver's ~1 ms polling: _run waits
    for layer 0's, but the second-to-last layer's may lose the race with Commit (which then verifies it itself)."""
    return sorted(hinted) == [0, 1] if backend == "shm" else 0 in hinted and set(hinted) <= {0, 1}


@pytest.mark.parametrize("backend", BACKENDS)
def test_big_layers_but_the_last_are_verified_early_and_land_intact(backend):
    hinted, outcome, equal = _run(None, backend)
    assert _early(hinted, backend) and outcome is None and equal


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("spec", ["corrupt=1", "drop=1"])
def test_damage_in_an_early_verified_layer_is_data_loss(spec, backend):
    hinted, outcome, _ = _run(spec, backend)
    if not (backend == "ucx" and spec == "drop=1"):  # ucx: a layer whose runs are all dropped posts no write
        assert _early(hinted, backend)
    assert isinstance(outcome, DataLossError) and "layers [0, 1, 2]" in str(outcome)
