"""Priorities, early rejection and length-aware decode placement, as pure functions on synthetic worker states:
a less urgent request refused while a more urgent one is admitted at the same load; a policy that predicts
nothing still refuses early (with a retry-after) a request its route would serve late; and a long request kept off
the decode worker whose few decodes are long, where a count of its batch alone would have put it there."""

import pytest

from kvmesh.services.common.errors import CapacityError
from kvmesh.services.cost_model import DecodeModel, PrefillModel
from kvmesh.services.kv_identity import KVLayout
from kvmesh.services.scheduler.admission import QueueLimits, parse_priority_limits
from kvmesh.services.scheduler.models import Fit
from kvmesh.services.scheduler.policies import RouteQuery, least_loaded, slo_aware
from kvmesh.services.scheduler.registry import Load, Registry, Role, WorkerSpec
from kvmesh.services.scheduler.router import route

LAYOUT = KVLayout("tiny", "float32", 16, 2, 2, 64)
PROMPT = tuple(range(1, 4001))
# 10,000 prompt tokens/s; a decode step of 10 ms + 1 ms a sequence + 1 µs per context token
FIT = Fit(PrefillModel(0.005, 1e-4, 0.0), DecodeModel(0.01, 1e-3, 1e-6), 64)


def add(registry, role, port, load=Load()):
    worker = registry.register(WorkerSpec(role, f"127.0.0.1:{port}", layout=LAYOUT))
    registry.heartbeat(worker.worker_id, load)
    worker.steps.fit = FIT
    return worker


def test_priority_limits_parse_and_cap_only_the_less_urgent():
    limits = QueueLimits(64, parse_priority_limits("10:4, 1:16"))
    assert limits.per_priority == ((1, 16), (10, 4))
    assert [limits.for_priority(p) for p in (-3, 0, 1, 9, 10, 500)] == [64, 64, 16, 16, 4, 4]
    for bad in ("1", "a:2", "1:-1", "1:2:3"):
        with pytest.raises(ValueError, match="PRIORITY:LIMIT"):
            parse_priority_limits(bad)


def test_a_less_urgent_request_is_refused_while_a_more_urgent_one_is_admitted_at_the_same_load():
    registry = Registry(lease_s=10)
    add(registry, Role.PREFILL, 1)
    decode = add(registry, Role.DECODE, 2, Load(num_waiting=2))
    limits = QueueLimits(8, ((1, 2),))
    with pytest.raises(CapacityError, match="the limit for priority 1") as refused:
        route(RouteQuery("low", PROMPT, priority=1), registry.workers(), least_loaded, limits)
    assert refused.value.retry_after_s > 0
    plan = route(RouteQuery("high", PROMPT, priority=0), registry.workers(), least_loaded, limits)
    assert plan.decode.worker_id == decode.worker_id
    more_urgent = route(RouteQuery("urgent", PROMPT, priority=-5), registry.workers(), least_loaded, limits)
    assert more_urgent.decode.worker_id == decode.worker_id
    # the most urgent are bounded too, by --max-queue
    with pytest.raises(CapacityError, match="2 or more requests queued"):
        route(RouteQuery("r", PROMPT, priority=-5), registry.workers(), least_loaded, QueueLimits(2))


def test_a_policy_that_predicts_nothing_refuses_early_with_a_retry_after_when_its_route_would_be_late():
    registry = Registry(lease_s=10)
    add(registry, Role.PREFILL, 1, Load(num_pending_prefill_tokens=30_000, num_pending_prefill=6))  # 3 s queued
    add(registry, Role.DECODE, 2)
    with pytest.raises(CapacityError, match="no route is predicted to meet") as refused:
        route(RouteQuery("r", PROMPT, slo_ttft_s=1.0), registry.workers(), least_loaded, 8)
    assert 1.5 < refused.value.retry_after_s < 3.0  # the queue's drain beyond the objective
    assert route(RouteQuery("r", PROMPT, slo_ttft_s=5.0), registry.workers(), least_loaded, 8).policy == "least_loaded"
    assert route(RouteQuery("r", PROMPT), registry.workers(), least_loaded, 8).prefill is not None  # no objective


def test_a_long_request_avoids_the_decode_worker_whose_fewer_decodes_are_long():
    registry = Registry(lease_s=10)
    add(registry, Role.PREFILL, 1)
    # 4 decodes, 8,000 tokens of context, each with 2,000 tokens still to go
    long_held = add(registry, Role.DECODE, 2, Load(num_running=4, num_total_blocks=1000, num_free_blocks=500,
                                                   num_remaining_tokens=8000))
    # 8 decodes, 6,400 tokens of context, each about to finish
    short_held = add(registry, Role.DECODE, 3, Load(num_running=8, num_total_blocks=1000, num_free_blocks=600,
                                                    num_remaining_tokens=32))
    long_request = RouteQuery("long", PROMPT, max_tokens=2000, slo_tpot_s=0.03)
    plan = route(long_request, registry.workers(), slo_aware, 64)
    assert plan.decode.worker_id == short_held.worker_id and plan.predicted_tpot_s <= 0.03
    weighed = {p.decode.worker_id: p.tpot_s for p in plan.candidates}
    assert weighed[long_held.worker_id] > 0.03  # its batch stays 5 wide and grows for the request's whole life
    # priced by its batch's size and context now (one step), both would meet the budget and the worker with fewer
    # decodes (the shorter step, so the sooner first token) would have won
    assert FIT.decode.seconds(4 + 1, 8000 + 4000) < FIT.decode.seconds(8 + 1, 6400 + 4000) <= 0.03


def test_a_short_request_still_takes_the_smaller_batch_and_the_workload_mean_caps_max_tokens():
    registry = Registry(lease_s=10)
    add(registry, Role.PREFILL, 1)
    long_held = add(registry, Role.DECODE, 2, Load(num_running=4, num_remaining_tokens=8000))
    add(registry, Role.DECODE, 3, Load(num_running=8, num_remaining_tokens=32))
    assert route(RouteQuery("s", PROMPT, max_tokens=4), registry.workers(), slo_aware, 64).decode is long_held
    # max_tokens 2,000, but this workload's requests end after 4 tokens on average: a short request too
    for worker in registry.workers(Role.DECODE):
        registry.heartbeat(worker.worker_id, Load(num_running=worker.load.num_running, mean_output_tokens=4.0,
                                                  num_remaining_tokens=worker.load.num_remaining_tokens))
    query = RouteQuery("s", PROMPT, max_tokens=2000, slo_tpot_s=0.03)
    assert route(query, registry.workers(), slo_aware, 64).decode is long_held
