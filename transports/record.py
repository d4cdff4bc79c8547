"""One transfer, receiver side: the record a `Receiver` keeps from `expect` until the transfer is verified, fails
or expires (states: expected -> writing -> verifying -> ready, or failed)."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import numpy as np

from kvmesh.transports.blocks import dst_runs


@dataclass(eq=False)
class Record:
    """One transfer as its receiver sees it: the reserved blocks, the state, what has landed so far."""

    transfer_id: str
    dst_ids: np.ndarray
    mask: np.ndarray  # True on reserved blocks: chunk bounds checks
    num_layers: int
    future: asyncio.Future
    timer: asyncio.TimerHandle | None = None
    state: str = "expected"
    backend: str = ""
    opened: float = field(default_factory=time.perf_counter)
    nbytes: int = 0  # bytes received through Push
    layer_hashers: dict = field(default_factory=dict)  # running per-layer checksums of Push data
    early: dict = field(default_factory=dict)  # layer -> future of its checksum, started on LayerWritten
    want: int = 0  # bytes the transfer must bring: every layer, K and V, of the reserved blocks
    committing: bool = False  # a Commit arrived (it may wait for Push data still in flight)
    push_streams: int = -1  # Push calls carrying the data, as the Commit says (-1: no Commit yet)
    streams_done: int = 0  # Push calls that ended after carrying some of the data
    landed: asyncio.Event = field(default_factory=asyncio.Event)  # Push data complete, or the record failed
    staged: bool = False  # the sender stages the bytes and never writes into the blocks (staging.py)
    _runs: list | None = None

    @property
    def runs(self) -> list[tuple[int, int]]:
        """The reserved blocks as (start, count) runs, for hashing what landed (computed once)."""
        if self._runs is None:
            self._runs = dst_runs(self.dst_ids)
        return self._runs

    def check_landed(self) -> None:
        """Wake a waiting Commit once every byte arrived or every Push call it waits for has ended."""
        if self.nbytes >= self.want or 0 <= self.push_streams <= self.streams_done:
            self.landed.set()
