"""The registry of live workers: registration, leases renewed by heartbeats, expiry of lapsed workers."""

from __future__ import annotations

import dataclasses
import enum
import hmac
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from kvmesh.services.common.errors import InvalidArgumentError, NotFoundError
from kvmesh.services.common.ids import new_id
from kvmesh.services.kv_identity import KVLayout
from kvmesh.services.scheduler.breaker import Breaker
from kvmesh.services.scheduler.kv_index import KVIndex
from kvmesh.services.scheduler.models import Fit, StepSample, StepWindow
from kvmesh.services.scheduler.roles import RoleFlips


class Role(enum.IntEnum):
    """What a worker does; values equal the proto's WorkerRole numbers."""

    PREFILL = 1
    DECODE = 2
    CACHE = 3


@dataclass(frozen=True)
class Load:
    """A worker's load as of its last heartbeat."""

    num_waiting: int = 0
    num_running: int = 0
    num_free_blocks: int = 0
    num_total_blocks: int = 0
    # prompt tokens (and requests) in the worker's engine not yet computed: its prefill backlog
    num_pending_prefill_tokens: int = 0
    num_pending_prefill: int = 0
    num_blocks_claimed: int = 0  # KV blocks its requests will take at most (prompt + max_tokens each)
    steps: tuple[StepSample, ...] = ()  # engine steps timed since the last heartbeat (fed to the worker's fit)
    # decode workers: tokens its requests are still expected to generate (0: not reported), and the mean output
    # length of those it finished (0: none yet) — length-aware placement reads both
    num_remaining_tokens: int = 0
    mean_output_tokens: float = 0.0


@dataclass(frozen=True)
class WorkerSpec:
    """What a worker says about itself when it registers. `descriptor` is opaque to the scheduler."""

    role: Role
    address: str
    host_id: str = ""
    instance_id: str = ""
    transports: tuple[str, ...] = ()
    layout: KVLayout | None = None
    model: str = ""
    descriptor: object = None
    local_prefill_max_tokens: int | None = None  # decode workers: see kv_identity.prefill_locally
    colocated: bool = False  # decode workers: prefills every prompt itself; routed to without a prefill worker
    flexible: bool = False  # `--role auto`: can take either engine role when asked (see roles.py)
    spills_kv: bool = False  # decode workers: borrows KV room from the cache (admitted by prompt blocks)

    def validate(self) -> None:
        """Raise InvalidArgumentError when the spec cannot be registered."""
        host, _, port = self.address.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise InvalidArgumentError(f"address must be host:port, got {self.address!r}")
        if self.role in (Role.PREFILL, Role.DECODE):
            if self.layout is None:
                raise InvalidArgumentError(f"a {self.role.name} worker must send its KV layout")
            try:
                self.layout.validate()
            except ValueError as e:
                raise InvalidArgumentError(str(e)) from None
        if self.colocated and self.role != Role.DECODE:
            raise InvalidArgumentError(f"only a DECODE worker can be colocated, not a {self.role.name} worker")
        if self.flexible and (self.role not in (Role.PREFILL, Role.DECODE) or self.colocated):
            raise InvalidArgumentError(f"only a PREFILL or DECODE worker that is not colocated can be flexible, "
                                       f"not a {self.role.name} worker{' (colocated)' if self.colocated else ''}")

    @property
    def served_model(self) -> str:
        """The model name clients ask for: `model`, else the layout's model id."""
        return self.model or (self.layout.model_id if self.layout else "")


@dataclass
class Worker:
    """A registered worker: its spec, its load and when its lease lapses (monotonic seconds), what was routed to
    it since its last heartbeat, and its circuit breaker."""

    worker_id: str
    spec: WorkerSpec
    load: Load = field(default_factory=Load)
    expires_at: float = 0.0
    # Requests (and their prompt tokens) routed here that no heartbeat shows yet, so a burst between two
    # heartbeats spreads instead of landing on whichever worker last looked idle.
    num_routed: int = 0
    num_routed_tokens: int = 0
    num_routed_blocks: int = 0  # ... and the KV blocks they will take at most on a decode worker
    # those routes by request id: (prompt tokens, blocks, when routed); a heartbeat that reports arrivals removes
    # the ones that arrived, one that does not removes all
    in_transit: dict = field(default_factory=dict)
    num_routed_total: int = 0  # every route since registration (round_robin's turn)
    breaker: Breaker = field(default_factory=Breaker)
    steps: StepWindow = field(default_factory=StepWindow)  # its recent engine steps and the cost models fitted
    # The secret Register handed the worker's process alone; Heartbeat and Deregister must carry it.
    lease_token: str = field(default_factory=lambda: secrets.token_urlsafe(24), repr=False)

    def holds(self, lease_token: str) -> bool:
        """Whether lease_token is this worker's (compared in constant time)."""
        return hmac.compare_digest(self.lease_token.encode(), lease_token.encode())

    @property
    def fit(self) -> Fit:
        """The worker's cost models (fitted from its reported steps; the priors before enough arrived)."""
        return self.steps.fit


class Registry:
    """Live workers by id. Every method is synchronous and quick: call it from the event loop only."""

    def __init__(self, lease_s: float, clock: Callable[[], float] = time.monotonic,
                 breaker: Callable[[], Breaker] = Breaker) -> None:
        self.lease_s = lease_s
        self._clock = clock
        self._new_breaker = breaker  # makes each worker's breaker (its thresholds come from the config)
        self._workers: dict[str, Worker] = {}
        self.kv_index = KVIndex()  # what each decode worker's prefix cache holds; entries leave with the worker
        self.flips = RoleFlips()  # roles flexible workers are asked to take, by address

    def register(self, spec: WorkerSpec, load: Load | None = None) -> Worker:
        """Add a worker (replacing any earlier worker of the same role at the same address, or any flexible one
        there when it is flexible: a flip's re-registration) and start its lease."""
        spec.validate()
        for old in [w for w in self._workers.values() if w.spec.address == spec.address and
                    (w.spec.role == spec.role or (spec.flexible and w.spec.flexible))]:
            del self._workers[old.worker_id]
            self.kv_index.drop(old.worker_id)
        # Random ids: after a scheduler restart no old worker's heartbeat can renew a new worker's lease.
        worker_id = new_id(spec.role.name.lower())
        worker = Worker(worker_id, spec, load or Load(), self._clock() + self.lease_s, breaker=self._new_breaker())
        self._workers[worker_id] = worker
        self.flips.registered(worker)
        return worker

    def heartbeat(self, worker_id: str, load: Load, arrived: Sequence[str] | None = None) -> Worker:
        """Record a worker's load and renew its lease; NotFoundError when it is unknown or its lease lapsed.

        arrived: the requests that reached the worker since its previous heartbeat, which its load now shows; the
        routes not among them are still on their way and stay counted (for a lease at most: a route whose call
        never reached the worker is forgotten then). None: the load shows every route made before it."""
        worker = self._live(worker_id)
        now = self._clock()
        worker.steps.add(load.steps)
        worker.load = dataclasses.replace(load, steps=())
        worker.expires_at = now + self.lease_s
        if arrived is None:
            worker.in_transit.clear()
        else:
            for request_id in arrived:
                worker.in_transit.pop(request_id, None)
            for request_id in [r for r, (_, _, at) in worker.in_transit.items() if at <= now - self.lease_s]:
                del worker.in_transit[request_id]
        routes = worker.in_transit.values()
        worker.num_routed = len(routes)
        worker.num_routed_tokens = sum(r[0] for r in routes)
        worker.num_routed_blocks = sum(r[1] for r in routes)
        return worker

    def routed(self, worker: Worker, num_tokens: int, num_blocks: int = 0, request_id: str = "") -> None:
        """A route sent request_id, of num_tokens prompt tokens, which will take at most num_blocks KV blocks
        there, to worker (counted until a heartbeat shows it)."""
        worker.num_routed += 1
        worker.num_routed_total += 1
        worker.num_routed_tokens += num_tokens
        worker.num_routed_blocks += num_blocks
        key = request_id if request_id not in worker.in_transit else f"{request_id}#{worker.num_routed_total}"
        worker.in_transit[key or f"#{worker.num_routed_total}"] = (num_tokens, num_blocks, self._clock())
        worker.breaker.routed(self._clock())

    def routable(self, role: Role | None = None) -> list[Worker]:
        """Live workers whose breaker lets a route through now, optionally of one role."""
        now = self._clock()
        return [w for w in self.workers(role) if w.breaker.routable(now) and not self.flips.leaving(w)]

    def request_role(self, address: str, role: Role, reason: str = "") -> bool:
        """Ask the flexible worker at address to take role: its next heartbeat answers it, and no new work of its
        current role is routed to it until it registers in the new one. False when no flexible worker is at the
        address or it already has the role."""
        return self.flips.request(self.find("", address), role, reason)

    def desired_role(self, worker: Worker) -> Role | None:
        """The role a flexible worker is asked to take (None: keep its own)."""
        role = self.flips.desired(worker)
        return None if role is None else Role(role)

    def flexible(self) -> list[Worker]:
        """Live workers that can take either engine role (`--role auto`), in registration order."""
        return [w for w in self.workers() if w.spec.flexible]

    def find(self, worker_id: str, address: str = "", role: Role | None = None) -> Worker | None:
        """The live worker with this id; without an id, the one at address (of role, when given). None when there
        is none: a report about an earlier incarnation must not count against the worker that replaced it."""
        live = self.workers(role)
        if worker_id:
            return next((w for w in live if w.worker_id == worker_id), None)
        return next((w for w in live if address and w.spec.address == address), None)

    def record_failure(self, worker: Worker) -> None:
        """A call to worker (or a health check of it) failed: feed its breaker."""
        worker.breaker.record_failure(self._clock())

    def record_healthy(self, worker: Worker) -> None:
        """A health check of worker answered SERVING: feed its breaker (ends a run of failures while closed)."""
        worker.breaker.record_healthy()

    def breaker_state(self, worker: Worker):
        """The worker's breaker state now (a BreakerState)."""
        return worker.breaker.current(self._clock())

    def deregister(self, worker_id: str) -> bool:
        """Remove a worker; False when it was not registered."""
        self.kv_index.drop(worker_id)
        return self._workers.pop(worker_id, None) is not None

    def expire(self) -> list[Worker]:
        """Remove and return every worker whose lease has lapsed."""
        now = self._clock()
        lapsed = [w for w in self._workers.values() if w.expires_at <= now]
        for worker in lapsed:
            del self._workers[worker.worker_id]
            self.kv_index.drop(worker.worker_id)
            if not any(w.spec.address == worker.spec.address for w in self._workers.values()):
                self.flips.forget(worker.spec.address)
        return lapsed

    def apply_kv_events(self, worker_id: str, stored, removed, full: bool) -> bool:
        """Record a live worker's KV events; False when it must resync (NotFoundError when it is unknown)."""
        self._live(worker_id)
        return self.kv_index.apply(worker_id, stored, removed, full)

    def workers(self, role: Role | None = None) -> list[Worker]:
        """Live workers (lease not lapsed), optionally of one role, in registration order."""
        now = self._clock()
        return [w for w in self._workers.values() if w.expires_at > now and (role is None or w.spec.role == role)]

    def lease_remaining(self, worker: Worker) -> float:
        """Seconds until the worker's lease lapses (never negative)."""
        return max(0.0, worker.expires_at - self._clock())

    def _live(self, worker_id: str) -> Worker:
        worker = self._workers.get(worker_id)
        if worker is None or worker.expires_at <= self._clock():
            raise NotFoundError(f"worker {worker_id!r} is not registered (lease lapsed?): register again")
        return worker

