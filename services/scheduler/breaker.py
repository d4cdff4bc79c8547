"""Circuit breakers per worker: a pure state machine that keeps a failing worker out of routing.

closed ──N consecutive failures──▶ open ──cool-down passed──▶ half-open ──one probe route──▶ …
  ▲                                 ▲                              │
  └──── success (probe not failed) ─┼──────────────────────────────┘
                                    └──── failure (report, failed health check) ◀── half-open

Failures come from the gateway and the workers (a call to the worker failed with UNAVAILABLE) and from the
scheduler's own health checks. Which evidence closes a breaker is the point of the design:

- while closed, a health check that answers SERVING ends the run of consecutive failures (the report was about a
  blip, the worker is up), so one spurious report never opens a breaker;
- once open, neither heartbeats nor health checks close it: a worker whose calls fail may still heartbeat and
  answer health checks (its transport is broken, not its process). Only real traffic closes it: after the
  cool-down one route goes through as a probe, and when no failure for it is reported within the probe window
  the breaker closes. A failed health check while open restarts the cool-down, so a dead worker never draws a
  probe request; its lease lapses and the registry drops it (and its breaker) anyway.

The time is passed in (`now`, monotonic seconds), so the machine has no clock and no I/O.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class BreakerState(enum.IntEnum):
    """Where a breaker stands; values equal the proto's BreakerState numbers."""

    CLOSED = 1
    OPEN = 2
    HALF_OPEN = 3


@dataclass
class Breaker:
    """One worker's breaker. `failure_threshold` consecutive failures open it; `cooldown_s` later it lets one
    probe route through; `probe_window_s` after the probe with no failure it closes."""

    failure_threshold: int = 2
    cooldown_s: float = 2.0
    probe_window_s: float = 2.0
    state: BreakerState = BreakerState.CLOSED
    num_failures: int = 0  # consecutive failures while closed
    opened_at: float = 0.0
    probe_at: float | None = None  # when the half-open probe was routed; None: not yet
    num_opened: int = 0  # times this breaker opened (for stats)

    def record_failure(self, now: float) -> None:
        """A call to the worker failed, or its health check did: count it, open at the threshold, re-open when
        half-open, restart the cool-down when open."""
        if self.state is BreakerState.CLOSED:
            self.num_failures += 1
            if self.num_failures < self.failure_threshold:
                return
            self.num_opened += 1
        self.state, self.opened_at, self.probe_at = BreakerState.OPEN, now, None

    def record_healthy(self) -> None:
        """A health check answered SERVING: ends a run of failures while closed; no effect once open (see the
        module's docstring: only a probe route closes an open breaker)."""
        if self.state is BreakerState.CLOSED:
            self.num_failures = 0

    def record_success(self) -> None:
        """A call to the worker succeeded: close the breaker."""
        self.state, self.num_failures, self.probe_at = BreakerState.CLOSED, 0, None

    def current(self, now: float) -> BreakerState:
        """The state at `now`, after the transitions that time alone makes (cool-down, probe window)."""
        if self.state is BreakerState.OPEN and now - self.opened_at >= self.cooldown_s:
            self.state, self.probe_at = BreakerState.HALF_OPEN, None
        if (self.state is BreakerState.HALF_OPEN and self.probe_at is not None
                and now - self.probe_at >= self.probe_window_s):
            self.record_success()  # the probe drew no failure report within its window
        return self.state

    def routable(self, now: float) -> bool:
        """Whether a route may go to the worker now (a half-open breaker: only while its probe is unsent)."""
        state = self.current(now)
        return state is BreakerState.CLOSED or (state is BreakerState.HALF_OPEN and self.probe_at is None)

    def routed(self, now: float) -> None:
        """A route went to the worker: when half-open, that route is the probe."""
        if self.current(now) is BreakerState.HALF_OPEN and self.probe_at is None:
            self.probe_at = now
