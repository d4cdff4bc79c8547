"""Keep the children of `kvmesh up` running: a child that dies is restarted with backoff, as systemd's
`Restart=on-failure` does, while every other child keeps serving.

The policy is plain data and a pure class (`RestartBackoff`), so it is tested without processes: the first restart
waits `restart_delay_s`, each consecutive failure doubles the wait up to `restart_max_delay_s`, a child that ran
`restart_reset_s` before dying starts again from the first wait, and a child restarted `restart_limit` times within
`restart_window_s` is given up on (reported; the rest of the mesh keeps serving), like systemd's StartLimitBurst /
StartLimitIntervalSec. A dead child's shared-memory segments are reclaimed at once, not when some other worker
happens to start.
"""

from __future__ import annotations

import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from kvmesh.services.common.config import check, knob

RESTART_MODES = ("on-failure", "always", "no")
#: Deaths systemd counts as clean for Restart=on-failure: exit 0 and these signals (the child was asked to stop).
CLEAN_SIGNALS = (signal.SIGHUP, signal.SIGINT, signal.SIGTERM, signal.SIGPIPE)


@dataclass(frozen=True)
class RestartConfig:
    """How `kvmesh up` restarts a child that dies (flags `--restart*`, env `KVMESH_UP_RESTART*`)."""

    restart: str = knob("on-failure", "When to restart a child that exits: on-failure (a non-zero status or a "
                                      "signal other than SIGHUP/SIGINT/SIGTERM/SIGPIPE, as systemd's "
                                      "Restart=on-failure), always, or no.", choices=RESTART_MODES)
    restart_delay_s: float = knob(0.5, "Seconds before the first restart of a child that died; each consecutive "
                                       "failure doubles it.")
    restart_max_delay_s: float = knob(30.0, "Longest wait between restarts of one child.")
    restart_reset_s: float = knob(30.0, "A child that ran this many seconds before dying was healthy: its next "
                                        "restart waits restart_delay_s again.")
    restart_limit: int = knob(5, "Most restarts of one child within restart_window_s; past it the launcher gives "
                                 "up on that child, says so, and keeps the rest of the mesh serving.")
    restart_window_s: float = knob(60.0, "The window restart_limit counts restarts in, seconds.")

    def validate(self) -> None:
        """Raise ConfigError for a value out of range."""
        check(self.restart in RESTART_MODES, f"restart must be one of {list(RESTART_MODES)}, got {self.restart!r}")
        check(self.restart_delay_s > 0, f"restart_delay_s must be > 0, got {self.restart_delay_s}")
        check(self.restart_max_delay_s >= self.restart_delay_s,
              f"restart_max_delay_s must be >= restart_delay_s, got {self.restart_max_delay_s}")
        check(self.restart_reset_s > 0, f"restart_reset_s must be > 0, got {self.restart_reset_s}")
        check(self.restart_limit >= 0, f"restart_limit must be >= 0, got {self.restart_limit}")
        check(self.restart_window_s > 0, f"restart_window_s must be > 0, got {self.restart_window_s}")


def describe_exit(returncode: int) -> str:
    """A child's death in words: 'exit status 3' or 'killed by SIGKILL'."""
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exit status {returncode}"


def wants_restart(mode: str, returncode: int) -> bool:
    """Whether a child that exited with `returncode` (negative: killed by that signal) is restarted under `mode`."""
    if mode == "always":
        return True
    if mode == "no":
        return False
    return returncode != 0 and -returncode not in CLEAN_SIGNALS


class RestartBackoff:
    """One child's restart schedule: how long to wait after each death, or None once it is crash-looping."""

    def __init__(self, config: RestartConfig) -> None:
        self.config = config
        self.num_failures = 0  # consecutive deaths since the child last ran healthily
        self.restarts: deque[float] = deque()  # when each recent restart was scheduled

    def next_delay(self, now: float, ran_s: float) -> float | None:
        """The child died at `now` after running `ran_s` seconds: seconds to wait before restarting it, or None to
        give up (restart_limit restarts within restart_window_s already)."""
        if ran_s >= self.config.restart_reset_s:
            self.num_failures = 0
        while self.restarts and self.restarts[0] <= now - self.config.restart_window_s:
            self.restarts.popleft()
        if len(self.restarts) >= self.config.restart_limit:
            return None
        delay = min(self.config.restart_max_delay_s, self.config.restart_delay_s * 2 ** self.num_failures)
        self.num_failures += 1
        self.restarts.append(now)
        return delay


class Supervised(Protocol):
    """What the supervisor needs of a child (`launcher.Child` is one)."""

    name: str
    process: object

    def start(self) -> None: ...

    def alive(self) -> bool: ...


def _reclaim_segments() -> list[str]:
    from kvmesh.transports import (
        reclaim_stale,  # the registry knows what each backend leaves behind
    )

    return reclaim_stale()


def _log(message: str) -> None:
    print(f"kvmesh up: {message}", file=sys.stderr, flush=True)


class Supervisor:
    """Watches children, restarts the dead ones on their schedule, reclaims what they left behind. Not
    thread-safe: one loop calls `tick`."""

    def __init__(self, children: list[Supervised], config: RestartConfig,
                 await_serving: Callable[[Supervised], None] | None = None,
                 reclaim: Callable[[], list[str]] = _reclaim_segments, log: Callable[[str], None] = _log) -> None:
        self.children = children
        self.config = config
        self.await_serving = await_serving
        self.reclaim = reclaim
        self.log = log
        self.backoff = {c.name: RestartBackoff(config) for c in children}
        now = time.monotonic()
        self.started_at = {c.name: now for c in children}
        self.due: dict[str, float] = {}  # child name -> when to restart it
        self.given_up: set[str] = set()
        self.stopping: set[str] = set()  # asked to stop for a rolling restart: back at once, however it exits
        self.serving_pid: dict[str, int] = {}  # child name -> the pid last seen serving after a restart

    def tick(self, now: float | None = None) -> None:
        """Look at every child once: restart those that are due, schedule those that just died."""
        now = time.monotonic() if now is None else now
        for child in self.children:
            if child.name in self.given_up:
                continue
            if child.name in self.due:
                if now >= self.due[child.name]:
                    self._restart(child, now)
            elif not child.alive():
                self._on_death(child, now)

    def running(self) -> int:
        """Children that run or will be restarted."""
        return len(self.children) - len(self.given_up)

    def _on_death(self, child: Supervised, now: float) -> None:
        returncode = child.process.returncode
        why = f"{child.name} (pid {child.process.pid}) {describe_exit(returncode)}"
        freed = self.reclaim()  # at once: a dead worker's pool must not wait for the next worker to start
        if freed:
            why += f"; reclaimed {len(freed)} shared-memory segment(s): {', '.join(freed)}"
        if child.name in self.stopping:  # a rolling restart stopped it: not a failure, no backoff
            self.stopping.discard(child.name)
            self.due[child.name] = now
            self.log(f"{why}; restarting it (rolling restart)")
            return
        if not wants_restart(self.config.restart, returncode):
            self.given_up.add(child.name)
            self.log(f"{why}; not restarted (--restart {self.config.restart}); the rest keep serving")
            return
        delay = self.backoff[child.name].next_delay(now, now - self.started_at[child.name])
        if delay is None:
            self.given_up.add(child.name)
            self.log(f"{why}; gave up: {self.config.restart_limit} restarts within {self.config.restart_window_s:g} "
                     "s (--restart-limit, --restart-window-s); the rest keep serving")
            return
        self.due[child.name] = now + delay
        self.log(f"{why}; restarting in {delay:g} s")

    def _restart(self, child: Supervised, now: float) -> None:
        del self.due[child.name]
        child.start()
        self.started_at[child.name] = now
        self.log(f"{child.name} restarted (pid {child.process.pid})")
        if self.await_serving is not None:  # off the loop: other children may die meanwhile
            threading.Thread(target=self._report_serving, args=(child,), daemon=True).start()

    def _report_serving(self, child: Supervised) -> None:
        try:
            self.await_serving(child)
        except RuntimeError as e:  # it died again, or never served: the loop sees its death
            self.log(f"{child.name} did not come back: {e}")
            return
        self.serving_pid[child.name] = child.process.pid
        self.log(f"{child.name} serving again (pid {child.process.pid})")


class RollingRestart:
    """Restart children one at a time (`kill -HUP` on `kvmesh up` restarts its engine workers so): SIGTERM one —
    it drains as it does under systemd (a decode worker's streams move to another, a prefill worker finishes its
    prefills and transfers) — wait until the supervisor has it back and serving, then the next. One loop calls
    `tick`, after the supervisor's."""

    def __init__(self, supervisor: Supervisor, names: list[str]) -> None:
        self.supervisor = supervisor
        self.queue = list(names)
        self.current: Supervised | None = None
        self.old_pid = 0

    @property
    def done(self) -> bool:
        return self.current is None and not self.queue

    def tick(self) -> None:
        sup = self.supervisor
        if self.current is not None:
            back = sup.serving_pid.get(self.current.name, self.old_pid) != self.old_pid
            if back or self.current.name in sup.given_up:
                self.current = None
            return
        while self.queue and self.current is None:
            child = next(c for c in sup.children if c.name == self.queue[0])
            self.queue.pop(0)
            if child.name in sup.given_up or child.name in sup.due or not child.alive():
                continue  # not running now: nothing to restart
            self.current, self.old_pid = child, child.process.pid
            sup.stopping.add(child.name)
            sup.log(f"rolling restart: stopping {child.name} (pid {child.process.pid}); {len(self.queue)} to go")
            child.process.send_signal(signal.SIGTERM)
