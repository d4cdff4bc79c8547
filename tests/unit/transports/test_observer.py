"""Transports report, never publish: each transfer hands its TransferStats (figures and timeline) to the observer
its Sender or Receiver was given, in the context of the call that opened (sender) or waited for it (receiver)."""

import asyncio
import contextvars

import numpy as np

from kvmesh.transports import allocate_region, make_layout
from kvmesh.transports.receiver import Receiver
from kvmesh.transports.sender import Sender

LAYOUT = make_layout(2, 4, 2, 8, "float32")  # 256-byte blocks
REQUEST = contextvars.ContextVar("request", default="")


def test_committed_and_aborted_transfers_reach_the_observer_in_the_openers_context():
    seen = []

    def observer(stats):
        seen.append((REQUEST.get(), stats))

    async def main():
        receiver = Receiver(allocate_region(2, 16, 256, ["shm"]), LAYOUT, backends=["shm"], observer=observer)
        source = allocate_region(2, 16, 256)
        source.array[:] = np.random.default_rng(0).integers(0, 256, source.array.shape, np.uint8)
        sender = Sender(source, LAYOUT, backends=["shm"], observer=observer)
        try:
            receiver.expect("ok", [1, 2])
            REQUEST.set("req-ok")
            transfer = await sender.open(receiver.descriptor(), "ok", [1, 2])
            REQUEST.set("elsewhere")  # the span belongs to the request that opened the transfer
            for layer in range(2):
                await transfer.send_layer(layer, [3, 4])
            await transfer.commit()
            REQUEST.set("req-wait")
            await receiver.wait("ok", 5)
            receiver.expect("gone", [5])
            REQUEST.set("req-gone")
            doomed = await sender.open(receiver.descriptor(), "gone", [5])
            await doomed.send_layer(0, [6])
            await doomed.abort("changed my mind")
        finally:
            await sender.close()
            receiver.close()

    asyncio.run(main())
    (ctx_sent, sent), (ctx_recv, recv), (ctx_gone, gone) = seen
    assert (ctx_sent, sent.direction, sent.transfer_id, sent.error) == ("req-ok", "send", "ok", "")
    assert sent.bytes == 2 * 2 * 2 * 256 and [layer for layer, _, _ in sent.layer_times] == [0, 1]
    assert sent.start_ns <= sent.layer_times[0][2] <= sent.layer_times[-1][2] <= sent.end_ns
    assert (ctx_recv, recv.direction, recv.bytes, recv.backend) == ("req-wait", "recv", sent.bytes, "shm")
    assert 0 < recv.start_ns <= recv.end_ns
    assert (ctx_gone, gone.direction, gone.error) == ("req-gone", "send", "changed my mind")


def test_without_an_observer_nothing_is_reported_and_nothing_breaks():
    async def main():
        receiver = Receiver(allocate_region(2, 8, 256, ["shm"]), LAYOUT, backends=["shm"])
        sender = Sender(allocate_region(2, 8, 256), LAYOUT, backends=["shm"])
        try:
            receiver.expect("t", [0])
            transfer = await sender.open(receiver.descriptor(), "t", [0])
            for layer in range(2):
                await transfer.send_layer(layer, [1])
            stats = await transfer.commit()
            assert (await receiver.wait("t", 5)).bytes == stats.bytes
        finally:
            await sender.close()
            receiver.close()

    asyncio.run(main())
