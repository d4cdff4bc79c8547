"""The chaos spec grammar and what each knob does to the runs a transfer writes."""

import asyncio
import time

import numpy as np
import pytest

from kvmesh.transports.blocks import Run
from kvmesh.transports.chaos import Chaos, parse_duration, parse_rate


def runs(n: int = 4, nbytes: int = 64) -> list[Run]:
    return [Run(0, i % 2, i, np.full((1, nbytes), i, np.uint8)) for i in range(n)]


def test_spec_grammar_parses_every_knob():
    chaos = Chaos.parse("delay=5ms,throttle=200MBps,drop=0.01,corrupt=0.02,stall=after:3,seed=7")
    assert (chaos.delay_s, chaos.rate, chaos.drop, chaos.corrupt, chaos.stall_after, chaos.seed) == \
        (0.005, 2e8, 0.01, 0.02, 3, 7)
    assert parse_duration("200us") == pytest.approx(2e-4) and parse_duration("2") == 2.0
    assert parse_rate("10Gbps") == 1.25e9 and parse_rate("1.5GBps") == 1.5e9 and parse_rate("500KBps") == 5e5


@pytest.mark.parametrize("spec", ["delay=fast", "drop=2", "stall=3", "bogus=1", "drop=0.1,drop=0.2", "corrupt"])
def test_bad_specs_are_rejected(spec):
    with pytest.raises(ValueError):
        Chaos.parse(spec)


def test_drop_one_writes_nothing_and_corrupt_one_flips_one_bit_per_run():
    written = []

    async def write(rs):
        written.append(rs)

    original = runs()
    asyncio.run(Chaos.parse("drop=1").wrap(write)(original))
    asyncio.run(Chaos.parse("corrupt=1").wrap(write)(original))
    assert written[0] == []
    for before, after in zip(original, written[1]):
        diff = np.unpackbits(before.src ^ after.src).sum()
        assert diff == 1 and before.src.max() == before.src.min()  # the source itself is untouched


def test_throttle_is_shared_by_all_writes_of_a_sender():
    chaos = Chaos.parse("throttle=1MBps")

    async def write(rs):
        pass

    async def main():
        started = time.monotonic()
        await asyncio.gather(*(chaos.wrap(write)(runs(2, 25_000)) for _ in range(2)))  # 100 kB in all
        return time.monotonic() - started

    assert 0.09 <= asyncio.run(main()) < 0.3


def test_stall_hangs_after_n_writes():
    chaos = Chaos.parse("stall=after:1")

    async def write(rs):
        pass

    async def main():
        writer = chaos.wrap(write)
        await writer(runs())
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(writer(runs()), 0.2)

    asyncio.run(main())
