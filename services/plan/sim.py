"""The discrete-event simulation of a mesh: arrivals → the scheduler's real router and policy → a prefill
worker's queue (batched by token budget) → the KV transfer → a decode worker's continuous batch; or, for
colocated workers, arrivals → router → one worker that chunks prompts into its decode steps.

Routing is the scheduler's own: a `Registry` on the simulated clock, workers registered with real specs and
heartbeating their loads every `heartbeat_s` (0: at every change), `router.route` over `registry.routable()`
with the policy named, and `registry.routed` after each route, as the scheduler's Route handler does.

Modelling choices (each a place to refine): a request's first token exists when its KV has landed on the decode worker (disaggregated) or when
the step that computes its prompt's last chunk ends (colocated); KV pools never run out of blocks; a prompt
prefix already computed once (equal leading `hash_ids`) is fetched, not recomputed, when the mesh has a cache.
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections import Counter
from dataclasses import dataclass
from typing import Sequence

from kvmesh.services.common.errors import CapacityError
from kvmesh.services.kv_identity import KVLayout
from kvmesh.services.plan.costs import Profile
from kvmesh.services.plan.trace import TRACE_BLOCK_TOKENS, Arrival
from kvmesh.services.plan.worker import Job, RoleLimits, SimWorker
from kvmesh.services.scheduler import router
from kvmesh.services.scheduler.models import Fit, StepWindow
from kvmesh.services.scheduler.policies import Links, RouteQuery, get_policy
from kvmesh.services.scheduler.predict import kv_bytes_per_token
from kvmesh.services.scheduler.registry import Registry, Role, WorkerSpec

LAYOUT = KVLayout("plan", "float32", 16, 1, 1, 1)  # one layout: every simulated pair is compatible
_ARRIVE, _READY, _STEP, _LAND, _WAKE, _BEAT = range(6)


@dataclass(frozen=True)
class MeshConfig:
    """A placement to simulate: prefill and decode counts (disaggregated) or colocated workers, and each role's
    engine limits. `policy` is a name in the scheduler's policy registry."""

    prefill: int = 0
    decode: int = 0
    colocated: int = 0
    prefill_limits: RoleLimits = RoleLimits(64, 2048)
    decode_limits: RoleLimits = RoleLimits(64, 2048)
    policy: str = "least_loaded"
    cache: bool = True
    max_queue: int = 64  # the scheduler's admission limit (its --max-queue default)
    heartbeat_s: float = 1.0  # workers' heartbeat interval (the scheduler's lease / 3); 0: loads always current
    trace_block_tokens: int = TRACE_BLOCK_TOKENS  # tokens per hash id of the workload's prompts
    # the requests' objectives the scheduler routes by (slo_aware refuses what no route is predicted to meet); 0: none
    slo_ttft_s: float = 0.0
    slo_tpot_s: float = 0.0

    def validate(self) -> None:
        """Raise ValueError for a mesh that cannot serve: no pair and no colocated worker, or a mix."""
        split = self.prefill > 0 and self.decode > 0
        if split == (self.colocated > 0) or min(self.prefill, self.decode, self.colocated) < 0:
            raise ValueError(f"a mesh needs prefill >= 1 and decode >= 1, or colocated >= 1 alone; got {self}")
        if self.heartbeat_s < 0 or self.max_queue < 1 or self.trace_block_tokens < 1:
            raise ValueError(f"heartbeat_s must be >= 0, max_queue and trace_block_tokens >= 1; got {self}")
        get_policy(self.policy)


@dataclass(frozen=True)
class SimResult:
    """Every request's outcome, in arrival order: arrival, first token and finish times (seconds; -1 for a
    rejected request), plus which policies made the routes (and whether the decode worker prefilled) and how many
    decode steps ran."""

    arrival_s: tuple[float, ...]
    first_token_s: tuple[float, ...]
    finish_s: tuple[float, ...]
    output_length: tuple[int, ...]
    rejected: tuple[bool, ...]
    routes: Counter
    num_steps: int


def _spec(role: Role, i: int, colocated: bool = False) -> WorkerSpec:
    port = i + 1 + (30000 if colocated else 0) + (10000 if role == Role.DECODE else 0)
    return WorkerSpec(role, f"sim-{role.name.lower()}:{port}", layout=LAYOUT, model=LAYOUT.model_id,
                      colocated=colocated)


class Simulation:
    """One run of a workload on one MeshConfig; `run()` returns a SimResult."""

    def __init__(self, profile: Profile, config: MeshConfig, arrivals: Sequence[Arrival]):
        config.validate()
        self.profile, self.config = profile, config
        self.policy = get_policy(config.policy)
        self.jobs = [Job(i, a.time_s, a.input_length, a.output_length, a.hash_ids) for i, a in enumerate(arrivals)]
        self.now = 0.0
        self.registry = Registry(lease_s=math.inf, clock=lambda: self.now)  # leases never lapse here
        add, limits = self.registry.register, (config.prefill_limits, config.decode_limits)
        self.prefill = [SimWorker(add(_spec(Role.PREFILL, i)), profile, limits[0], True, False)
                        for i in range(config.prefill)]
        self.decode = [SimWorker(add(_spec(Role.DECODE, i)), profile, limits[1], False, True)
                       for i in range(config.decode)]
        self.decode += [SimWorker(add(_spec(Role.DECODE, i, True)), profile, limits[1], True, True)
                        for i in range(config.colocated)]
        self.by_id = {w.worker.worker_id: w for w in self.prefill + self.decode}
        for w in self.by_id.values():  # the scheduler's fits of simulated steps would converge on the profile
            w.worker.steps = StepWindow(prior=Fit(profile.prefill, profile.decode))
        # the predictions price KV by the layout's bytes per token: scale the profile's link to the toy layout's
        gbps = profile.transfer_gbps * kv_bytes_per_token(LAYOUT) / profile.kv_bytes_per_token
        self.links = Links(transfer_gbps=gbps, dram_gbps=gbps, ssd_gbps=gbps, fixed_s=0.0)
        self.num_open = len(self.jobs)  # requests not yet finished or rejected: heartbeats stop at 0
        self.events: list = []
        self.seq = itertools.count()
        self.seen: set[int] = set()  # hash ids whose blocks the cache holds
        self.routes: Counter = Counter()
        self.prompts: dict[int, tuple[int, ...]] = {}  # prompt token tuples by length, made once

    def push(self, time_s: float, kind: int, obj) -> None:
        """Schedule an event."""
        heapq.heappush(self.events, (time_s, next(self.seq), kind, obj))

    def run(self) -> SimResult:
        """Play every event; every request ends finished or rejected."""
        for job in self.jobs:
            self.push(job.arrival_s, _ARRIVE, job)
        if self.config.heartbeat_s > 0 and self.jobs:
            self.push(0.0, _BEAT, None)
        handlers = self.handlers()
        while self.events:
            now, _, kind, obj = heapq.heappop(self.events)
            self.now = now
            handlers[kind](now, obj)
        jobs = self.jobs
        return SimResult(tuple(j.arrival_s for j in jobs), tuple(j.first_token_s for j in jobs),
                         tuple(j.finish_s for j in jobs), tuple(j.output_length for j in jobs),
                         tuple(j.rejected for j in jobs), self.routes,
                         sum(w.num_steps for w in self.decode))

    def handlers(self) -> dict:
        """Each event kind's handler (a subclass adds its own kinds, numbered from 100)."""
        return {_ARRIVE: self.arrive, _READY: self.ready, _STEP: self.step_done, _LAND: self.land,
                _WAKE: self.wake, _BEAT: self.beat}

    def cached_tokens(self, job: Job) -> int:
        """Leading prompt tokens the cache holds (whole engine blocks, the last prompt token always computed)."""
        if not self.config.cache:
            return 0
        hit = 0
        for h in job.hash_ids:
            if h not in self.seen:
                break
            hit += 1
        tokens = min(hit * self.config.trace_block_tokens, job.input_length - 1)
        return tokens - tokens % LAYOUT.block_size

    def arrive(self, now: float, job: Job) -> None:
        """Route job with the scheduler's own router and policy; a CapacityError rejects it, as Route would."""
        n = job.input_length
        prompt = self.prompts.get(n) or self.prompts.setdefault(n, (0,) * n)
        job.num_cached = self.cached_tokens(job)
        query = RouteQuery(str(job.index), prompt, cached_tokens={LAYOUT: job.num_cached}, links=self.links,
                           slo_ttft_s=self.config.slo_ttft_s, slo_tpot_s=self.config.slo_tpot_s)
        try:
            plan = router.route(query, self.registry.routable(), self.policy, self.config.max_queue)
        except CapacityError:
            job.rejected = True
            self.num_open -= 1
            return
        local = plan.prefill is None or plan.local_prefill
        job.num_cached = plan.num_cached_tokens  # what the plan fetches (a policy may recompute a hit)
        self.routes[plan.policy, local] += 1
        self.registry.routed(plan.decode, n)  # counted until the worker's next heartbeat, as Route does
        if not local:
            self.registry.routed(plan.prefill, n)
        decode = self.by_id[plan.decode.worker_id]
        target = decode if local else self.by_id[plan.prefill.worker_id]
        job.decode = decode
        decode.num_pending += target is not decode
        self.publish(decode)
        fetch = self.profile.transfer_seconds(job.num_cached)
        if fetch > 0:  # the cached prefix is fetched before the prompt's own tokens are computed
            self.push(now + fetch, _READY, (job, target))
        else:
            self.ready(now, (job, target))

    def ready(self, now: float, item: tuple[Job, SimWorker]) -> None:
        """A routed prompt joins its worker's queue."""
        job, target = item
        (target.waiting if target.prefills else target.local).append(job)
        self.kick(now, target)

    def publish(self, worker: SimWorker) -> None:
        """A load change: reported at once when heartbeats are continuous (heartbeat_s 0), else at the next beat."""
        if self.config.heartbeat_s <= 0:
            self.registry.heartbeat(worker.worker.worker_id, worker.load())

    def beat(self, now: float, _) -> None:
        """Every worker heartbeats its load; the next beat follows while any request is open."""
        for worker in self.by_id.values():
            self.registry.heartbeat(worker.worker.worker_id, worker.load())
        if self.num_open > 0:
            self.push(now + self.config.heartbeat_s, _BEAT, None)

    def kick(self, now: float, worker: SimWorker) -> None:
        """An idle worker with new work wakes after every other event of this instant: requests arriving
        together are batched together, as an engine thread finds them all queued when it picks up work."""
        if not worker.busy and not worker.waking:
            worker.waking = True
            self.push(now, _WAKE, worker)
        self.publish(worker)

    def wake(self, now: float, worker: SimWorker) -> None:
        """Start the worker's next step if it has work."""
        worker.waking = False
        self.step(now, worker)

    def step(self, now: float, worker: SimWorker) -> None:
        """Start the worker's next step if it is idle and has work."""
        if not worker.busy:
            seconds = worker.start_step()
            if seconds is not None:
                self.push(now + seconds, _STEP, worker)
        self.publish(worker)

    def step_done(self, now: float, worker: SimWorker) -> None:
        """A step ended: hand computed prompts on, finish requests that made their last token, step again."""
        prefilled, finished = worker.finish_step()
        for job in prefilled:
            self.seen.update(job.hash_ids)  # the prefill offers its new blocks to the cache
            if worker.decodes:  # colocated: the first token now, decoding from the next step
                self.first_token(now, job, worker)
            else:
                self.push(now + self.profile.transfer_seconds(job.input_length), _LAND, job)
        for job in finished:
            job.finish_s = now
        self.num_open -= len(finished)
        self.step(now, worker)  # a running engine loop steps again at once

    def land(self, now: float, job: Job) -> None:
        """A prompt's KV landed on its decode worker: the first token exists; it waits for a seat in the batch."""
        decode = job.decode
        decode.num_pending -= 1
        job.first_token_s = now
        if job.output_length <= 1:
            job.finish_s = now
            self.num_open -= 1
            self.publish(decode)
            return
        decode.waiting.append(job)
        self.kick(now, decode)

    def first_token(self, now: float, job: Job, worker: SimWorker) -> None:
        """A colocated worker computed job's prompt: first token now; it decodes from the next step on."""
        job.first_token_s = now
        if job.output_length <= 1:
            job.finish_s = now
            self.num_open -= 1
        else:
            worker.join(job)
