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
    with pytest.raises(CapacityError, match="8 or more") as refused:
        route(QUERY, registry.workers(), least_loaded, max_queue=8)
    assert refused.value.retry_after_s > 0
    registry.heartbeat(busy.worker_id, Load(num_waiting=7))
    assert route(QUERY, registry.workers(), least_loaded, max_queue=8).decode.worker_id == busy.worker_id


def test_an_empty_prompt_is_invalid():
    with pytest.raises(InvalidArgumentError):
        route(RouteQuery("r", ()), [], least_loaded, 8)
    with pytest.raises(InvalidArgumentError):
        route(RouteQuery("r", (1, -4)), [], least_loaded, 8)


def test_policy_registry():
    assert get_policy("least_loaded") is least_loaded
    assert list(POLICIES) == ["slo_aware", "least_loaded", "kv_aware", "round_robin", "power_of_two"]
    with pytest.raises(KeyError, match="known"):
        get_policy("random")


@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_a_burst_between_heartbeats_spreads_evenly_over_two_workers(policy):
    registry = Registry(lease_s=10)
    decodes = [add(registry, Role.DECODE, port, FP32) for port in (1, 2)]
    prefills = [add(registry, Role.PREFILL, port, FP32) for port in (3, 4)]
    query = RouteQuery("r", tuple(range(40)))
    chosen = []
    for _ in range(8):  # no heartbeat in between: only what the scheduler routed tells the workers apart
        plan = route(query, registry.workers(), get_policy(policy), max_queue=64)
        registry.routed(plan.decode, len(query.prompt_token_ids))
        registry.routed(plan.prefill, len(query.prompt_token_ids))
        chosen.append((plan.decode.worker_id, plan.prefill.worker_id))
    for workers, column in ((decodes, 0), (prefills, 1)):
        assert sorted(sum(c[column] == w.worker_id for c in chosen) for w in workers) == [4, 4]
    assert decodes[0].num_routed == 4 and decodes[0].num_routed_tokens == 160


def test_a_heartbeat_replaces_the_routed_count_with_the_reported_load():
    registry = Registry(lease_s=10)
    worker = add(registry, Role.DECODE, 1, FP32)
    registry.routed(worker, 10)
    assert load_score(worker) == 1
    registry.heartbeat(worker.worker_id, Load(num_running=1))
    assert (worker.num_routed, worker.num_routed_tokens, load_score(worker)) == (0, 0, 1)


def test_an_open_breaker_takes_its_worker_out_of_routing():
    now = [0.0]
    registry = Registry(lease_s=10, clock=lambda: now[0])
    broken = add(registry, Role.DECODE, 1, FP32)
    healthy = add(registry, Role.DECODE, 2, FP32, Load(num_running=5))
    add(registry, Role.PREFILL, 3, FP32)
    for _ in range(broken.breaker.failure_threshold):
        registry.record_failure(broken)
    assert broken not in registry.routable()
    assert route(QUERY, registry.routable(), least_loaded, 8).decode.worker_id == healthy.worker_id
    assert registry.find(broken.worker_id) is broken and registry.find("", "127.0.0.1:2") is healthy
    assert registry.find("gone", "127.0.0.1:1") is None  # an id that is not live never matches by address


def test_a_retry_avoids_the_workers_it_failed_on_unless_its_role_has_no_other():
    registry = Registry(lease_s=10)
    failed_decode = add(registry, Role.DECODE, 1, FP32)  # the idlest, but this request failed there
    other_decode = add(registry, Role.DECODE, 2, FP32, Load(num_running=3))
    lone_prefill = add(registry, Role.PREFILL, 3, FP32)
    retry = RouteQuery("r1", (1, 2, 3), avoid_worker_ids=frozenset({failed_decode.worker_id,
                                                                     lone_prefill.worker_id}))
    plan = route(retry, registry.workers(), least_loaded, 8)
    assert (plan.decode.worker_id, plan.prefill.worker_id) == (other_decode.worker_id, lone_prefill.worker_id)
    assert route(QUERY, registry.workers(), least_loaded, 8).decode.worker_id == failed_decode.worker_id


def add_colocated(registry, port, layout, load=Load()):
    worker = registry.register(WorkerSpec(Role.DECODE, f"127.0.0.1:{port}", layout=layout, colocated=True))
    registry.heartbeat(worker.worker_id, load)
    return worker


@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_colocated_workers_are_routed_to_alone_and_prefill_every_prompt(policy):
    registry = Registry(lease_s=10)
    busy = add_colocated(registry, 1, FP32, Load(num_running=3))
    idle = add_colocated(registry, 2, FP32)
    long_prompt = RouteQuery("r1", tuple(range(1, 200)))
    plan = route(long_prompt, registry.workers(), get_policy(policy), 8)
    assert plan.prefill is None and plan.local_prefill
    # round_robin is blind to load: its first turn is the first registered
    assert plan.decode.worker_id == (busy if policy == "round_robin" else idle).worker_id


@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_a_colocated_worker_is_never_paired_with_a_prefill_worker(policy):
    registry = Registry(lease_s=10)
    colocated = add_colocated(registry, 1, FP32)
    decode = add(registry, Role.DECODE, 2, FP32, Load(num_waiting=5))
    prefill = add(registry, Role.PREFILL, 3, FP32)
    pairs = set()
    for i in range(8):
        plan = route(RouteQuery(f"r{i}", tuple(range(1, 100))), registry.workers(), get_policy(policy), 16)
        registry.routed(plan.decode, 99)
        pairs.add((plan.prefill.worker_id if plan.prefill else None, plan.decode.worker_id, plan.local_prefill))
    assert pairs <= {(prefill.worker_id, decode.worker_id, False), (None, colocated.worker_id, True)}
    registry.deregister(decode.worker_id)
    plan = route(QUERY, registry.workers(), get_policy(policy), 16)  # the prefill worker has no partner now
    assert plan.prefill is None and plan.decode.worker_id == colocated.worker_id and plan.local_prefill


def test_only_a_decode_worker_can_be_colocated():
    with pytest.raises(InvalidArgumentError, match="only a DECODE worker can be colocated"):
        WorkerSpec(Role.PREFILL, "127.0.0.1:1", layout=FP32, colocated=True).validate()


FP32_B32 = Layout("tiny", "float32", 32, 2, 2, 8)


@pytest.mark.parametrize("prefill_layout,decode_layout", [(FP32, FP32_B32), (FP32_B32, FP32)])
def test_layouts_that_differ_only_in_block_size_are_paired(prefill_layout, decode_layout):
    registry = Registry(lease_s=10)
    decode = add(registry, Role.DECODE, 1, decode_layout)
    prefill = add(registry, Role.PREFILL, 2, prefill_layout)
    add(registry, Role.PREFILL, 3, BF16)  # maps onto no decode worker: never chosen
    for _ in range(3):
        plan = route(QUERY, registry.workers(), least_loaded, 8)
        assert (plan.decode.worker_id, plan.prefill.worker_id) == (decode.worker_id, prefill.worker_id)


@pytest.mark.parametrize("decode_layout,reason", [
    (BF16, "dtype 'float32' != 'bfloat16'"),
    (Layout("tiny", "float32", 32, 2, 1, 16), "num_kv_heads 2 != 1; head_dim 8 != 16"),
    (Layout("tiny", "float32", 16, 3, 2, 8), "num_layers 2 != 3"),
])
def test_a_pair_that_cannot_be_mapped_is_refused_naming_what_differs(decode_layout, reason):
    registry = Registry(lease_s=10)
    add(registry, Role.DECODE, 1, decode_layout)
    add(registry, Role.PREFILL, 2, FP32)
    with pytest.raises(UnavailableError) as refused:
        route(QUERY, registry.workers(), least_loaded, 8)
    assert "equal but for the block size" in str(refused.value) and reason in str(refused.value)
    assert "prefill tiny:float32 L2 H2x8 B16 -> decode" in str(refused.value)


def test_registration_says_when_a_worker_maps_onto_no_peer_of_its_model():
    from kvmesh.services.scheduler.router import unpairable

    registry = Registry(lease_s=10)
    decode = add(registry, Role.DECODE, 1, BF16)
    assert unpairable(decode, registry.workers()) == ""  # no prefill worker of its model yet: nothing to say
    prefill = add(registry, Role.PREFILL, 2, FP32)
    assert "dtype 'float32' != 'bfloat16'" in unpairable(prefill, registry.workers())
    assert unpairable(add(registry, Role.PREFILL, 3, Layout("tiny", "bfloat16", 32, 2, 2, 8)), registry.workers()) == ""
    assert unpairable(add(registry, Role.PREFILL, 4, OTHER), registry.workers()) == ""  # another model: no peer


def test_scheduler_stats_say_which_worker_pairs_with_no_peer_and_why():
    from kvmesh.services.scheduler.explain import stats

    registry = Registry(lease_s=10)
    decode = add(registry, Role.DECODE, 1, BF16)
    prefill = add(registry, Role.PREFILL, 2, FP32)
    models = {m.worker_id: m for m in stats(registry, "least_loaded").models}
    assert "dtype 'float32' != 'bfloat16'" in models[prefill.worker_id].unpaired
    assert "dtype 'bfloat16' != 'float32'" in models[decode.worker_id].unpaired
    add(registry, Role.PREFILL, 3, BF16)  # now the decode worker has a peer; the float32 prefill still has none
    models = {m.worker_id: m for m in stats(registry, "least_loaded").models}
    assert models[decode.worker_id].unpaired == "" and models[prefill.worker_id].unpaired != ""
