"""slo_aware as a pure function on synthetic worker states and fitted models: the KV source weighed against
recomputing, queues against transfers, local prefill, and refusal with a retry-after when no route meets the SLO."""

import pytest

from kvmesh.services.common.errors import CapacityError
from kvmesh.services.cost_model import DecodeModel, PrefillModel
from kvmesh.services.kv_identity import KVLayout
from kvmesh.services.scheduler import explain
from kvmesh.services.scheduler.models import Fit
from kvmesh.services.scheduler.policies import POLICIES, Links, RouteQuery, slo_aware
from kvmesh.services.scheduler.registry import Load, Registry, Role, WorkerSpec
from kvmesh.services.scheduler.router import group_by_layout, route

# 2 layers x 2 heads x 64 dims x fp32: 2 KiB of KV per token
LAYOUT = KVLayout("tiny", "float32", 16, 2, 2, 64)
PROMPT = tuple(range(1, 4001))  # 4,000 tokens
FAST = Fit(PrefillModel(0.005, 1e-4, 0.0), DecodeModel(0.01, 1e-3, 1e-7), 64)  # 10,000 prompt tokens/s


def add(registry, role, port, load=Load(), fit=FAST, **spec):
    worker = registry.register(WorkerSpec(role, f"127.0.0.1:{port}", layout=LAYOUT, **spec))
    registry.heartbeat(worker.worker_id, load)
    worker.steps.fit = fit  # as if fitted from its heartbeats
    return worker


def test_a_fetch_from_ssd_is_refused_when_recomputing_is_predicted_faster():
    registry = Registry(lease_s=10)
    add(registry, Role.PREFILL, 1)
    add(registry, Role.DECODE, 2)
    slow_ssd = Links(ssd_gbps=0.01)  # 3,200 tokens of 2 KiB from a 10 MB/s tier: 0.66 s; recomputing: 0.4 s
    query = RouteQuery("r", PROMPT, cached_tokens={LAYOUT: 3200}, cached_ssd_tokens={LAYOUT: 3200}, links=slow_ssd)
    plan = route(query, registry.workers(), slo_aware, max_queue=8)
    assert plan.kv_source == "recompute" and plan.num_cached_tokens == 0 and "recompute" in plan.why
    # the same hit in DRAM (4 GB/s: 2 ms) is fetched
    dram = RouteQuery("r", PROMPT, cached_tokens={LAYOUT: 3200}, links=slow_ssd)
    plan = route(dram, registry.workers(), slo_aware, max_queue=8)
    assert plan.kv_source == "cache" and plan.num_cached_tokens == 3200 and plan.predicted_ttft_s < 0.2


def test_a_busy_holder_of_the_prompt_loses_to_an_idle_worker_when_the_transfer_saves_less_than_the_queue():
    registry = Registry(lease_s=10)
    add(registry, Role.PREFILL, 1)
    # holds 3,984 of the 4,000 tokens, but prefills 20,000 tokens of others first and runs a batch of 48
    holder = add(registry, Role.DECODE, 2, Load(num_running=48, num_pending_prefill=5,
                                                num_pending_prefill_tokens=20_000))
    idle = add(registry, Role.DECODE, 3)
    query = RouteQuery("r", PROMPT, decode_cached_tokens={holder.worker_id: 3984})
    plan = route(query, registry.workers(), slo_aware, max_queue=64)
    # the prefill worker pulls the holder's 3,984 tokens from its pool (8 MB at 8 GB/s + 2 ms: 3 ms) rather than
    # recompute them (0.4 s): the holder's queue does not stand in the way of a read of its pool
    assert plan.decode.worker_id == idle.worker_id and plan.kv_source == "peer" and not plan.local_prefill
    assert plan.kv_peer is holder and plan.num_cached_tokens == 3984 and "pull 3984 tokens" in plan.why
    # idle again, the holder prefills the 16-token tail itself: no prefill worker, no transfer
    registry.heartbeat(holder.worker_id, Load())
    plan = route(query, registry.workers(), slo_aware, max_queue=64)
    assert plan.decode.worker_id == holder.worker_id and plan.local_prefill and plan.kv_source == "decode_pool"


def test_a_request_no_route_can_serve_within_its_slo_is_refused_with_a_retry_after():
    registry = Registry(lease_s=10)
    backlog = Load(num_pending_prefill_tokens=30_000, num_pending_prefill=6, num_running=6)  # 3 s of prompts
    add(registry, Role.PREFILL, 1, backlog)
    add(registry, Role.DECODE, 2, backlog)  # prefilling locally would wait as long
    query = RouteQuery("r", PROMPT, slo_ttft_s=1.0)
    with pytest.raises(CapacityError, match="no route is predicted to meet") as refused:
        route(query, registry.workers(), slo_aware, max_queue=8)
    assert 1.5 < refused.value.retry_after_s < 3.0  # the backlog's drain beyond the 1 s objective
    relaxed = RouteQuery("r", PROMPT, slo_ttft_s=5.0)
    assert 3.0 < route(relaxed, registry.workers(), slo_aware, max_queue=8).predicted_ttft_s < 5.0


def test_the_tpot_slo_keeps_a_request_off_a_decode_worker_whose_batch_would_be_too_slow():
    registry = Registry(lease_s=10)
    add(registry, Role.PREFILL, 1)
    busy = add(registry, Role.DECODE, 2, Load(num_running=60))  # 0.01 + 61e-3 s a step with this one: 71 ms
    light = add(registry, Role.DECODE, 3, Load(num_running=20))
    query = RouteQuery("r", PROMPT, slo_tpot_s=0.05)
    plan = route(query, registry.workers(), slo_aware, max_queue=64)
    assert plan.decode.worker_id == light.worker_id and plan.predicted_tpot_s <= 0.05
    with pytest.raises(CapacityError):
        route(RouteQuery("r", PROMPT, slo_tpot_s=0.02), registry.workers(), slo_aware, max_queue=64)
    assert busy.num_routed == 0


def test_long_prefill_queues_send_the_prompt_to_the_decode_worker_within_its_tpot_headroom():
    registry = Registry(lease_s=10)
    add(registry, Role.PREFILL, 1, Load(num_running=4, num_pending_prefill_tokens=40_000))  # 4 s of queue
    decode = add(registry, Role.DECODE, 2, Load(num_running=2))
    plan = route(RouteQuery("r", PROMPT, slo_tpot_s=0.5), registry.workers(), slo_aware, max_queue=8)
    assert plan.decode.worker_id == decode.worker_id and plan.local_prefill and plan.kv_source == "local"
    # a TPOT objective the chunked local prefill would break keeps it on the prefill worker
    strict = RouteQuery("r", PROMPT, slo_tpot_s=0.02)
    plan = route(strict, registry.workers(), slo_aware, max_queue=8)
    assert not plan.local_prefill and plan.prefill is not None
    # without a TPOT objective nothing bounds what its batch would suffer: not even an idle worker prefills for a queue
    assert not route(RouteQuery("r", PROMPT), registry.workers(), slo_aware, max_queue=8).local_prefill
    registry.heartbeat(decode.worker_id, Load())
    assert not route(RouteQuery("r", PROMPT), registry.workers(), slo_aware, max_queue=8).local_prefill


def test_the_plan_carries_a_bounded_list_of_the_candidates_it_weighed():
    registry = Registry(lease_s=10)
    for port in range(1, 13):
        add(registry, Role.PREFILL, port)
        add(registry, Role.DECODE, 100 + port, Load(num_running=port))
    plan = slo_aware(RouteQuery("r", PROMPT), group_by_layout(RouteQuery("r", PROMPT), registry.workers()))
    assert 0 < len(plan.candidates) <= 8 and plan.candidates[0].ttft_s == plan.predicted_ttft_s
    assert POLICIES["slo_aware"] is slo_aware


class FakeSpan:
    def __init__(self):
        self.attributes, self.events = {}, []

    def set_attributes(self, attributes):
        self.attributes.update(attributes)

    def add_event(self, name, attributes):
        self.events.append((name, attributes))


def test_the_route_span_records_the_kv_source_why_and_each_weighed_candidates_predictions():
    registry = Registry(lease_s=10)
    for port in range(1, 13):
        add(registry, Role.PREFILL, port)
        add(registry, Role.DECODE, 100 + port, Load(num_running=port))
    query = RouteQuery("r", PROMPT, cached_tokens={LAYOUT: 3200})
    plan = route(query, registry.workers(), slo_aware, max_queue=8)
    span = FakeSpan()
    explain.record_plan(span, plan)
    assert span.attributes[explain.ATTR_KV_SOURCE] == "cache"
    assert "fetch 3200 tokens" in span.attributes[explain.ATTR_WHY]
    assert span.attributes[explain.ATTR_PREDICTED_TTFT] == plan.predicted_ttft_s > 0
    # 12 or more weighed, the best 8 kept
    assert len(span.events) == 8 and sum(e["chosen"] for _, e in span.events) == 1
    assert all(e["predicted_ttft_s"] >= plan.predicted_ttft_s for _, e in span.events)


def test_a_peer_pull_is_weighed_against_recomputing_and_the_cache():
    registry = Registry(lease_s=10)
    prefill = add(registry, Role.PREFILL, 1)
    holder = add(registry, Role.DECODE, 2)
    query = RouteQuery("r", PROMPT, decode_cached_tokens={holder.worker_id: 1600}, cached_tokens={LAYOUT: 3200})
    plan = route(query, registry.workers(), slo_aware, max_queue=8)
    assert plan.kv_source == "cache" and plan.num_cached_tokens == 3200 and plan.kv_peer is None  # the cache holds more
    slow = Links(transfer_gbps=0.001, dram_gbps=0.001)  # 1 MB/s: pulling 1,600 tokens (3.2 MB) takes 3 s
    query = RouteQuery("r", PROMPT, decode_cached_tokens={holder.worker_id: 1600}, links=slow)
    plan = route(query, registry.workers(), slo_aware, max_queue=8)
    assert plan.kv_source == "recompute" and plan.kv_peer is None
    assert prefill is plan.prefill


def test_a_peer_of_another_layout_is_never_pulled_from():
    registry = Registry(lease_s=10)
    add(registry, Role.PREFILL, 1)
    decode = add(registry, Role.DECODE, 2)
    other = registry.register(WorkerSpec(Role.DECODE, "127.0.0.1:3", layout=KVLayout("tiny", "float32", 32, 2, 2, 64)))
    registry.heartbeat(other.worker_id, Load())
    query = RouteQuery("r", PROMPT, decode_cached_tokens={other.worker_id: 3200})  # chained in 32-token blocks
    plan = route(query, registry.workers(), slo_aware, max_queue=8)
    assert plan.kv_source == "recompute" and plan.kv_peer is None and plan.decode in (decode, other)


def test_a_burst_is_priced_by_each_queued_prompts_attention_too():
    """A fit whose cost sits in the quadratic (attention) part, as one prompt length makes it: every prompt routed
    since the heartbeat adds its whole predicted compute to the next one's wait, so a burst past the TTFT
    objective is refused rather than admitted on linear terms that price each queued prompt near zero."""
    registry = Registry(lease_s=10)
    quadratic = Fit(PrefillModel(0.0, 0.0, 1e-5), DecodeModel(0.01, 1e-3, 1e-7), 64)  # 256 tokens: 0.655 s
    prefill = add(registry, Role.PREFILL, 1, fit=quadratic)
    add(registry, Role.DECODE, 2, fit=quadratic, local_prefill_max_tokens=0)
    prompt = tuple(range(1, 257))
    one = 1e-5 * 256 * 256
    plans = []
    with pytest.raises(CapacityError):
        for i in range(10):
            plan = route(RouteQuery(f"r{i}", prompt, slo_ttft_s=2.0), registry.workers(), slo_aware, max_queue=64)
            registry.routed(plan.prefill, len(prompt))
            plans.append(plan)
    assert len(plans) == 3  # 3 x 0.655 s fits 2 s; the 4th would start after 1.97 s of queue
    for k, plan in enumerate(plans):
        assert plan.predicted_ttft_s == pytest.approx((k + 1) * one, abs=0.05)
    assert prefill.num_routed == 3


def test_a_refusal_before_the_cache_probe_is_one_every_cache_outcome_would_give():
    """check_floors (asked before the scheduler's cache probe) refuses only what route refuses, under every policy,
    whatever the probe would have found: no hit, a partial or full hit in DRAM or on SSD, a decode worker's pool."""
    import random

    from kvmesh.services.scheduler.slo_aware import check_floors

    rng = random.Random(7)
    early = admitted = 0
    for trial in range(300):
        registry = Registry(lease_s=10)
        for port in range(1, 1 + rng.randint(0, 2)):
            prefill_fit = Fit(PrefillModel(rng.uniform(0, 0.02), rng.uniform(0, 4e-4), rng.uniform(0, 1e-7)),
                              FAST.decode, 64)
            add(registry, Role.PREFILL, port, Load(num_running=rng.randint(0, 4), num_pending_prefill=rng.randint(
                0, 4), num_pending_prefill_tokens=rng.randint(0, 30_000)), fit=prefill_fit)
        colocated = not registry.workers()
        for port in range(10, 10 + rng.randint(1, 2)):
            decode_fit = Fit(FAST.prefill, DecodeModel(rng.uniform(0, 0.02), rng.uniform(0, 2e-3), 1e-7), 64)
            add(registry, Role.DECODE, port, Load(num_running=rng.randint(0, 40), num_pending_prefill=rng.randint(
                0, 2), num_pending_prefill_tokens=rng.randint(0, 8000)), fit=decode_fit, colocated=colocated)
        n = rng.choice([16, 500, 4000])
        objectives = {"slo_ttft_s": rng.choice([0.0, 0.3, 1.0, 3.0]), "slo_tpot_s": rng.choice([0.0, 0.03, 0.1])}
        query = RouteQuery(f"r{trial}", PROMPT[:n], max_tokens=64, **objectives)
        groups = group_by_layout(query, registry.workers())
        try:
            check_floors(query, groups)
        except CapacityError as refused:
            early += 1
            assert "whatever the cache holds" in str(refused) and refused.retry_after_s > 0
            decodes = [w.worker_id for w in registry.workers(Role.DECODE)]
            for hit, ssd, held in [(0, 0, 0), (n // 2, 0, 0), (n - 1, 0, 0), (n - 1, n - 1, 0), (n, 0, 0),
                                   (0, 0, n - 1), (0, 0, n), (n // 2, n // 4, n // 2)]:
                outcome = RouteQuery(query.request_id, query.prompt_token_ids, max_tokens=64, **objectives,
                                     cached_tokens={LAYOUT: hit}, cached_ssd_tokens={LAYOUT: ssd},
                                     decode_cached_tokens={d: held for d in decodes})
                for name in POLICIES:
                    with pytest.raises(CapacityError):
                        route(outcome, registry.workers(), POLICIES[name], max_queue=64)
        else:
            admitted += 1
    assert early > 30 and admitted > 30  # both sides of the floor were tried


def test_the_floor_never_exceeds_the_best_ttft_any_cache_outcome_gives():
    """The floor's soundness at its edge: a TTFT objective equal to the least TTFT slo_aware predicts over the
    cache outcomes (a prompt held whole by a decode worker's pool among them) is never refused before the probe."""
    import random

    from kvmesh.services.scheduler.slo_aware import check_floors

    rng = random.Random(11)
    for trial in range(200):
        registry = Registry(lease_s=10)
        add(registry, Role.PREFILL, 1, Load(num_running=2, num_pending_prefill=2,
                                             num_pending_prefill_tokens=rng.randint(0, 30_000)))
        for port in (10, 11):
            add(registry, Role.DECODE, port, Load(num_running=rng.randint(0, 40), num_pending_prefill=1,
                                                  num_pending_prefill_tokens=rng.randint(0, 8000)))
        n = rng.choice([16, 500, 4000])
        decodes = [w.worker_id for w in registry.workers(Role.DECODE)]
        best = min(route(RouteQuery("r", PROMPT[:n], max_tokens=64, cached_tokens={LAYOUT: hit},
                                    decode_cached_tokens={d: held for d in decodes}),
                         registry.workers(), slo_aware, max_queue=64).predicted_ttft_s
                   for hit, held in [(0, 0), (n, 0), (0, n), (n // 2, n - 1)])
        query = RouteQuery("r", PROMPT[:n], max_tokens=64, slo_ttft_s=best)
        check_floors(query, group_by_layout(query, registry.workers()))  # must not raise
        with pytest.raises(CapacityError):  # and the floor is not far below: 3 x under the best is refused
            tight = RouteQuery("r", PROMPT[:n], max_tokens=64, slo_ttft_s=best / 3)
            check_floors(tight, group_by_layout(tight, registry.workers()))
