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
    breaker_failures: int = knob(2, "Consecutive failures of a worker (failed calls its peers report, failed health "
                                    "checks the scheduler makes on each report) that open its circuit breaker: no "
                                    "routes go to it until the cool-down has passed.")
    breaker_cooldown_s: float = knob(2.0, "Seconds an open breaker keeps its worker out of routing; a failed health "
                                          "check restarts it. Then one probe route goes through (half-open).")
    breaker_probe_window_s: float = knob(2.0, "Seconds after the half-open probe route with no failure reported "
                                              "that close the breaker.")
    health_check_timeout_s: float = knob(0.5, "Deadline of the health check that verifies a reported failure and "
                                              "re-checks open breakers.")

    def validate(self) -> None:
        super().validate()
        check(self.lease_s > 0, f"lease_s must be > 0, got {self.lease_s}")
        check(self.max_queue >= 1, f"max_queue must be >= 1, got {self.max_queue}")
        check(self.breaker_failures >= 1, f"breaker_failures must be >= 1, got {self.breaker_failures}")
        check(self.breaker_cooldown_s > 0, f"breaker_cooldown_s must be > 0, got {self.breaker_cooldown_s}")
        check(self.breaker_probe_window_s > 0,
              f"breaker_probe_window_s must be > 0, got {self.breaker_probe_window_s}")
        check(self.health_check_timeout_s > 0,
              f"health_check_timeout_s must be > 0, got {self.health_check_timeout_s}")
        check(self.policy in POLICIES, f"policy must be one of {sorted(POLICIES)}, got {self.policy!r}")
