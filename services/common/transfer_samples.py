"""The KV transfers this process sent, kept for its heartbeats: the scheduler fits its link models to them
(scheduler/links.py). A bounded window (the oldest go when heartbeats stop draining it); each sample is drained
into one heartbeat, like the engine's step samples."""

from __future__ import annotations

from collections import deque

from kvmesh.transports.base import TransferStats
from kvmesh.v1 import scheduler_pb2

WINDOW = 64  # samples kept between heartbeats


class TransferSamples:
    """Recent transfers sent, as heartbeat samples."""

    def __init__(self, window: int = WINDOW) -> None:
        self._samples: deque[scheduler_pb2.TransferSample] = deque(maxlen=window)

    def __len__(self) -> int:
        return len(self._samples)

    def observe(self, stats: TransferStats) -> None:
        """Keep a finished handoff this process sent: its bytes over the seconds it spent in the transport."""
        if stats.direction != "send" or stats.error or stats.bytes <= 0:
            return
        self._samples.append(scheduler_pb2.TransferSample(
            num_bytes=stats.bytes, seconds=stats.busy_seconds or stats.seconds, backend=stats.backend,
            peer=stats.peer))

    def observe_fetch(self, stats: TransferStats, num_ssd_bytes: int, seconds: float) -> None:
        """Keep a cache delivery: its bytes (num_ssd_bytes of them from SSD) over the whole fetch's seconds."""
        if not stats.error and stats.bytes > 0:
            self._samples.append(scheduler_pb2.TransferSample(
                num_bytes=stats.bytes, seconds=seconds, backend=stats.backend, peer=stats.peer,
                num_ssd_bytes=min(num_ssd_bytes, stats.bytes), cache_fetch=True))

    def drain_into(self, load: scheduler_pb2.WorkerLoad) -> scheduler_pb2.WorkerLoad:
        """Move every kept sample into load's transfers; returns load."""
        while self._samples:
            load.transfers.append(self._samples.popleft())
        return load


#: This process's window: its senders' observer (`transfer_telemetry.report_sent`) and the cache's deliveries
#: fill it, its heartbeats drain it.
SENT = TransferSamples()
