"""The prefill worker's settings."""

from __future__ import annotations

from dataclasses import dataclass

from kvmesh.services.common.config import knob
from kvmesh.services.worker.config import WorkerConfig

DEFAULT_PORT = 50070


@dataclass(frozen=True)
class PrefillConfig(WorkerConfig):
    """Settings of `kvmesh prefill`."""

    port: int = knob(DEFAULT_PORT, "Port to bind; 0 picks a free one (printed at start).")
    prefill_timeout_s: float = knob(120.0, "Longest a prefill may take when the caller sets no deadline.")
