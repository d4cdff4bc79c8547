"""The scheduler's settings."""

from __future__ import annotations

from dataclasses import dataclass

from kvmesh.services.common.config import ServerConfig, check, knob
from kvmesh.services.scheduler.policies import POLICIES

DEFAULT_PORT = 50050


@dataclass(frozen=True)
class SchedulerConfig(ServerConfig):
    """Settings of `kvmesh scheduler`."""

    port: int = knob(DEFAULT_PORT, "Port to bind; 0 picks a free one (printed at start).")
    lease_s: float = knob(10.0, "Seconds a worker stays registered without a heartbeat.")
    policy: str = knob("least_loaded", "Routing policy.", choices=tuple(POLICIES))
    cache_probe: bool = knob(True, "Ask the registered cache how much of each prompt it holds (the request's "
                                   "one lookup, 250 ms deadline): Route reports it, the kv_aware policy weighs it, "
                                   "and the prefill worker fetches by it without asking again.")
    max_queue: int = knob(64, "Admission limit: a decode worker with this many waiting requests takes no more; "
                              "when every decode worker is over it, Route fails with RESOURCE_EXHAUSTED.")

    def validate(self) -> None:
        super().validate()
        check(self.lease_s > 0, f"lease_s must be > 0, got {self.lease_s}")
        check(self.max_queue >= 1, f"max_queue must be >= 1, got {self.max_queue}")
        check(self.policy in POLICIES, f"policy must be one of {sorted(POLICIES)}, got {self.policy!r}")
