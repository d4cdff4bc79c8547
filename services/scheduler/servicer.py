"""The Scheduler gRPC servicer: protobuf in, a registry or router call, protobuf out."""

from __future__ import annotations

import dataclasses
import logging
import time

import grpc
from opentelemetry import trace

from kvmesh.services.common import access, metrics, tls
from kvmesh.services.common import conventions as names
from kvmesh.services.common.errors import CapacityError, InvalidArgumentError, MeshError, UnavailableError
from kvmesh.services.scheduler import explain, router
from kvmesh.services.scheduler.admission import PoolFullError, blocks_needed
from kvmesh.services.scheduler.breaker import BreakerState
from kvmesh.services.scheduler.policies import Links, Policy, RouteQuery
from kvmesh.services.scheduler.slo_aware import check_floors
from kvmesh.services.kv_identity import KVLayout, PromptHashes
from kvmesh.services.cost_model import StepShape
from kvmesh.services.scheduler.links import LinkBook, LinkSample, Reported
from kvmesh.services.scheduler.models import StepSample
from kvmesh.services.scheduler.validate_register import validate_heartbeat, validate_register
from kvmesh.services.scheduler.registry import Load, Registry, Role, Worker, WorkerSpec
from kvmesh.v1 import common_pb2, scheduler_pb2, scheduler_pb2_grpc

log = logging.getLogger(__name__)


def load_from_proto(msg: scheduler_pb2.WorkerLoad) -> Load:
    """The domain load of a WorkerLoad message."""
    steps = tuple(StepSample(StepShape(s.num_prefill_tokens, s.num_attention_pairs, s.num_decode_seqs,
                                       s.num_context_tokens), s.seconds) for s in msg.steps)
    return Load(msg.num_waiting, msg.num_running, msg.num_free_blocks, msg.num_total_blocks,
                msg.num_pending_prefill_tokens, msg.num_pending_prefill, msg.num_blocks_claimed, steps,
                msg.num_remaining_tokens, msg.mean_output_tokens)


def transfers_from_proto(msg: scheduler_pb2.WorkerLoad) -> list[Reported]:
    """The KV transfers a (validated) WorkerLoad reports, for the link models."""
    return [Reported(t.backend, t.peer, LinkSample(t.num_bytes, t.seconds, t.num_ssd_bytes), t.cache_fetch)
            for t in msg.transfers]


def spec_from_proto(msg: scheduler_pb2.RegisterRequest) -> WorkerSpec:
    """The worker spec of a RegisterRequest (InvalidArgumentError for an unknown role)."""
    if msg.role not in tuple(Role):
        raise InvalidArgumentError("role must be PREFILL, DECODE or CACHE")
    has_layout = msg.HasField("layout") and msg.layout.block_size > 0
    descriptor = common_pb2.TransportDescriptor()
    descriptor.CopyFrom(msg.descriptor)
    return WorkerSpec(role=Role(msg.role), address=msg.address, host_id=msg.host_id, instance_id=msg.instance_id,
                      transports=tuple(msg.transports), layout=KVLayout.from_proto(msg.layout) if has_layout else None,
                      model=msg.model, descriptor=descriptor,
                      local_prefill_max_tokens=msg.local_prefill_max_tokens
                      if msg.HasField("local_prefill_max_tokens") else None, colocated=msg.colocated,
                      flexible=msg.flexible, spills_kv=msg.spills_kv)


def worker_to_proto(worker: Worker, lease_remaining_s: float, breaker: BreakerState = BreakerState.CLOSED
                    ) -> scheduler_pb2.WorkerInfo:
    """The WorkerInfo message of a registered worker whose breaker is in state `breaker`."""
    spec, load = worker.spec, worker.load
    info = scheduler_pb2.WorkerInfo(
        worker_id=worker.worker_id, role=int(spec.role), address=spec.address, host_id=spec.host_id,
        instance_id=spec.instance_id, transports=list(spec.transports), model=spec.served_model,
        load=scheduler_pb2.WorkerLoad(num_waiting=load.num_waiting, num_running=load.num_running,
                                      num_free_blocks=load.num_free_blocks,
                                      num_total_blocks=load.num_total_blocks,
                                      num_remaining_tokens=load.num_remaining_tokens,
                                      mean_output_tokens=load.mean_output_tokens),
        lease_remaining_seconds=lease_remaining_s, breaker_state=int(breaker),
        num_routed_since_heartbeat=worker.num_routed, num_breaker_opened=worker.breaker.num_opened,
        num_breaker_failures=worker.breaker.num_failures, colocated=spec.colocated,
        flexible=spec.flexible)
    if spec.layout is not None:
        info.layout.CopyFrom(spec.layout.to_proto())
    if spec.descriptor is not None:
        info.descriptor.CopyFrom(spec.descriptor)
    return info


class SchedulerServicer(scheduler_pb2_grpc.SchedulerServicer):
    """Serves kvmesh.v1.Scheduler over a Registry and a routing policy."""

    def __init__(self, registry: Registry, policy: Policy, policy_name: str, max_queue,
                 cache_probe=None, health_prober=None, slo_ttft_s: float = 0.0, slo_tpot_s: float = 0.0,
                 links: Links = Links()) -> None:
        self.slo_ttft_s, self.slo_tpot_s = slo_ttft_s, slo_tpot_s  # defaults of requests that set none
        self.links = links if links.book is not None else dataclasses.replace(links, book=LinkBook(
            links.fixed_s, links.transfer_gbps, links.dram_gbps, links.ssd_gbps))  # fitted from heartbeats
        self.registry = registry
        self.health_prober = health_prober  # a HealthProber: verifies reported failures
        self.cache_probe = cache_probe  # a CacheProbe: how much of each prompt the cache holds
        self.policy = policy
        self.policy_name = policy_name
        self.max_queue = max_queue  # an int or admission.QueueLimits (per priority)
        self.window = None  # an ArrivalWindow when the planner runs: the requests Route saw recently

    def _info(self, worker: Worker) -> scheduler_pb2.WorkerInfo:
        info = worker_to_proto(worker, self.registry.lease_remaining(worker), self.registry.breaker_state(worker))
        info.desired_role = int(self.registry.desired_role(worker) or 0)
        return info

    async def Register(self, request, context):
        validate_register(request)  # sane load, dialable addresses, a real layout; else INVALID_ARGUMENT
        worker = self.registry.register(spec_from_proto(request), load_from_proto(request.load))
        log.info("registered %s at %s", worker.worker_id, worker.spec.address)
        why = router.unpairable(worker, self.registry.workers())
        if why:
            log.warning("%s at %s pairs with no registered worker of the other role (yet): %s", worker.worker_id,
                        worker.spec.address, why)
        lease = self.registry.lease_s
        return scheduler_pb2.RegisterResponse(worker_id=worker.worker_id, lease_seconds=lease,
                                              heartbeat_interval_seconds=lease / 3, lease_token=worker.lease_token)

    async def _refuse_unless_owner(self, request, context) -> None:
        """Only the process that registered a worker renews or ends its lease: it alone holds the lease token
        Register returned (an admin certificate may end any). With mTLS, a worker's certificate must also be of
        the worker's role. An unknown id passes here: the handler answers NOT_FOUND, and the worker registers
        again."""
        role = tls.peer_role(context)
        worker = self.registry.find(request.worker_id)
        if worker is None or role == "admin":
            return
        text = access.owner_refusal(role, int(worker.spec.role))
        if text is None and not worker.holds(request.lease_token):
            text = (f"the lease token does not match worker {request.worker_id}'s: only the process that "
                    "registered a worker may heartbeat or deregister it")
        if text is not None:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, text)

    async def Heartbeat(self, request, context):
        await self._refuse_unless_owner(request, context)
        validate_heartbeat(request)
        arrived = list(request.arrived_request_ids) if request.reports_arrivals else None
        worker = self.registry.heartbeat(request.worker_id, load_from_proto(request.load), arrived)
        if request.load.transfers:
            self.links.book.add(request.worker_id, transfers_from_proto(request.load))
        synced = True
        if request.HasField("kv_events"):
            events = request.kv_events
            synced = self.registry.apply_kv_events(request.worker_id, events.stored, events.removed, events.full)
        return scheduler_pb2.HeartbeatResponse(lease_seconds=self.registry.lease_s, resync_kv_events=not synced,
                                               desired_role=int(self.registry.desired_role(worker) or 0))

    async def SetWorkerRole(self, request, context):
        if request.role not in (Role.PREFILL, Role.DECODE):
            raise InvalidArgumentError("role must be PREFILL or DECODE: a flexible worker takes one of those")
        accepted = self.registry.request_role(request.address, Role(request.role), request.reason or "operator")
        return scheduler_pb2.SetWorkerRoleResponse(accepted=accepted)

    async def Deregister(self, request, context):
        await self._refuse_unless_owner(request, context)
        removed = self.registry.deregister(request.worker_id)
        if removed:
            log.info("deregistered %s", request.worker_id)
        return scheduler_pb2.DeregisterResponse(removed=removed)

    async def Route(self, request, context):
        layout = KVLayout.from_proto(request.layout) if request.layout.block_size > 0 else None
        query = RouteQuery(request.request_id, tuple(request.prompt_token_ids), request.model, layout,
                           request.cache_salt if request.HasField("cache_salt") else None,
                           avoid_worker_ids=frozenset(request.avoid_worker_ids), links=self.links,
                           max_tokens=max(request.max_tokens, 0), priority=request.priority,
                           slo_ttft_s=request.slo_ttft_seconds if request.HasField("slo_ttft_seconds")
                           else self.slo_ttft_s,
                           slo_tpot_s=request.slo_tpot_seconds if request.HasField("slo_tpot_seconds")
                           else self.slo_tpot_s)
        if self.window is not None and not request.dry_run:  # demand, routed or refused: what the planner plans for
            self.window.record(len(query.prompt_token_ids), query.max_tokens)
        hashes = PromptHashes(query.prompt_token_ids, query.cache_salt or "")  # hashed once, carried in the plan
        if self.cache_probe is not None:
            # a refusal by limits, or by objectives that even a full hit would miss (floors: asked here only), never
            # waits on the cache; route checks again after the probe, as requests routed meanwhile change the queues
            start = time.perf_counter()
            try:
                check_floors(query, router.admissible(query, self.registry.routable(), self.max_queue))
            except MeshError as e:
                _count_rejection(e, start)
                raise
            cached = await self.cache_probe.cached_tokens(query, self.registry.workers(), hashes)
            query = dataclasses.replace(query, cached_tokens=cached)
        held = self.registry.kv_index.hit_tokens(self.registry.workers(Role.DECODE), query.prompt_token_ids,
                                                 query.cache_salt or "", hashes)
        query = dataclasses.replace(query, decode_cached_tokens=held)
        start = time.perf_counter()
        try:
            plan = router.route(query, self.registry.routable(), self.policy, self.max_queue)
        except MeshError as e:
            _count_rejection(e, start)
            raise
        metrics.ROUTE_SECONDS.observe(time.perf_counter() - start)
        if not request.dry_run:  # a dry run only answers: it must not steer the next real route
            metrics.ROUTE_DECISIONS.labels(reason=plan.policy or self.policy_name).inc()
            self.registry.routed(plan.decode, len(query.prompt_token_ids), blocks_needed(query, plan.decode),
                                 query.request_id)
            if plan.prefill is not None and not plan.local_prefill:
                self.registry.routed(plan.prefill, len(query.prompt_token_ids))
        # "": the decode (or colocated) worker prefills; a plan may still name a prefill worker it would have used
        prefill_id = plan.prefill.worker_id if plan.prefill is not None and not plan.local_prefill else ""
        explain.record_plan(trace.get_current_span(), plan)
        trace.get_current_span().set_attributes({
            names.ATTR_ROUTE_PREFILL: prefill_id, names.ATTR_ROUTE_LOCAL_PREFILL: plan.local_prefill,
            "kvmesh.route.decode": plan.decode.worker_id,
            "kvmesh.route.reason": plan.policy or self.policy_name, "kvmesh.cached_tokens": plan.num_cached_tokens,
            "kvmesh.route.priority": query.priority,
            names.ATTR_DECODE_CACHED_TOKENS: plan.num_decode_cached_tokens})
        chosen = plan.decode.spec.layout
        prefill = self._info(plan.prefill) if plan.prefill is not None else None
        return scheduler_pb2.RouteResponse(prefill=prefill, decode=self._info(plan.decode),
                                           num_cached_tokens=plan.num_cached_tokens, policy=plan.policy,
                                           num_decode_cached_tokens=plan.num_decode_cached_tokens,
                                           prompt_block_hashes=hashes.of(chosen), local_prefill=plan.local_prefill,
                                           cache_probed=chosen in query.cached_tokens, kv_source=plan.kv_source,
                                           predicted_ttft_seconds=plan.predicted_ttft_s,
                                           predicted_tpot_seconds=plan.predicted_tpot_s,
                                           kv_peer=self._info(plan.kv_peer) if plan.kv_peer is not None else None)

    async def Stats(self, request, context):
        return explain.stats(self.registry, self.policy_name, self.links.book)

    async def ListWorkers(self, request, context):
        role = Role(request.role) if request.role in tuple(Role) else None
        return scheduler_pb2.ListWorkersResponse(workers=[self._info(w) for w in self.registry.workers(role)])


    async def ReportFailure(self, request, context):
        if not request.worker_id and not request.address:
            raise InvalidArgumentError("ReportFailure needs the failed worker's worker_id or address")
        role = Role(request.role) if request.role in tuple(Role) else None
        worker = self.registry.find(request.worker_id, request.address, role)
        code = _code_name(request.code)
        if worker is None:  # lapsed, or an earlier incarnation at a re-registered address: nothing to count
            return scheduler_pb2.ReportFailureResponse(counted=False)
        metrics.WORKER_FAILURE_REPORTS.labels(role=worker.spec.role.name.lower(), code=code).inc()
        before = self.registry.breaker_state(worker)
        self.registry.record_failure(worker)
        state = self.registry.breaker_state(worker)
        log.log(logging.WARNING if state is not before else logging.INFO,
                "%s reports %s at %s failed (%s: %s): breaker %s", request.reporter or "a peer", worker.worker_id,
                worker.spec.address, code, request.message, state.name.lower())
        if self.health_prober is not None:
            self.health_prober.check_soon(worker)  # a dead worker fails it too, and is out of routing at once
        observe_breakers(self.registry)
        return scheduler_pb2.ReportFailureResponse(counted=True, breaker_state=int(state))


def observe_breakers(registry: Registry) -> None:
    """Set the breaker gauge: how many live workers' breakers are in each state."""
    counts = {state: 0 for state in BreakerState}
    for worker in registry.workers():
        counts[registry.breaker_state(worker)] += 1
    for state, count in counts.items():
        metrics.WORKER_BREAKERS.labels(state=state.name.lower()).set(count)


def _code_name(code: int) -> str:
    """The name of a gRPC status number ("unknown" for one out of range)."""
    named = {c.value[0]: c.name for c in grpc.StatusCode}
    return named.get(code, "UNKNOWN")


def _count_rejection(error: MeshError, start: float) -> None:
    """A refused Route counts once in the rejections by reason and once in route_seconds, early or late."""
    metrics.ROUTE_REJECTIONS.labels(reason=_rejection_reason(error)).inc()
    metrics.ROUTE_SECONDS.observe(time.perf_counter() - start)


def _rejection_reason(error: MeshError) -> str:
    """The `reason` label of a rejected Route call."""
    if isinstance(error, PoolFullError):
        return "kv_blocks"
    if isinstance(error, CapacityError):
        return "overloaded"
    if isinstance(error, UnavailableError):
        return "no_workers"
    if isinstance(error, InvalidArgumentError):
        return "invalid"
    return type(error).__name__
