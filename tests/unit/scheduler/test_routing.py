"""Routing: least loaded wins, layouts never mix, no pair is UNAVAILABLE, full queues are RESOURCE_EXHAUSTED."""

import pytest

from kvmesh.services.common.errors import CapacityError, InvalidArgumentError, UnavailableError
from kvmesh.services.scheduler.policies import POLICIES, RouteQuery, get_policy, least_loaded, load_score
from kvmesh.services.kv_identity import KVLayout as Layout
from kvmesh.services.scheduler.registry import Load, Registry, Role, WorkerSpec
from kvmesh.services.scheduler.router import route

FP32 = Layout("tiny", "float32", 16, 2, 2, 8)
BF16 = Layout("tiny", "bfloat16", 16, 2, 2, 8)
OTHER = Layout("other", "float32", 16, 2, 2, 8)
QUERY = RouteQuery("r1", (1, 2, 3))


def add(registry, role, port, layout, load=Load(), model=""):
    worker = registry.register(WorkerSpec(role, f"127.0.0.1:{port}", layout=layout, model=model))
    registry.heartbeat(worker.worker_id, load)
    return worker


def test_least_loaded_picks_the_least_busy_decode_and_prefill():
    registry = Registry(lease_s=10)
    add(registry, Role.DECODE, 1, FP32, Load(num_running=4))
    idle_decode = add(registry, Role.DECODE, 2, FP32, Load(num_running=1, num_free_blocks=10, num_total_blocks=10))
    add(registry, Role.PREFILL, 3, FP32, Load(num_waiting=2))
    idle_prefill = add(registry, Role.PREFILL, 4, FP32, Load())
    plan = route(QUERY, registry.workers(), least_loaded, max_queue=8)
    assert (plan.decode.worker_id, plan.prefill.worker_id) == (idle_decode.worker_id, idle_prefill.worker_id)
    assert plan.num_cached_tokens == 0 and plan.policy == "least_loaded"


def test_block_usage_breaks_ties_between_equally_busy_workers():
    registry = Registry(lease_s=10)
    add(registry, Role.DECODE, 1, FP32, Load(num_running=1, num_free_blocks=1, num_total_blocks=10))
    roomy = add(registry, Role.DECODE, 2, FP32, Load(num_running=1, num_free_blocks=9, num_total_blocks=10))
    add(registry, Role.PREFILL, 3, FP32)
    assert load_score(roomy) < 2
    assert route(QUERY, registry.workers(), least_loaded, 8).decode.worker_id == roomy.worker_id


def test_never_pairs_workers_whose_layouts_differ():
    registry = Registry(lease_s=10)
    add(registry, Role.DECODE, 1, BF16)  # the idlest decode worker, but no bf16 prefill exists
    fp32_decode = add(registry, Role.DECODE, 2, FP32, Load(num_running=5))
    fp32_prefill = add(registry, Role.PREFILL, 3, FP32)
    add(registry, Role.PREFILL, 4, OTHER)
    for _ in range(3):
        plan = route(QUERY, registry.workers(), least_loaded, 8)
        assert plan.prefill.spec.layout == plan.decode.spec.layout
        assert (plan.decode.worker_id, plan.prefill.worker_id) == (fp32_decode.worker_id, fp32_prefill.worker_id)


def test_an_asked_for_layout_or_model_narrows_the_choice():
    registry = Registry(lease_s=10)
    add(registry, Role.DECODE, 1, FP32, model="small")
    add(registry, Role.PREFILL, 2, FP32, model="small")
    bf16_decode = add(registry, Role.DECODE, 3, BF16, Load(num_running=9), model="small")
    add(registry, Role.PREFILL, 4, BF16, model="small")
    plan = route(RouteQuery("r", (1,), layout=BF16), registry.workers(), least_loaded, 8)
    assert plan.decode.worker_id == bf16_decode.worker_id
    assert route(RouteQuery("r", (1,), model="tiny"), registry.workers(), least_loaded, 8)  # by layout.model_id
    with pytest.raises(UnavailableError, match="model 'big'"):
        route(RouteQuery("r", (1,), model="big"), registry.workers(), least_loaded, 8)


def test_no_workers_or_no_pair_is_unavailable():
    registry = Registry(lease_s=10)
    with pytest.raises(UnavailableError, match="no prefill and decode worker pair"):
        route(QUERY, registry.workers(), least_loaded, 8)
    add(registry, Role.DECODE, 1, FP32)
    add(registry, Role.CACHE, 2, None)
    with pytest.raises(UnavailableError):
        route(QUERY, registry.workers(), least_loaded, 8)


def test_every_decode_over_the_queue_limit_is_resource_exhausted():
    registry = Registry(lease_s=10)
    busy = add(registry, Role.DECODE, 1, FP32, Load(num_waiting=8))
    add(registry, Role.PREFILL, 2, FP32)
    with pytest.raises(CapacityError, match="8 or more"):
        route(QUERY, registry.workers(), least_loaded, max_queue=8)
    registry.heartbeat(busy.worker_id, Load(num_waiting=7))
    assert route(QUERY, registry.workers(), least_loaded, max_queue=8).decode.worker_id == busy.worker_id


def test_an_empty_prompt_is_invalid():
    with pytest.raises(InvalidArgumentError):
        route(RouteQuery("r", ()), [], least_loaded, 8)
    with pytest.raises(InvalidArgumentError):
        route(RouteQuery("r", (1, -4)), [], least_loaded, 8)


def test_policy_registry():
    assert get_policy("least_loaded") is least_loaded and list(POLICIES) == ["least_loaded", "kv_aware"]
    with pytest.raises(KeyError, match="known"):
        get_policy("random")
