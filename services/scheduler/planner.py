"""The planner's decision, as pure functions: which P:D splits to try, how good each is predicted to be (`kvmesh
plan`'s simulator on a synthetic workload drawn from the recent window), and whether to flip roles or ask an
external scaler for workers. The loop that gathers the inputs and carries out a decision is planner_loop.py.

A split counts the whole mesh's prefill and decode workers: the fixed ones (started with a role) and the flexible
ones (started with `--role auto`, which the scheduler can flip). Only flexible workers move, so a candidate keeps at
least the fixed workers of each role and at least one of each role in all.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from kvmesh.services.plan.costs import Profile
from kvmesh.services.plan.metrics import SLO, request_latencies
from kvmesh.services.plan.sim import MeshConfig, SimResult, Simulation
from kvmesh.services.plan.trace import Arrival
from kvmesh.services.scheduler.planner_window import WindowStats
from kvmesh.services.scheduler.registry import Role, Worker

#: Fewest requests a simulation plays (a quiet window is replayed at its rate, not judged on three requests).
MIN_SIM_REQUESTS = 20
#: A smaller mesh replaces the current one (scale down) when it is predicted to lose no more goodput than this.
SCALE_DOWN_TOLERANCE = 0.02


class RoleControl(Protocol):
    """What the planner needs of the registry to flip roles (the role-flip work adds both to Registry)."""

    def flexible(self) -> list[Worker]:
        """The live workers started with `--role auto`: they can be told to flip."""

    def request_role(self, address: str, role: Role, reason: str) -> bool:
        """Ask the worker at address to take role (it drains its old role's work first); False when refused."""


@dataclass(frozen=True, order=True)
class Split:
    """A mesh's prefill and decode worker counts."""

    prefill: int
    decode: int

    @property
    def total(self) -> int:
        """Workers in all."""
        return self.prefill + self.decode

    def __str__(self) -> str:
        return f"{self.prefill}P+{self.decode}D"


@dataclass(frozen=True)
class Changes:
    """How to turn one split into another: flexible workers to flip each way, then workers to add or remove."""

    to_prefill: int = 0
    to_decode: int = 0
    add: tuple[tuple[Role, int], ...] = ()
    remove: tuple[tuple[Role, int], ...] = ()

    @property
    def num_moved(self) -> int:
        """Workers flipped, added or removed."""
        return self.to_prefill + self.to_decode + sum(n for _, n in self.add + self.remove)


@dataclass(frozen=True)
class PlannerSettings:
    """The planner's knobs (the scheduler's --planner-* flags): a change must raise predicted goodput by more than
    `threshold` (a fraction) and come `hold_s` after the last; `max_workers` > 0 with a scale command lets the
    search grow or shrink the mesh up to that many workers; simulations play at most `max_sim_requests`."""

    threshold: float = 0.1
    hold_s: float = 60.0
    max_workers: int = 0
    can_scale: bool = False
    max_sim_requests: int = 200
    seed: int = 0


@dataclass(frozen=True)
class Decision:
    """One round's outcome. action: keep (nothing better by the threshold), hold (better, but the last change was
    too recent), flip (move flexible workers between roles), scale (run the scale command), skip (nothing to
    decide on: no traffic, no cost model, too few flexible workers)."""

    action: str
    current: Split
    target: Split
    current_goodput: float = 0.0
    target_goodput: float = 0.0
    reason: str = ""
    changes: Changes = Changes()

    @property
    def gain(self) -> float:
        """The predicted relative goodput change of target over current (inf from zero to some)."""
        if self.current_goodput > 0:
            return self.target_goodput / self.current_goodput - 1.0
        return math.inf if self.target_goodput > 0 else 0.0


def changes(current: Split, target: Split) -> Changes:
    """Fewest moves from current to target: flip what one role has over and the other lacks, scale the rest."""
    dp, dd = target.prefill - current.prefill, target.decode - current.decode
    to_decode = min(max(-dp, 0), max(dd, 0))
    to_prefill = min(max(dp, 0), max(-dd, 0))
    dp, dd = dp + to_decode - to_prefill, dd - to_decode + to_prefill
    add = tuple((r, n) for r, n in ((Role.PREFILL, dp), (Role.DECODE, dd)) if n > 0)
    remove = tuple((r, -n) for r, n in ((Role.PREFILL, dp), (Role.DECODE, dd)) if n < 0)
    return Changes(to_prefill, to_decode, add, remove)


def candidate_splits(fixed: Split, num_flexible: int, settings: PlannerSettings) -> list[Split]:
    """Every split to simulate: the current workers' (each flexible worker in either role), and with a scaler every
    mesh size from the fixed workers' (at least 2) up to max_workers."""
    current_total = fixed.total + num_flexible
    totals = [current_total]
    if settings.can_scale and settings.max_workers > 0:
        totals = list(range(max(2, fixed.total), max(settings.max_workers, current_total) + 1))
    found = []
    for total in totals:
        low, high = max(1, fixed.prefill), total - max(1, fixed.decode)
        found += [Split(p, total - p) for p in range(low, high + 1)]
    return found


def workload(stats: WindowStats, window_s: float, max_requests: int, seed: int = 0) -> list[Arrival]:
    """A synthetic replay of the window: Poisson arrivals at its rate, each request's (prompt, max_tokens) drawn
    from the window's mix, every prompt distinct; as many requests as the window held, within
    [MIN_SIM_REQUESTS, max_requests]."""
    if stats.rate_per_s <= 0 or not stats.lengths:
        return []
    rng = random.Random(seed)
    num = min(max(stats.num_requests, MIN_SIM_REQUESTS), max(1, max_requests))
    now, arrivals = 0.0, []
    for _ in range(num):
        prompt, output = rng.choice(stats.lengths)
        arrivals.append(Arrival(now, prompt, output))
        now += rng.expovariate(stats.rate_per_s)
    return arrivals


def backlog(workers: Sequence[Worker], stats: WindowStats, max_requests: int) -> list[Arrival]:
    """The work the mesh holds now, as arrivals at time 0 ahead of the window's replay (at most max_requests):
    each worker's pending prompts (its heartbeat's pending prefill tokens spread over them, the window's mean
    output each) and each decode worker's running sequences (a one-token prompt, their KV being in place, and half
    the window's mean output left)."""
    _, mean_out = stats.mean_lengths()
    found: list[Arrival] = []
    for worker in workers:
        load = worker.load
        if load.num_pending_prefill > 0:
            tokens = max(1, load.num_pending_prefill_tokens // load.num_pending_prefill)
            found += [Arrival(0.0, tokens, max(1, round(mean_out)))] * load.num_pending_prefill
        if worker.spec.role == Role.DECODE:
            found += [Arrival(0.0, 1, max(1, round(mean_out / 2)))] * load.num_running
    return found[:max(0, max_requests)]


def goodput(result: SimResult, slo: SLO, skip: int = 0) -> float:
    """Requests/s within both SLOs, counting the requests after the first `skip` (the backlog) only, over the time
    from the first counted arrival to the last counted finish."""
    ttft, tpot, served = request_latencies(result)
    counted = np.arange(len(served)) >= skip
    ok = served & counted & (ttft <= slo.ttft_ms) & (tpot <= slo.tpot_ms)
    arrival, finish = np.asarray(result.arrival_s), np.asarray(result.finish_s)
    if not counted.any():
        return 0.0
    end = max(float(finish[served & counted].max(initial=0.0)), float(arrival[counted].max()))
    duration = end - float(arrival[counted].min())
    return float(ok.sum()) / duration if duration > 0 else float(ok.sum())


def simulate_splits(profile: Profile, arrivals: Sequence[Arrival], splits: Sequence[Split], slo: SLO,
                    base: MeshConfig, num_backlog: int = 0) -> dict[Split, float]:
    """Predicted goodput (requests/s within both SLOs) of each split on arrivals, the first num_backlog of which
    (the work already queued) are played but not counted. CPU-bound: call it off the event loop. `base` carries
    the scheduler's policy, admission limit, heartbeat and SLOs."""
    found = {}
    for split in splits:
        config = MeshConfig(prefill=split.prefill, decode=split.decode, colocated=0,
                            prefill_limits=base.prefill_limits, decode_limits=base.decode_limits, policy=base.policy,
                            cache=base.cache, max_queue=base.max_queue, heartbeat_s=base.heartbeat_s,
                            trace_block_tokens=base.trace_block_tokens, slo_ttft_s=base.slo_ttft_s,
                            slo_tpot_s=base.slo_tpot_s)
        found[split] = goodput(Simulation(profile, config, arrivals).run(), slo, num_backlog)
    return found


def _choose(current: Split, predicted: Mapping[Split, float], settings: PlannerSettings) -> Split:
    """The best split: the most goodput, then (with a scaler) the fewest workers, then the fewest moves."""
    allowed = [s for s in predicted if settings.can_scale or s.total == current.total]
    return max(allowed, key=lambda s: (predicted[s], -s.total if settings.can_scale else 0,
                                       -changes(current, s).num_moved))


def _smaller(current: Split, predicted: Mapping[Split, float]) -> Split | None:
    """The smallest mesh predicted to serve the window about as well as the current one (scale down), if any."""
    floor = predicted.get(current, 0.0) * (1.0 - SCALE_DOWN_TOLERANCE)
    fits = [s for s in predicted if s.total < current.total and predicted[s] >= floor and predicted[s] > 0]
    return min(fits, key=lambda s: (s.total, -predicted[s], changes(current, s).num_moved)) if fits else None


def decide(current: Split, predicted: Mapping[Split, float], now: float, last_change_at: float | None,
           settings: PlannerSettings) -> Decision:
    """Whether to change the mesh, pure: flip (or scale) to the best split when it raises predicted goodput by more
    than the threshold; with a scaler, also shrink to a smaller mesh that loses almost nothing; never within hold_s
    of the last change."""
    if not predicted:
        return Decision("skip", current, current, reason="no split was simulated")
    good = predicted.get(current, 0.0)  # a split without a worker of each role (not simulated) serves nothing
    target = _choose(current, predicted, settings)
    decision = Decision("keep", current, current, good, good, "no split is predicted to beat the current one by "
                        f"more than {settings.threshold:.0%}")
    best = Decision("keep", current, target, good, predicted[target])
    if target != current and best.gain > settings.threshold:
        decision = best
    elif settings.can_scale and (smaller := _smaller(current, predicted)) is not None:
        decision = Decision("keep", current, smaller, good, predicted[smaller])
    if decision.target == current:
        return decision
    moves = changes(current, decision.target)
    action = "scale" if moves.add or moves.remove else "flip"
    why = (f"predicted goodput {decision.gain:+.1%} (threshold {settings.threshold:.0%})" if decision.gain > 0 else
           f"a smaller mesh serves the window within {SCALE_DOWN_TOLERANCE:.0%} of the current goodput")
    if last_change_at is not None and now - last_change_at < settings.hold_s:
        return Decision("hold", current, decision.target, good, decision.target_goodput,
                        f"{why}, but the last change was {now - last_change_at:.0f} s ago "
                        f"(hold {settings.hold_s:g} s)", moves)
    return Decision(action, current, decision.target, good, decision.target_goodput, why, moves)


def load_rank(worker: Worker) -> tuple[int, int]:
    """How busy a worker is by its last heartbeat and the routes since: the least busy flip first."""
    load = worker.load
    return (load.num_waiting + load.num_running + load.num_pending_prefill + worker.num_routed,
            load.num_pending_prefill_tokens + worker.num_routed_tokens)


def choose_flips(flexible: Sequence[Worker], moves: Changes) -> list[tuple[Worker, Role]]:
    """The flexible workers to flip and the role each takes: the least loaded of the role giving workers up."""
    chosen = []
    for source, target, count in ((Role.PREFILL, Role.DECODE, moves.to_decode),
                                  (Role.DECODE, Role.PREFILL, moves.to_prefill)):
        pool = sorted((w for w in flexible if w.spec.role == source), key=load_rank)
        chosen += [(w, target) for w in pool[:count]]
    return chosen
