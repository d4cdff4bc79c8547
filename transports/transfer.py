"""One transfer, sender side: the public calls a sending worker makes (`send_layer`, `commit`, `abort`) and the
private hooks each backend fills in (`_begin`, `_write`, `_write_inline`, `_flush`, `_settle`, `_cancel`,
`_commit_fields`: each hook's docstring says when it is called). Made by `Sender.open` through the link's
`Backend.new_transfer`; see `base.py` for the contract around it."""

from __future__ import annotations

import asyncio
import contextvars
import time
from abc import ABC, abstractmethod
from typing import Callable, ClassVar, Sequence

import numpy as np
import xxhash

import kvmesh.transports.errors as errors
from kvmesh.transports.aio import first_failure, notify, retrieved, typed, within
from kvmesh.transports.base import (EARLY_VERIFY_BYTES, OFFLOAD_BYTES, PROGRESS_HINT_S, PROGRESS_LAYER, Backend,
                                    TransferStats)
from kvmesh.transports.blocks import Run, as_block_ids, paired_runs, src_checksum


class Transfer(ABC):
    """One transfer from the sender's pool into a receiver's reserved blocks; made by `Sender.open`.

    Call `send_layer` once per layer (in any order, as soon as that layer's KV exists), then `commit`; or
    `abort`. Any error aborts the transfer, releases its resources and raises a `TransportError`. Use as
    `async with await sender.open(...) as t:` to abort automatically when the body raises.
    """

    #: The backend's data or its Commit carries the Open (grpc, staged shm), so `Sender.open` skips the round trip
    #: and sets `open_request` instead.
    carries_open: ClassVar[bool] = False
    #: The transfer is staged: its bytes wait in the sender's own memory, which the Commit names (eager protocol).
    stages_bytes: ClassVar[bool] = False
    #: Layers under this many bytes are written by `_write_inline`, synchronously on the loop (0: never).
    inline_bytes: ClassVar[int] = 0
    #: `_write` feeds the hasher it is given the layer's source bytes, in order (a checksum fused into its copy).
    fuses_checksum: ClassVar[bool] = False

    def __init__(self, link: Backend, transfer_id: str, dst_ids: np.ndarray, deadline: float) -> None:
        self.link, self.transfer_id, self.dst_ids, self.deadline = link, transfer_id, dst_ids, deadline
        self.sender = link.sender
        self.pool = link.sender.region.array
        self.layer_checksums: dict[int, int] = {}
        self.nbytes, self.busy_seconds = 0, 0.0  # busy: inside send_layer and commit, not the sender's compute
        self.checksum_seconds = 0.0
        self.state = "open"  # open -> committed | failed
        #: The OpenRequest the data and Commit carry (set by `Sender.open` when `carries_open`).
        self.open_request = None
        self.started = time.perf_counter()
        self._start_ns = time.time_ns()
        self._context = contextvars.copy_context()  # the opener's: the observer reports there (its trace)
        chaos = link.sender.chaos
        self._writer: Callable[[list[Run]], object] = chaos.wrap(self._write) if chaos is not None else self._write
        self._lock = asyncio.Lock()
        self._sending: set[int] = set()
        self._hints: list[asyncio.Future] = []  # LayerWritten calls in flight
        self._hinted = time.monotonic()  # when the receiver last heard of this transfer (a LayerWritten)
        self._layer_times: list[tuple[int, int, int]] = []
        self._open_answer: asyncio.Future | None = None
        self._src_key: object = None  # the last src_block_ids seen, and its (src, dst) runs: layers share them
        self._pairs: list[tuple[int, int, int]] = []

    # ---- public: called by the sending worker, on its event loop ----

    async def send_layer(self, layer: int, src_block_ids: Sequence[int] | np.ndarray) -> None:
        """Write one layer (K and V) of `src_block_ids` (sender's pool) into the transfer's dst blocks.

        Called by the sender (e.g. the prefill step loop, via the event loop) right after that layer is computed.
        Awaits until the bytes are handed to the backend (on the wire, or copied for one-sided backends); does
        not wait for the receiver. Must not be called again for the same layer, nor after commit/abort. Passing the
        same `src_block_ids` object for every layer lets the block arithmetic be done once; do not change that
        object's contents between layers (pass a new one instead).
        """
        await self._check_open_answer()
        if not 0 <= layer < self.pool.shape[0]:
            raise errors.InvalidTransfer(f"layer {layer} out of range [0, {self.pool.shape[0]})")
        if layer in self.layer_checksums or layer in self._sending:
            raise errors.InvalidTransfer(f"layer {layer} already sent")
        self._sending.add(layer)
        began, pairs = time.perf_counter(), self._runs_of(src_block_ids)
        nbytes = 2 * self.dst_ids.size * self.pool.shape[3]
        if nbytes < self.inline_bytes and self.sender.chaos is None \
                and not self._lock.locked():  # a small one-sided copy: done here, no await, nothing to interleave
            checksum = await self._send_inline(layer, pairs)
        else:
            runs = [Run(layer, kv, d, self.pool[layer, kv, s:s + n]) for kv in (0, 1) for s, d, n in pairs]
            async with self._lock:  # callers may overlap layers; backends write one layer at a time
                self._check_open()
                checksum = await self._guard(lambda: self._send(runs, nbytes), f"send_layer({layer})")
        self.layer_checksums[layer] = checksum
        self.nbytes, self.busy_seconds = self.nbytes + nbytes, self.busy_seconds + time.perf_counter() - began
        last = len(self.layer_checksums) == self.pool.shape[0]  # Commit follows: it verifies, and it renews
        early = (self.link.early_verify and self.open_request is None and self.sender.verify
                 and nbytes >= EARLY_VERIFY_BYTES and not last)
        if early or (not last and time.monotonic() - self._hinted >= PROGRESS_HINT_S):
            self._hint(layer if early else PROGRESS_LAYER)  # the receiver may not see these bytes yet: tell its lease
        # per-layer timestamps: show that layers leave while later ones compute
        self._layer_times.append((layer, nbytes, time.time_ns()))

    async def commit(self) -> TransferStats:
        """Finish: flush the backend, then ask the receiver to verify every layer. Returns this side's stats.

        Called once by the sender after the last `send_layer`. Awaits the receiver's verdict (within the
        transfer's deadline): DataLossError when the receiver found damaged or missing bytes.
        """
        await self._check_open_answer()
        began, missing = time.perf_counter(), sorted(set(range(self.pool.shape[0])) - set(self.layer_checksums))
        if missing:
            raise errors.InvalidTransfer(f"commit before layers {missing} were sent")
        async with self._lock:
            await self._guard(self._flush, "flush")
        if self._hints:  # they normally landed long ago; hints left behind would race the Commit
            await asyncio.gather(*self._hints)
        sums = [self.layer_checksums[i] for i in range(self.pool.shape[0])] if self.sender.verify else []
        commit = self.link.peer.commit(self.transfer_id, self.link.name, self.nbytes, sums, self.sender.verify,
                                       self.remaining(), **self._commit_fields())
        await self._guard(lambda: first_failure(commit, self._settle()), "commit")
        self.busy_seconds += time.perf_counter() - began
        stats = self._stats()
        self._finish("committed", stats)
        return stats

    def keep_alive(self) -> None:
        """Tell the receiver's lease this transfer still comes though no layer is ready (its request waits its turn in
        a live engine): at most one hint per PROGRESS_HINT_S; never raises. Silence lets the lease lapse."""
        if self.state == "open" and time.monotonic() - self._hinted >= PROGRESS_HINT_S:
            self._hint(PROGRESS_LAYER)

    async def opened(self) -> None:
        """Wait until the receiver accepted the Open (at once where `Sender.open` waited for it already); raise its
        refusal as `send_layer` would. Optional: a caller that does not ask learns of a refusal at its next call."""
        if self._open_answer is not None:
            await asyncio.wait({self._open_answer}, timeout=self.remaining())
        await self._check_open_answer()

    async def abort(self, reason: str = "aborted by sender") -> None:
        """Give up: release backend resources and tell the receiver (best effort). Idempotent; never raises."""
        if self.state != "open":
            return
        self._finish("failed", self._stats(error=reason))
        for hint in self._hints:
            hint.cancel()
        if self._open_answer is not None:
            self._open_answer.cancel()
        await self._cancel()
        await self.link.peer.abort(self.transfer_id, reason)

    async def __aenter__(self) -> "Transfer":
        return self

    async def __aexit__(self, exc_type, exc, tb) -> None:
        await self.abort(f"sender raised {exc_type.__name__}" if exc_type else "closed without commit")

    # ---- public: called by Sender.open ----

    def watch_open(self, answer: asyncio.Future) -> None:
        """Called by `Sender.open` with the pending answer to an Open it sent without waiting: a refusal fails the
        transfer's next call."""
        self._open_answer = answer
        answer.add_done_callback(retrieved)  # a refusal is seen by the next call

    async def start(self) -> None:
        """Called once by `Sender.open` after the Open: the backend's `_begin` under the deadline. The transfer's
        clock (its stats' seconds, its span) starts here, as the Open's round trip is the link's, not the bytes'."""
        self.started, self._start_ns = time.perf_counter(), time.time_ns()
        await self._guard(self._begin, "begin")

    def _hint(self, layer: int) -> None:
        self._hinted = time.monotonic()
        self._hints.append(asyncio.ensure_future(self.link.peer.layer_written(self.transfer_id, layer)))

    # ---- private hooks, filled in by each backend ----

    async def _begin(self) -> None:
        """Set up per-transfer state (e.g. open a stream). Called once, after the Open; may await; under the
        transfer's deadline. Must not write into the receiver's blocks."""

    @abstractmethod
    async def _write(self, runs: list[Run], hasher=None) -> None:
        """Move one layer's runs into the receiver's blocks `dst_start ...`, one layer at a time (called under the
        transfer's lock and deadline; may await). `hasher` (an xxh3_64, only if `fuses_checksum` and no chaos
        wraps the writes): feed it each run's source bytes in order. Must not keep `runs` after returning unless it
        copied their bytes (the caller's pool may change once `send_layer` returned)."""

    def _write_inline(self, layer: int, pairs: list[tuple[int, int, int]], hasher) -> None:
        """Write one layer under `inline_bytes` (K, then V, of the (src_start, dst_start, count) runs)
        synchronously on the loop, feeding `hasher` (None when the sender does not verify). Must not block."""
        raise NotImplementedError

    async def _flush(self) -> None:
        """Make sure every byte written so far is on its way to the receiver before Commit is sent (one-sided
        backends: in its memory; grpc: written to its Push calls, which the receiver waits for). Called once,
        under the lock and deadline."""

    async def _settle(self) -> None:
        """Awaited beside the Commit: collect what `_flush` left in flight (grpc: the Push replies); raise if it
        failed, which aborts the transfer."""

    async def _cancel(self) -> None:
        """Release per-transfer resources after a failure or abort (called once, by `abort`). Must not raise or
        wait for the peer; may wait for its own work in flight (a copy in a thread) to stop."""

    def _commit_fields(self) -> dict:
        """Extra CommitRequest fields (`open`, `staged`, `push_streams`), called once as the Commit is sent."""
        return {} if self.open_request is None else {"open": self.open_request}

    # ---- shared machinery ----

    def _runs_of(self, src_block_ids) -> list[tuple[int, int, int]]:
        """(src_start, dst_start, count) runs for these src blocks; callers pass the same ids for every layer, so
        the arithmetic is done once per transfer."""
        if src_block_ids is self._src_key:
            return self._pairs
        try:
            src = as_block_ids(src_block_ids, self.pool.shape[2], "src_block_ids")
        except ValueError as exc:
            raise errors.InvalidTransfer(str(exc)) from None
        if src.size != self.dst_ids.size:
            raise errors.InvalidTransfer(f"{src.size} src blocks for {self.dst_ids.size} dst blocks")
        self._src_key, self._pairs = src_block_ids, paired_runs(src, self.dst_ids)
        return self._pairs

    async def _send_inline(self, layer: int, pairs: list[tuple[int, int, int]]) -> int:
        try:
            self.remaining()
            hasher = xxhash.xxh3_64() if self.sender.verify else None
            self._write_inline(layer, pairs, hasher)
            return 0 if hasher is None else hasher.intdigest()
        except BaseException as exc:
            error = typed(exc, f"transfer {self.transfer_id}: send_layer({layer})")
            await self.abort(f"send_layer({layer}) failed: {error}")
            raise error from exc

    async def _send(self, runs: list[Run], nbytes: int) -> int:
        """Checksum the layer (in a thread, beside the write, when large) and write it; returns the checksum."""
        if not self.sender.verify:
            await self._writer(runs)
            return 0
        if self.fuses_checksum and self.sender.chaos is None:  # no chaos in between: one pass
            hasher = xxhash.xxh3_64()
            await self._write(runs, hasher)
            return hasher.intdigest()
        if nbytes < OFFLOAD_BYTES:
            checksum = self._timed_checksum(runs)
            await self._writer(runs)
            return checksum
        return (await asyncio.gather(asyncio.to_thread(self._timed_checksum, runs), self._writer(runs)))[0]

    def _timed_checksum(self, runs: list[Run]) -> int:
        t = time.perf_counter()
        value = src_checksum(runs)
        self.checksum_seconds += time.perf_counter() - t
        return value

    async def _check_open_answer(self) -> None:
        """Raise (after aborting) if the receiver refused the Open that `Sender.open` did not wait for."""
        self._check_open()
        answer = self._open_answer
        if answer is not None and answer.done() and not answer.cancelled() and answer.exception() is not None:
            error = typed(answer.exception(), f"transfer {self.transfer_id}: open")
            await self.abort(f"open failed: {error}")
            raise error

    def _check_open(self) -> None:
        if self.state != "open":
            raise errors.InvalidTransfer(f"transfer {self.transfer_id} is {self.state}")

    def remaining(self) -> float:
        """Seconds left before the transfer's deadline (backends bound their calls with it); TransferTimeout after."""
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise errors.TransferTimeout(f"transfer {self.transfer_id}: deadline passed")
        return left

    async def _guard(self, make: Callable[[], object], what: str):
        """Await `make()` under the transfer's deadline; on any failure abort the transfer, raise a TransportError."""
        try:
            return await within(make, self.remaining())
        except BaseException as exc:
            error = typed(exc, f"transfer {self.transfer_id}: {what}")
            await self.abort(f"{what} failed: {error}")
            if isinstance(exc, asyncio.CancelledError):
                raise
            if isinstance(error, errors.PeerUnavailable):
                await self.sender.forget(self.link)
            raise error from exc

    def _stats(self, error: str = "") -> TransferStats:
        return TransferStats(self.link.name, self.nbytes, int(self.dst_ids.size), self.pool.shape[0],
                             time.perf_counter() - self.started, self.checksum_seconds, self.transfer_id, "send",
                             self._start_ns, time.time_ns(), tuple(self._layer_times), error,
                             self.link.descriptor.address, self.busy_seconds)

    def _finish(self, state: str, stats: TransferStats) -> None:
        self.state = state
        self.sender.release(self)
        notify(self.sender.observer, stats, self._context)
