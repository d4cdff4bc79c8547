"""A prefill worker renews the handoff (here, and through the transfer's keep-alive on the decode worker) of every
request its running engine still owes layers to — queued, computing, or part-way through handing its layers
over, since one step yields them all and a loaded machine can stretch that step past a lease — and leaves one
whose layers are all handed over to its bytes' progress; a dead engine thread renews nothing."""

import asyncio
from types import SimpleNamespace

from kvmesh.services.prefill.worker import PrefillWorker


class Handoffs:
    lease_s = 0.06

    def __init__(self):
        self.renewed = []

    def renew(self, rid):
        self.renewed.append(rid)


class Transfer:
    def __init__(self):
        self.kept = 0

    def keep_alive(self):
        self.kept += 1


def worker(alive=True):
    w = PrefillWorker.__new__(PrefillWorker)
    w.handoffs = Handoffs()
    w.et = SimpleNamespace(alive=alive)
    w.engine = SimpleNamespace(layout=SimpleNamespace(num_layers=4))
    w.streams = {rid: SimpleNamespace(num_layers_pushed=pushed, transfer=Transfer())
                 for rid, pushed in (("queued", 0), ("halfway", 2), ("handed-over", 4))}
    return w


async def run_a_while(w):
    task = asyncio.ensure_future(w.keep_queued_alive())
    await asyncio.sleep(0.2)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


def test_requests_the_engine_still_owes_layers_are_renewed_on_both_workers():
    w = worker()
    asyncio.run(run_a_while(w))
    assert set(w.handoffs.renewed) == {"queued", "halfway"}
    assert w.streams["queued"].transfer.kept and w.streams["halfway"].transfer.kept
    assert not w.streams["handed-over"].transfer.kept


def test_a_dead_engine_thread_renews_nothing():
    w = worker(alive=False)
    asyncio.run(run_a_while(w))
    assert w.handoffs.renewed == []
