"""A flexible worker's flip: it drains the old role's in-flight work before it leaves and registers again in the
new role, and reports arrivals only while it decodes."""

import asyncio

from kvmesh.services.common import metrics
from kvmesh.services.flexible.flip import DECODE, PREFILL, RoleFlipper


class Table:
    def __init__(self):
        self.records = set()
        self.ended = []

    async def end_all(self, reason):
        self.ended.append((sorted(self.records), reason))
        count = len(self.records)
        self.records.clear()
        return count

    def __len__(self):
        return len(self.records)


class Side:
    def __init__(self):
        self.handoffs = Table()
        self.sender = type("Sender", (), {"num_open_transfers": 0})()


class Registration:
    """Records what the flipper does to a RegistrationClient, in order."""

    def __init__(self, log, flipper):
        self.log, self.flipper = log, flipper
        self.registered = asyncio.Event()
        self.registered.set()
        self.reports_arrivals = None
        self.on_desired_role = None

    async def withdraw(self):
        self.log.append(("withdraw", self.flipper.current()))
        self.registered.clear()

    def restore(self):
        self.log.append(("register", self.flipper.current()))
        self.registered.set()


def flips(source, target):
    return metrics.ROLE_FLIPS.labels(source, target)._value.get()


def test_a_flip_drains_the_old_role_before_registering_in_the_new_one():
    async def main():
        prefill, decode, log = Side(), Side(), []
        flipper = RoleFlipper(DECODE, prefill, decode, drain_poll_s=0.01)
        clients = [Registration(log, flipper), Registration(log, flipper)]  # two schedulers
        flipper.attach(clients)
        assert [c.reports_arrivals for c in clients] == [True, True]
        decode.handoffs.records.add("r1")  # a stream still decoding here
        prefill.handoffs.records.add("p1")  # work of the new role does not hold the flip back
        before = flips("decode", "prefill")
        clients[0].on_desired_role(PREFILL)
        clients[1].on_desired_role(PREFILL)  # the second scheduler's answer starts no second flip
        for _ in range(20):
            await asyncio.sleep(0.01)
        assert log == [] and flipper.current() == DECODE  # draining: still registered as decode
        decode.handoffs.records.clear()
        await flipper._flip
        assert log == [("withdraw", DECODE), ("withdraw", DECODE), ("register", PREFILL), ("register", PREFILL)]
        assert flipper.current() == PREFILL and flipper.num_flips == 1
        assert [c.reports_arrivals for c in clients] == [False, False]
        assert flips("decode", "prefill") == before + 1
        clients[0].on_desired_role(PREFILL)  # its own role: nothing happens
        assert flipper._flip.done() and flipper.num_flips == 1

    asyncio.run(main())


def test_a_prefill_role_drains_its_open_transfers_too():
    async def main():
        prefill, decode, log = Side(), Side(), []
        flipper = RoleFlipper(PREFILL, prefill, decode, drain_poll_s=0.01)
        flipper.attach([Registration(log, flipper)])
        prefill.sender.num_open_transfers = 1  # the prefill's handoff ended, its transfer not yet committed
        flipper.want(DECODE)
        await asyncio.sleep(0.1)
        assert log == []
        prefill.sender.num_open_transfers = 0
        await flipper._flip
        assert log == [("withdraw", PREFILL), ("register", DECODE)]

    asyncio.run(main())


def test_closing_the_worker_cancels_a_flip_in_progress():
    async def main():
        prefill, decode, log = Side(), Side(), []
        flipper = RoleFlipper(DECODE, prefill, decode, drain_poll_s=0.01)
        flipper.attach([Registration(log, flipper)])
        decode.handoffs.records.add("r1")
        flipper.want(PREFILL)
        await asyncio.sleep(0.05)
        await flipper.close()
        assert flipper._flip.cancelled() and log == [] and flipper.current() == DECODE

    asyncio.run(main())


def test_streams_still_running_after_migrate_after_s_are_handed_on():
    async def main():
        prefill, decode, log = Side(), Side(), []
        flipper = RoleFlipper(DECODE, prefill, decode, drain_poll_s=0.01, migrate_after_s=0.05)
        flipper.attach([Registration(log, flipper)])
        decode.handoffs.records.update({"r1", "r2"})  # streams that would run far longer
        flipper.want(PREFILL)
        await flipper._flip
        assert decode.handoffs.ended == [(["r1", "r2"], "worker flipping to prefill")]
        assert log == [("withdraw", DECODE), ("register", PREFILL)]

    asyncio.run(main())
