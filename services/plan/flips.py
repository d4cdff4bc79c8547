"""A simulated mesh whose workers change role mid-run, as `--role auto` workers do when the scheduler's planner
flips them. Every `interval_s` a `replan(now, sim)` callback names the flips (worker id, new role). A flipping
worker leaves routing at once and finishes what it holds — its queued prompts computed and handed off, or its
running and announced sequences decoded to the end — then registers in its new role, idle. The drain is the flip's
whole cost here (no engine restart is priced: one engine serves both roles).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence

from kvmesh.services.plan.costs import Profile
from kvmesh.services.plan.sim import LAYOUT, MeshConfig, SimResult, Simulation
from kvmesh.services.plan.trace import Arrival
from kvmesh.services.plan.worker import Job, SimWorker
from kvmesh.services.scheduler.models import Fit, StepWindow
from kvmesh.services.scheduler.registry import Role, WorkerSpec

_PLAN = 100

Replan = Callable[[float, "FlipSimulation"], Sequence[tuple[str, Role]]]


class FlipSimulation(Simulation):
    """A Simulation (disaggregated meshes only) with a planner that may flip workers between prefill and decode."""

    def __init__(self, profile: Profile, config: MeshConfig, arrivals: Sequence[Arrival], replan: Replan,
                 interval_s: float) -> None:
        if config.colocated or interval_s <= 0:
            raise ValueError("flips need a disaggregated mesh and a planning interval > 0")
        super().__init__(profile, config, arrivals)
        self.replan, self.interval_s = replan, interval_s
        self.draining: dict[SimWorker, Role] = {}  # flipping workers and the role each will take
        self.retired: list[SimWorker] = []  # the old incarnations of flipped workers (their steps count)
        self.flips: list[tuple[float, float, Role]] = []  # (asked at, took the new role at, role)
        self._asked: dict[SimWorker, float] = {}
        self._ports = itertools.count(50000)

    def handlers(self) -> dict:
        return {**super().handlers(), _PLAN: self.plan}

    def run(self) -> SimResult:
        """Play every event, with a planning round every interval_s while requests are open."""
        if self.jobs:
            self.push(self.interval_s, _PLAN, None)
        result = super().run()
        steps = result.num_steps + sum(w.num_steps for w in self.retired if not w.prefills)
        return SimResult(result.arrival_s, result.first_token_s, result.finish_s, result.output_length,
                         result.rejected, result.routes, steps)

    def split(self) -> tuple[int, int]:
        """(prefill, decode) workers, a flipping one counted in the role it is taking."""
        roles = [Role.PREFILL] * len(self.prefill) + [Role.DECODE] * len(self.decode)
        for worker, role in self.draining.items():
            roles.remove(Role.PREFILL if worker.prefills else Role.DECODE)
            roles.append(role)
        return roles.count(Role.PREFILL), roles.count(Role.DECODE)

    def plan(self, now: float, _) -> None:
        """A planning round: carry out the flips replan names, then schedule the next round."""
        for worker_id, role in self.replan(now, self):
            self.flip(now, worker_id, role)
        if self.num_open > 0:
            self.push(now + self.interval_s, _PLAN, None)

    def flip(self, now: float, worker_id: str, role: Role) -> None:
        """Take a live worker out of routing; it takes role once drained."""
        worker = self.by_id.get(worker_id)
        if worker is None or worker in self.draining or (role == Role.PREFILL) == worker.prefills:
            return
        del self.by_id[worker_id]  # no heartbeats for it either
        self.registry.deregister(worker_id)
        self.draining[worker] = role
        self._asked[worker] = now
        self.settle(now, worker)

    def settle(self, now: float, worker: SimWorker) -> None:
        """A draining worker that holds nothing more takes its new role."""
        if worker not in self.draining or worker.busy or worker.waking or worker.waiting or worker.local or \
                worker.prefilling or worker.num_running or worker.num_pending:
            return
        role = self.draining.pop(worker)
        (self.prefill if worker.prefills else self.decode).remove(worker)
        self.retired.append(worker)
        spec = WorkerSpec(role, f"sim-flipped:{next(self._ports)}", layout=LAYOUT, model=LAYOUT.model_id)
        limits = self.config.prefill_limits if role == Role.PREFILL else self.config.decode_limits
        fresh = SimWorker(self.registry.register(spec), self.profile, limits, role == Role.PREFILL,
                          role == Role.DECODE)
        fresh.worker.steps = StepWindow(prior=Fit(self.profile.prefill, self.profile.decode))
        (self.prefill if role == Role.PREFILL else self.decode).append(fresh)
        self.by_id[fresh.worker.worker_id] = fresh
        self.flips.append((self._asked.pop(worker), now, role))
        self.publish(fresh)

    def publish(self, worker: SimWorker) -> None:
        if worker not in self.draining:  # a draining worker is out of the registry
            super().publish(worker)

    def step_done(self, now: float, worker: SimWorker) -> None:
        super().step_done(now, worker)
        self.settle(now, worker)

    def land(self, now: float, job: Job) -> None:
        decode = job.decode
        super().land(now, job)
        self.settle(now, decode)

    def wake(self, now: float, worker: SimWorker) -> None:
        super().wake(now, worker)
        self.settle(now, worker)
