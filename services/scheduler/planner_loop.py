"""The scheduler's planner loop: every interval, the recent window and the workers' fitted cost models go through
`kvmesh plan`'s simulator (off the event loop) for every split of the flexible workers, and the decision
(planner.py) is carried out — flips asked of the workers through a RoleControl, or the scale command run — and
reported: one log line, the planner metrics, a `planner.decide` span."""

from __future__ import annotations

import asyncio
import logging
import math
import shlex
import time
from collections.abc import Callable, Sequence

from kvmesh.services.common import conventions as names
from kvmesh.services.common import metrics, telemetry
from kvmesh.services.plan.costs import Profile
from kvmesh.services.plan.metrics import SLO
from kvmesh.services.plan.sim import MeshConfig
from kvmesh.services.scheduler import planner
from kvmesh.services.scheduler.models import MIN_SAMPLES, PRIOR_DECODE, PRIOR_PREFILL
from kvmesh.services.scheduler.planner import Decision, PlannerSettings, RoleControl, Split
from kvmesh.services.scheduler.planner_window import ArrivalWindow
from kvmesh.services.scheduler.predict import kv_bytes_per_token
from kvmesh.services.scheduler.registry import Registry, Role, Worker

log = logging.getLogger(__name__)

#: Seconds the scale command may run before it is killed.
SCALE_TIMEOUT_S = 120.0


def _mean(models: Sequence) -> object:
    kind = type(models[0])
    return kind(*(sum(getattr(m, k) for m in models) / len(models) for k in ("a", "b", "c")))


def profile_from_fits(workers: Sequence[Worker], fallback: Profile | None, transfer_gbps: float) -> Profile | None:
    """A simulator profile from the workers' fitted cost models (the mean over the workers of each role that fitted
    one); the fallback profile's model (else the prior) for a role with no fit; None when no worker has a fit and
    there is no fallback."""
    prefill = [w.fit.prefill for w in workers if w.fit.prefill_fitted]
    decode = [w.fit.decode for w in workers
              if w.spec.role == Role.DECODE and w.fit.num_samples >= MIN_SAMPLES]
    if not prefill and not decode:
        return fallback
    layouts = [w.spec.layout for w in workers if w.spec.layout is not None]
    per_token = kv_bytes_per_token(layouts[0]) if layouts else (fallback.kv_bytes_per_token if fallback else 1)
    return Profile(_mean(prefill) if prefill else (fallback.prefill if fallback else PRIOR_PREFILL),
                   _mean(decode) if decode else (fallback.decode if fallback else PRIOR_DECODE),
                   max(1, per_token), transfer_gbps)


class PlannerLoop:
    """One planner per scheduler. `round()` decides once; `run(interval_s)` rounds forever (cancelled at stop)."""

    def __init__(self, registry: Registry, roles: RoleControl, window: ArrivalWindow, settings: PlannerSettings,
                 slo: SLO, base: MeshConfig, fallback: Profile | None = None, transfer_gbps: float = 8.0,
                 scale_command: str = "", clock: Callable[[], float] = time.monotonic, use_fits: bool = True) -> None:
        self.registry, self.roles, self.window = registry, roles, window
        self.settings, self.slo, self.base = settings, slo, base
        self.fallback, self.transfer_gbps = fallback, transfer_gbps
        self.use_fits = use_fits  # False: the fallback profile only, whatever the workers fitted
        self.scale_command = shlex.split(scale_command)
        self.clock = clock
        self.last_change_at: float | None = None
        self.decisions: list[Decision] = []  # the last few, newest last (for Stats and tests)

    async def run(self, interval_s: float) -> None:
        """A round every interval_s; a round that fails is logged and the next one runs."""
        while True:
            await asyncio.sleep(interval_s)
            try:
                await self.round()
            except Exception:  # noqa: BLE001 - the planner must never take the scheduler down
                log.exception("planner round failed")

    def current(self) -> tuple[Split, Split, list[Worker]]:
        """(the mesh's split, its fixed workers' split, the flexible workers), from the registry now."""
        flexible = [w for w in self.roles.flexible() if w.spec.role in (Role.PREFILL, Role.DECODE)]
        movable = {w.spec.address for w in flexible}
        fixed = [w for w in self.registry.workers() if w.spec.address not in movable and not w.spec.colocated]
        fixed_split = Split(sum(w.spec.role == Role.PREFILL for w in fixed),
                            sum(w.spec.role == Role.DECODE for w in fixed))
        split = Split(fixed_split.prefill + sum(w.spec.role == Role.PREFILL for w in flexible),
                      fixed_split.decode + sum(w.spec.role == Role.DECODE for w in flexible))
        return split, fixed_split, flexible

    async def round(self) -> Decision:
        """Decide once, carry the decision out and report it."""
        with telemetry.tracer().start_as_current_span(names.PLANNER_DECIDE) as span:
            decision = await self._decide()
            if decision.action in ("flip", "scale"):
                await self._apply(decision)
            self._report(decision, span)
        return decision

    async def _decide(self) -> Decision:
        split, fixed, flexible = self.current()
        stats = self.window.stats()
        profile = (profile_from_fits(self.registry.workers(), self.fallback, self.transfer_gbps) if self.use_fits
                   else self.fallback)
        skip = ("no flexible (--role auto) workers" if not flexible and not self.settings.can_scale else
                "no requests in the window" if stats.num_requests == 0 else
                "no fitted cost model and no --planner-profile" if profile is None else "")
        if skip:
            return Decision("skip", split, split, reason=skip)
        queued = planner.backlog(self.registry.workers(), stats, self.settings.max_sim_requests)
        arrivals = queued + planner.workload(stats, self.window.window_s, self.settings.max_sim_requests,
                                             self.settings.seed)
        splits = planner.candidate_splits(fixed, len(flexible), self.settings)
        predicted = await asyncio.get_running_loop().run_in_executor(
            None, planner.simulate_splits, profile, arrivals, splits, self.slo, self.base, len(queued))
        return planner.decide(split, predicted, self.clock(), self.last_change_at, self.settings)

    async def _apply(self, decision: Decision) -> None:
        """Ask the chosen flexible workers to flip, then run the scale command for what flips cannot do."""
        _, _, flexible = self.current()
        flipped = 0
        for worker, role in planner.choose_flips(flexible, decision.changes):
            if self.roles.request_role(worker.spec.address, role, decision.reason):
                flipped += 1
            else:
                log.warning("planner: %s refused to become %s", worker.spec.address, role.name.lower())
        scaled = 0
        for verb, entries in (("add", decision.changes.add), ("remove", decision.changes.remove)):
            for role, count in entries:
                scaled += await self.scale(verb, role, count)
        if flipped or scaled:
            self.last_change_at = self.clock()

    async def scale(self, verb: str, role: Role, count: int) -> bool:
        """Run `CMD add|remove prefill|decode N`; True when it exited 0. Its output's tail goes to the log."""
        if not self.scale_command:
            log.warning("planner: the best mesh needs %s %d %s worker(s) but no --scale-command is set",
                        verb, count, role.name.lower())
            return False
        argv = [*self.scale_command, verb, role.name.lower(), str(count)]
        try:
            proc = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.PIPE,
                                                        stderr=asyncio.subprocess.STDOUT)
        except OSError as exc:
            log.error("planner: scale command %s could not start: %s", shlex.join(argv), exc)
            return False
        try:
            output, _ = await asyncio.wait_for(proc.communicate(), SCALE_TIMEOUT_S)
        except asyncio.TimeoutError:
            proc.kill()
            await proc.wait()
            log.error("planner: scale command %s ran over %g s: killed", shlex.join(argv), SCALE_TIMEOUT_S)
            return False
        tail = output.decode(errors="replace").strip()[-500:]
        log.log(logging.INFO if proc.returncode == 0 else logging.ERROR, "planner: scale command %s exited %d%s",
                shlex.join(argv), proc.returncode, f": {tail}" if tail else "")
        return proc.returncode == 0

    def _report(self, decision: Decision, span) -> None:
        gain = decision.gain if math.isfinite(decision.gain) else 1.0
        log.info("planner: %s; current %s (goodput %.3f/s), chosen %s (goodput %.3f/s), gain %+.1f%%: %s",
                 decision.action, decision.current, decision.current_goodput, decision.target,
                 decision.target_goodput, 100 * gain, decision.reason)
        metrics.PLANNER_DECISIONS.labels(action=decision.action).inc()
        metrics.PLANNER_PREDICTED_GAIN.set(gain)
        span.set_attributes({"kvmesh.planner.action": decision.action, "kvmesh.planner.current": str(decision.current),
                             "kvmesh.planner.target": str(decision.target),
                             "kvmesh.planner.current_goodput_rps": decision.current_goodput,
                             "kvmesh.planner.target_goodput_rps": decision.target_goodput,
                             "kvmesh.planner.predicted_gain": gain, "kvmesh.planner.reason": decision.reason})
        self.decisions = [*self.decisions[-15:], decision]
