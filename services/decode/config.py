"""The decode worker's settings."""

from __future__ import annotations

from dataclasses import dataclass

from kvmesh.services.common.config import check, knob
from kvmesh.services.common.worker import WorkerConfig

DEFAULT_PORT = 50080


@dataclass(frozen=True)
class DecodeConfig(WorkerConfig):
    """Settings of `kvmesh decode`."""

    port: int = knob(DEFAULT_PORT, "Port to bind; 0 picks a free one (printed at start).")
    queue_timeout_s: float = knob(30.0, "Seconds a request may wait for free KV blocks before RESOURCE_EXHAUSTED.")
    prefill_timeout_s: float = knob(120.0, "Deadline of the call to the prefill worker, capped by the client's.")

    def validate(self) -> None:
        super().validate()
        check(self.queue_timeout_s >= 0, f"queue_timeout_s must be >= 0, got {self.queue_timeout_s}")
        check(self.prefill_timeout_s > 0, f"prefill_timeout_s must be > 0, got {self.prefill_timeout_s}")
