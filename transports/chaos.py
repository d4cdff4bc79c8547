"""Chaos: degrade any backend on the sending side, to test failure paths and to reproduce other hardware.

    Sender(region, layout, chaos="delay=5ms,throttle=200MBps,drop=0.01,corrupt=0.01,stall=after:3,seed=7")

Grammar: comma-separated `key=value` items, each optional, keys unique:
    delay=<duration>    sleep before writing each layer;            duration: <number>[us|ms|s] (default s)
    throttle=<rate>     cap this sender's bandwidth, shared by all its transfers (a token bucket);
                        rate: <number><K|M|G>Bps (bytes/s) or <K|M|G>bps (bits/s), decimal prefixes
    drop=<p>            each run (consecutive blocks of one layer, K or V) is silently not written, probability p
    corrupt=<p>         each run is written with one byte flipped, probability p (the checksum is of the true bytes)
    stall=after:<n>     the first n layer writes go through; every later one hangs until the deadline or abort
    seed=<int>          seed of the random choices (default 0), for reproducible runs

Throttle is how a CPU-only machine reproduces a GPU cluster's ratio of KV bandwidth to compute: pick the rate
that gives the same transfer time per layer relative to the (slower) CPU forward pass.
"""

from __future__ import annotations

import asyncio
import random
import re
import time
from dataclasses import dataclass, field, replace
from typing import Awaitable, Callable

import numpy as np

from kvmesh.transports.blocks import Run

_DURATION = re.compile(r"^([0-9.]+)(us|ms|s)?$")
_RATE = re.compile(r"^([0-9.]+)([KMG]?)(B|b)ps$")
_SCALE = {"": 1, "K": 1e3, "M": 1e6, "G": 1e9}


def parse_duration(text: str) -> float:
    """'5ms' -> 0.005 seconds."""
    m = _DURATION.match(text.strip())
    if not m:
        raise ValueError(f"bad duration {text!r}; e.g. 200us, 5ms, 1.5s")
    return float(m.group(1)) * {"us": 1e-6, "ms": 1e-3, "s": 1.0, None: 1.0}[m.group(2)]


def parse_rate(text: str) -> float:
    """'200MBps' -> 2e8 bytes/s; '10Gbps' -> 1.25e9 bytes/s."""
    m = _RATE.match(text.strip())
    if not m:
        raise ValueError(f"bad rate {text!r}; e.g. 200MBps, 1.5GBps, 10Gbps")
    return float(m.group(1)) * _SCALE[m.group(2)] / (8 if m.group(3) == "b" else 1)


def _probability(text: str) -> float:
    p = float(text)
    if not 0 <= p <= 1:
        raise ValueError(f"probability must be in [0, 1], got {text}")
    return p


@dataclass
class Chaos:
    """Parsed chaos settings plus the state shared by a sender's transfers (bandwidth bucket, RNG, counters)."""

    delay_s: float = 0.0
    rate: float = 0.0  # bytes/s; 0 = unthrottled
    drop: float = 0.0
    corrupt: float = 0.0
    stall_after: int = -1  # -1 = never
    seed: int = 0
    writes: int = 0
    _rng: random.Random = field(default_factory=random.Random, repr=False)
    _next_free: float = 0.0

    @classmethod
    def parse(cls, spec: str) -> "Chaos":
        """Parse a spec string (grammar in the module docstring); ValueError on anything unknown."""
        chaos, seen = cls(), set()
        for item in filter(None, (s.strip() for s in spec.split(","))):
            key, sep, value = item.partition("=")
            if not sep or key in seen:
                raise ValueError(f"bad chaos item {item!r} in {spec!r}")
            seen.add(key)
            if key == "delay":
                chaos = replace(chaos, delay_s=parse_duration(value))
            elif key == "throttle":
                chaos = replace(chaos, rate=parse_rate(value))
            elif key in ("drop", "corrupt"):
                chaos = replace(chaos, **{key: _probability(value)})
            elif key == "stall" and value.startswith("after:") and value[6:].isdigit():
                chaos = replace(chaos, stall_after=int(value[6:]))
            elif key == "seed":
                chaos = replace(chaos, seed=int(value))
            else:
                raise ValueError(f"unknown chaos item {item!r}; keys: delay, throttle, drop, corrupt, stall, seed")
        chaos._rng.seed(chaos.seed)
        return chaos

    def wrap(self, write: Callable[[list[Run]], Awaitable[None]]) -> Callable[[list[Run]], Awaitable[None]]:
        """A writer that applies these settings, then calls `write` (a Transfer's `_write_runs`)."""

        async def chaotic(runs: list[Run]) -> None:
            self.writes += 1
            if 0 <= self.stall_after < self.writes:
                await asyncio.Event().wait()  # hangs until the transfer's deadline cancels it
            if self.delay_s:
                await asyncio.sleep(self.delay_s)
            if self.rate:
                await self._throttle(sum(r.nbytes for r in runs))
            await write([self._mangle(r) for r in runs if not self._hit(self.drop)])

        return chaotic

    def _hit(self, p: float) -> bool:
        return p > 0 and self._rng.random() < p

    def _mangle(self, run: Run) -> Run:
        if not self._hit(self.corrupt):
            return run
        bad = run.src.copy()
        flat = bad.reshape(-1)
        flat[self._rng.randrange(flat.size)] ^= np.uint8(1 << self._rng.randrange(8))
        return replace(run, src=bad)

    async def _throttle(self, nbytes: int) -> None:
        now = time.monotonic()
        start = max(now, self._next_free)
        self._next_free = start + nbytes / self.rate
        await asyncio.sleep(self._next_free - now)
