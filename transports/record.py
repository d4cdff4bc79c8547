"""One transfer, receiver side: the record a `Receiver` keeps from `expect` until the transfer is verified, fails
or expires (states: expected -> writing -> verifying -> ready, or failed)."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import numpy as np

import kvmesh.transports.errors as errors
from kvmesh.transports.base import HASH_OFFLOAD_BYTES
from kvmesh.transports.blocks import dst_checksums, dst_runs


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
    opened_ns: int = 0  # epoch ns of the Open (the start of the receiver's span)
    nbytes: int = 0  # bytes received through Push
    layer_hashers: dict = field(default_factory=dict)  # running per-layer checksums of Push data
    early: dict = field(default_factory=dict)  # layer -> future of its checksum, started on LayerWritten
    want: int = 0  # bytes the transfer must bring: every layer, K and V, of the reserved blocks
    committing: bool = False  # a Commit arrived (it may wait for Push data still in flight)
    push_streams: int = -1  # Push calls carrying the data, as the Commit says (-1: no Commit yet)
    streams_done: int = 0  # Push calls that ended after carrying some of the data
    landed: asyncio.Event = field(default_factory=asyncio.Event)  # Push data complete, or the record failed
    staged: bool = False  # the sender stages the bytes and never writes into the blocks (staging.py)
    lease_s: float = 0.0  # the record fails when nothing of it arrived for this long
    renewed: float = 0.0  # loop time of the last progress (expect, Open, data, a written layer, Commit)
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

    def check_reopen(self, request, layout) -> None:
        """An Open for a transfer already being written must agree with the one that opened it."""
        if request.backend != self.backend or request.staged != self.staged or request.layout != layout \
                or not np.array_equal(np.asarray(request.dst_block_ids, dtype=np.int64), self.dst_ids):
            raise errors.InvalidTransfer(f"transfer {self.transfer_id}: its Open disagrees with the one that opened it")

    def verify_early(self, pool: np.ndarray, layer: int) -> bool:
        """Start checksumming one layer of a one-sided transfer in a thread (its sender says it is in place), so
        Commit has less left to check. False when the layer is out of range or already started."""
        if not 0 <= layer < self.num_layers or layer in self.early:
            return False
        args = (pool, self.dst_ids, self.num_layers, [layer], self.runs)
        self.early[layer] = asyncio.ensure_future(asyncio.to_thread(dst_checksums, *args))
        self.early[layer].add_done_callback(retrieve)
        return True

    async def landed_checksums(self, pool: np.ndarray, one_sided: bool) -> list[int]:
        """Each layer's checksum of what landed: for data that came through Push, the running checksums kept
        while landing it; for one-sided writes, re-read from the pool (in a thread when large)."""
        if not one_sided:
            return [self.layer_hashers[i].intdigest() if i in self.layer_hashers else -1
                    for i in range(self.num_layers)]
        rest = [i for i in range(self.num_layers) if i not in self.early]
        args = (pool, self.dst_ids, self.num_layers, rest, self.runs)
        late_bytes = self.want // self.num_layers * len(rest)
        late = await asyncio.to_thread(dst_checksums, *args) if late_bytes >= HASH_OFFLOAD_BYTES \
            else dst_checksums(*args)
        got = dict(zip(rest, late))
        for layer, future in self.early.items():
            got[layer] = (await future)[0]
        return [got[i] for i in range(self.num_layers)]


def retrieve(future: asyncio.Future) -> None:
    """Done-callback: mark a future's error retrieved (a failed transfer nobody waits for is not "unhandled")."""
    if not future.cancelled():
        future.exception()
