"""A receiver that dies is not kept mapped: a sender's next open closes its idle link to the dead worker's pool and
reclaims the segment at once (without a supervisor, as under systemd), while links to live receivers stay."""

import asyncio
import os
import signal
import subprocess
import sys

from kvmesh.transports import allocate_region, make_layout
from kvmesh.transports.receiver import Receiver
from kvmesh.transports.sender import Sender
from kvmesh.transports.shm import list_segments
from kvmesh.v1 import common_pb2

LAYOUT = make_layout(2, 4, 2, 8, "float32")  # 256-byte blocks
CHILD = """
import asyncio, sys
from kvmesh.transports import allocate_region, make_layout
from kvmesh.transports.receiver import Receiver

async def main():
    receiver = Receiver(allocate_region(2, 16, 256, ["shm"]), make_layout(2, 4, 2, 8, "float32"), backends=["shm"])
    receiver.expect("t1", [0, 1], lease_s=60)
    print(receiver.descriptor().SerializeToString().hex(), flush=True)
    await receiver.wait("t1", 60)
    print("landed", flush=True)
    await asyncio.sleep(3600)

asyncio.run(main())
"""


async def _send(sender, descriptor, transfer_id, blocks):
    transfer = await sender.open(descriptor, transfer_id, blocks, timeout=30)
    for layer in range(LAYOUT.num_layers):
        await transfer.send_layer(layer, blocks)
    await transfer.commit()


def test_the_next_open_closes_the_link_to_a_dead_receiver_and_reclaims_its_pool():
    child = subprocess.Popen([sys.executable, "-c", CHILD], stdout=subprocess.PIPE, text=True)

    async def main():
        source = allocate_region(2, 16, 256, ["shm"])
        sender = Sender(source, LAYOUT, backends=["shm"])
        local = Receiver(allocate_region(2, 16, 256, ["shm"]), LAYOUT, backends=["shm"])
        try:
            remote = common_pb2.TransportDescriptor.FromString(bytes.fromhex(child.stdout.readline().strip()))
            dead_segment = remote.backend_params["shm"].decode()
            await _send(sender, remote, "t1", [0, 1])
            assert child.stdout.readline().strip() == "landed"
            assert sender.num_links == 1 and dead_segment in list_segments()
            os.kill(child.pid, signal.SIGKILL)
            child.wait(10)
            local.expect("t2", [3], lease_s=30)
            await _send(sender, local.descriptor(), "t2", [3])
            await local.wait("t2", 10)
            return sender.num_links, dead_segment in list_segments()
        finally:
            await sender.close()
            local.close()
            source.close()

    try:
        links, still_there = asyncio.run(main())
    finally:
        child.kill()
    assert links == 1  # the live receiver's link only
    assert not still_there
