"""Admission by KV blocks: a decode worker takes a request only when its pool holds the request's prompt plus
max_tokens beside what its requests (and those routed since its heartbeat) will take; otherwise the request is
refused at once, with a retry-after, by the scheduler."""

import pytest

from kvmesh.services.common.errors import CapacityError, InvalidArgumentError
from kvmesh.services.kv_identity import KVLayout as Layout
from kvmesh.services.scheduler.admission import PoolFullError, blocks_needed, free_blocks
from kvmesh.services.scheduler.policies import POLICIES, RouteQuery, get_policy
from kvmesh.services.scheduler.registry import Load, Registry, Role, WorkerSpec
from kvmesh.services.scheduler.router import route

FP32 = Layout("tiny", "float32", 16, 2, 2, 8)
QUERY = RouteQuery("r", tuple(range(40)), max_tokens=24)  # 64 tokens: 4 blocks of 16


def add(registry, role, port, load=Load()):
    worker = registry.register(WorkerSpec(role, f"127.0.0.1:{port}", layout=FP32))
    registry.heartbeat(worker.worker_id, load)
    return worker


def pool(total, claimed):
    return Load(num_free_blocks=total, num_total_blocks=total, num_blocks_claimed=claimed)


@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_requests_are_admitted_while_their_blocks_fit_and_refused_by_the_scheduler_after(policy):
    registry = Registry(lease_s=10)
    decode = add(registry, Role.DECODE, 1, pool(total=16, claimed=4))
    add(registry, Role.PREFILL, 2)
    assert blocks_needed(QUERY, decode) == 4 and free_blocks(decode) == 12
    for _ in range(3):  # 3 x 4 blocks fill the 12 left, with no heartbeat in between
        plan = route(QUERY, registry.workers(), get_policy(policy), max_queue=64)
        registry.routed(plan.decode, len(QUERY.prompt_token_ids), blocks_needed(QUERY, plan.decode))
    with pytest.raises(PoolFullError, match="room for the request's 4 KV blocks") as refused:
        route(QUERY, registry.workers(), get_policy(policy), max_queue=64)
    assert isinstance(refused.value, CapacityError) and refused.value.retry_after_s > 0
    registry.heartbeat(decode.worker_id, pool(total=16, claimed=12))  # one of them finished
    assert route(QUERY, registry.workers(), get_policy(policy), max_queue=64).decode is decode


def test_a_request_goes_to_the_decode_worker_whose_pool_has_room():
    registry = Registry(lease_s=10)
    add(registry, Role.DECODE, 1, pool(total=16, claimed=14))  # idle-looking, but its requests will fill it
    roomy = add(registry, Role.DECODE, 2, Load(num_running=5, num_total_blocks=16, num_blocks_claimed=8))
    add(registry, Role.PREFILL, 3)
    for name in POLICIES:
        assert route(QUERY, registry.workers(), get_policy(name), max_queue=64).decode is roomy


def test_max_tokens_counts_toward_the_blocks():
    registry = Registry(lease_s=10)
    add(registry, Role.DECODE, 1, pool(total=16, claimed=13))  # 3 blocks free: the prompt alone fits
    add(registry, Role.PREFILL, 2)
    route(RouteQuery("r", tuple(range(40))), registry.workers(), get_policy("least_loaded"), 64)
    with pytest.raises(PoolFullError):
        route(QUERY, registry.workers(), get_policy("least_loaded"), 64)


def test_a_request_larger_than_every_pool_is_invalid_not_retried():
    registry = Registry(lease_s=10)
    add(registry, Role.DECODE, 1, pool(total=3, claimed=0))
    add(registry, Role.PREFILL, 2)
    with pytest.raises(InvalidArgumentError, match="needs 4 KV blocks; the largest decode worker's pool holds 3"):
        route(QUERY, registry.workers(), get_policy("slo_aware"), 64)


def test_a_worker_that_reports_no_pool_is_not_limited_by_blocks():
    registry = Registry(lease_s=10)
    decode = add(registry, Role.DECODE, 1)
    add(registry, Role.PREFILL, 2)
    assert free_blocks(decode) is None
    assert route(QUERY, registry.workers(), get_policy("slo_aware"), 64).decode is decode


def test_a_full_queue_is_still_refused_for_its_queue():
    registry = Registry(lease_s=10)
    add(registry, Role.DECODE, 1, Load(num_waiting=8, num_total_blocks=16))
    add(registry, Role.PREFILL, 2)
    with pytest.raises(CapacityError, match="8 or more requests queued") as refused:
        route(QUERY, registry.workers(), get_policy("least_loaded"), 8)
    assert not isinstance(refused.value, PoolFullError)


class CountingProbe:
    """A cache probe that holds nothing and counts how often it was asked."""

    def __init__(self):
        self.calls = 0

    async def cached_tokens(self, query, workers, hashes=None):
        self.calls += 1
        return {}


def test_a_refusal_by_the_queue_limit_never_waits_on_the_cache_probe():
    import asyncio

    from kvmesh.services.scheduler.servicer import SchedulerServicer
    from kvmesh.v1 import scheduler_pb2

    registry = Registry(lease_s=10)
    decode = add(registry, Role.DECODE, 1, Load(num_waiting=2))
    add(registry, Role.PREFILL, 2)
    probe = CountingProbe()
    servicer = SchedulerServicer(registry, get_policy("slo_aware"), "slo_aware", max_queue=2, cache_probe=probe)
    request = scheduler_pb2.RouteRequest(request_id="r", prompt_token_ids=list(range(40)), max_tokens=24,
                                         layout=FP32.to_proto())
    routes, refusals = route_counts()
    with pytest.raises(CapacityError, match="2 or more requests queued"):
        asyncio.run(servicer.Route(request, None))
    assert probe.calls == 0
    assert route_counts() == (routes + 1, refusals + 1)  # the early refusal is still counted and timed, once
    registry.heartbeat(decode.worker_id, Load(num_waiting=1))  # room again: the probe is asked, once
    assert asyncio.run(servicer.Route(request, None)).decode.worker_id == decode.worker_id
    assert probe.calls == 1
    assert route_counts() == (routes + 2, refusals + 1)


def route_counts() -> tuple[float, float]:
    """How many Route answers route_seconds has timed, and how many the queue limit refused."""
    from kvmesh.services.common import metrics

    return (metrics.REGISTRY.get_sample_value("kvmesh:route_seconds_count"),
            metrics.REGISTRY.get_sample_value("kvmesh:route_rejections_total", {"reason": "overloaded"}) or 0.0)


def test_a_ttft_objective_no_cache_hit_could_meet_is_refused_without_the_cache_probe():
    import asyncio

    from kvmesh.services.scheduler.servicer import SchedulerServicer
    from kvmesh.v1 import scheduler_pb2

    registry = Registry(lease_s=10)
    backlog = Load(num_pending_prefill=8, num_pending_prefill_tokens=40_000, num_running=8)  # seconds of prompts
    add(registry, Role.DECODE, 1, backlog)
    add(registry, Role.PREFILL, 2, backlog)
    probe = CountingProbe()
    servicer = SchedulerServicer(registry, get_policy("slo_aware"), "slo_aware", max_queue=64, cache_probe=probe)
    request = scheduler_pb2.RouteRequest(request_id="r", prompt_token_ids=list(range(40)), max_tokens=24,
                                         layout=FP32.to_proto(), slo_ttft_seconds=0.5)
    with pytest.raises(CapacityError, match="whatever the cache holds") as refused:
        asyncio.run(servicer.Route(request, None))
    assert probe.calls == 0 and refused.value.retry_after_s > 0
    request.slo_ttft_seconds = 600.0  # an objective the queues leave room for: the probe is asked
    asyncio.run(servicer.Route(request, None))
    assert probe.calls == 1
