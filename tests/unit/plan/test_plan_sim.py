"""The simulator against cases worked out by hand, and the scheduler's real router inside it."""

from __future__ import annotations

import pytest

from kvmesh.services.plan.costs import DecodeModel, PrefillModel, Profile
from kvmesh.services.plan.metrics import SLO, predict, request_latencies
from kvmesh.services.plan.sim import MeshConfig, Simulation
from kvmesh.services.plan.trace import Arrival, poisson
from kvmesh.services.plan.worker import RoleLimits

PREFILL = PrefillModel(a=0.01, b=0.001, c=1e-6)
DECODE = DecodeModel(a=0.02, b=0.005, c=0.0)
# 1,000 KV bytes a token at 1 GB/s: a microsecond a token
PROFILE = Profile(PREFILL, DECODE, kv_bytes_per_token=1000, transfer_gbps=1.0)


def run(config: MeshConfig, arrivals, profile: Profile = PROFILE):
    return Simulation(profile, config, arrivals).run()


def test_one_request_alone_ttft_is_prefill_plus_transfer():
    result = run(MeshConfig(prefill=1, decode=1), [Arrival(0.0, 200, 1)])
    expected = 0.01 + 0.001 * 200 + 1e-6 * 200 ** 2 + 200e-6
    assert result.first_token_s[0] == pytest.approx(expected)
    assert result.finish_s[0] == pytest.approx(expected)  # one output token: nothing to decode


def test_decode_tpot_at_batch_one_equals_the_fitted_step_time():
    result = run(MeshConfig(prefill=1, decode=1), [Arrival(0.0, 100, 11)])
    ttft, tpot, served = request_latencies(result)
    assert served.all()
    assert tpot[0] == pytest.approx((0.02 + 0.005 * 1) * 1000.0)


def test_tpot_grows_with_context_as_the_model_says():
    profile = Profile(PREFILL, DecodeModel(0.02, 0.005, 1e-5), 1000, 1.0)
    result = run(MeshConfig(prefill=1, decode=1), [Arrival(0.0, 100, 4)], profile)
    # three decode steps with 101, 102, 103 tokens of context
    steps = sum(0.025 + 1e-5 * ctx for ctx in (101, 102, 103))
    assert result.finish_s[0] - result.first_token_s[0] == pytest.approx(steps)


def test_two_prompts_arriving_together_share_one_prefill_step_within_the_budget():
    config = MeshConfig(prefill=1, decode=1, prefill_limits=RoleLimits(64, 512))
    result = run(config, [Arrival(0.0, 200, 1), Arrival(0.0, 200, 1)])
    step = 0.01 + 0.001 * 400 + 1e-6 * 2 * 200 ** 2
    assert result.first_token_s == pytest.approx((step + 200e-6, step + 200e-6))


def test_two_prompts_over_the_budget_queue_and_the_second_is_chunked():
    config = MeshConfig(prefill=1, decode=1, prefill_limits=RoleLimits(64, 300))
    result = run(config, [Arrival(0.0, 200, 1), Arrival(0.0, 200, 1)])
    # step 1: all of the first prompt and 100 tokens of the second; step 2: the second's last 100
    step1 = 0.01 + 0.001 * 300 + 1e-6 * (200 ** 2 + 100 ** 2)
    step2 = 0.01 + 0.001 * 100 + 1e-6 * (200 ** 2 - 100 ** 2)
    assert result.first_token_s[0] == pytest.approx(step1 + 200e-6)
    assert result.first_token_s[1] == pytest.approx(step1 + step2 + 200e-6)


def test_colocated_prefill_then_decodes_in_its_own_batch():
    result = run(MeshConfig(colocated=1), [Arrival(0.0, 100, 3)])
    assert result.first_token_s[0] == pytest.approx(0.01 + 0.1 + 1e-6 * 100 ** 2)  # no transfer
    assert result.finish_s[0] - result.first_token_s[0] == pytest.approx(2 * 0.025)


def test_a_colocated_step_pays_decodes_and_chunks_together():
    config = MeshConfig(colocated=1, decode_limits=RoleLimits(8, 2048))
    result = run(config, [Arrival(0.0, 100, 50), Arrival(0.13, 100, 1)])
    first = 0.01 + 0.1 + 0.01  # the first prompt alone
    # the second arrives during the first's first decode step; the next step decodes one and prefills 100
    # (one forward pass: the larger intercept, 0.02, not both)
    mixed = 0.02 + 0.005 + 0.1 + 0.01
    assert result.first_token_s[1] == pytest.approx(first + 0.025 + mixed)


def test_a_repeated_prefix_is_fetched_not_recomputed():
    blocks = (1, 2)
    arrivals = [Arrival(0.0, 1024, 1, blocks), Arrival(10.0, 1024, 1, blocks)]
    cached = run(MeshConfig(prefill=1, decode=1), arrivals)
    cold = run(MeshConfig(prefill=1, decode=1, cache=False), arrivals)
    assert cold.first_token_s[1] - 10.0 == pytest.approx(cold.first_token_s[0])
    # 1,008 of the 1,024 tokens come from the cache (whole blocks; the last token is always computed)
    expected = 1008e-6 + 0.01 + 0.001 * 16 + 1e-6 * (1024 ** 2 - 1008 ** 2) + 1024e-6
    assert cached.first_token_s[1] - 10.0 == pytest.approx(expected)


def test_every_route_is_made_by_the_named_real_policy():
    arrivals = poisson(50.0, 64, 8, 200)
    for policy in ("least_loaded", "kv_aware"):
        result = run(MeshConfig(prefill=2, decode=2, policy=policy), arrivals)
        assert set(result.routes) == {(policy, False)}  # admission may refuse a few of the burst (max_queue)
        assert sum(result.routes.values()) + sum(result.rejected) == 200 and sum(result.rejected) < 10
    colocated = run(MeshConfig(colocated=2, policy="kv_aware"), arrivals)
    assert set(colocated.routes) == {("kv_aware", True)}  # no prefill worker in the plan
    # admission counts the colocated workers' queued prompts: some of the burst is refused, not all admitted
    assert sum(colocated.routes.values()) + sum(colocated.rejected) == 200 and sum(colocated.rejected) > 0


def test_a_burst_between_heartbeats_spreads_by_what_the_registry_counted_as_routed():
    burst = [Arrival(0.0, 64, 100) for _ in range(4)]
    sim = Simulation(PROFILE, MeshConfig(prefill=1, decode=2, heartbeat_s=1.0), burst)
    sim.run()
    # no heartbeat between them shows a load: only Registry.routed's count spreads them (least_loaded's rule)
    assert [sim.decode.index(job.decode) for job in sim.jobs] == [0, 1, 0, 1]


def test_policies_route_the_same_trace_differently():
    """least_loaded weighs load, round_robin takes turns: on one trace they pick different workers."""
    arrivals = poisson(6.0, 128, 48, 300, seed=2)
    chosen = {}
    for policy in ("least_loaded", "round_robin"):
        sim = Simulation(PROFILE, MeshConfig(prefill=1, decode=2, policy=policy, heartbeat_s=0.5), arrivals)
        sim.run()
        chosen[policy] = [sim.decode.index(job.decode) for job in sim.jobs]
    assert chosen["least_loaded"] != chosen["round_robin"]


def test_admission_rejects_past_the_queue_limit_as_the_router_does():
    burst = [Arrival(0.0, 64, 2) for _ in range(10)]
    result = run(MeshConfig(prefill=1, decode=1, max_queue=4, heartbeat_s=0), burst)
    assert sum(result.rejected) == 6
    assert all(f > 0 for f, r in zip(result.finish_s, result.rejected) if not r)


def test_goodput_counts_requests_meeting_both_slos_over_the_span():
    arrivals = [Arrival(0.0, 100, 11), Arrival(1.0, 100, 11)]
    result = run(MeshConfig(prefill=1, decode=1), arrivals)
    ttft, tpot, _ = request_latencies(result)
    loose = predict(result, SLO(ttft_ms=1e6, tpot_ms=1e6))
    assert loose.attainment == 1.0
    span = result.finish_s[1] - 0.0
    assert loose.goodput_rps == pytest.approx(2 / span)
    tight = predict(result, SLO(ttft_ms=ttft.max() + 1, tpot_ms=tpot.min() - 1))  # TPOT misses for both
    assert tight.attainment == 0.0 and tight.goodput_rps == 0.0
    assert loose.ttft_ms["p50"] == pytest.approx(float(ttft.mean()), rel=1e-3)


def test_ten_thousand_requests_are_all_accounted_for():
    arrivals = poisson(20.0, 256, 64, 10_000, seed=3)
    for config in (MeshConfig(prefill=1, decode=1), MeshConfig(colocated=2)):
        result = run(config, arrivals)
        assert len(result.finish_s) == 10_000
        done = [f >= a for f, a, r in zip(result.finish_s, result.arrival_s, result.rejected) if not r]
        assert all(done) and len(done) + sum(result.rejected) == 10_000


def test_a_mesh_without_a_pair_is_refused():
    with pytest.raises(ValueError):
        MeshConfig(prefill=1, decode=0).validate()
    with pytest.raises(ValueError):
        MeshConfig(prefill=1, decode=1, colocated=1).validate()


def test_landed_kv_joins_the_decode_batch_whatever_max_num_seqs():
    burst = [Arrival(0.0, 64, 5) for _ in range(3)]
    config = MeshConfig(prefill=1, decode=1, decode_limits=RoleLimits(1, 2048))
    result = run(config, burst)
    # all three prefill in one step, land together and decode as one batch of three (add_prefilled's rule)
    assert len(set(result.first_token_s)) == 1 and len(set(result.finish_s)) == 1
    assert result.finish_s[0] - result.first_token_s[0] == pytest.approx(4 * (0.02 + 0.005 * 3))


def test_the_trace_block_size_sets_how_much_a_repeated_hash_id_spares():
    arrivals = [Arrival(0.0, 1024, 1, (7, 8)), Arrival(10.0, 1024, 1, (7, 9))]  # the first block repeats
    small = Simulation(PROFILE, MeshConfig(prefill=1, decode=1, trace_block_tokens=64), arrivals)
    small.run()
    assert small.jobs[1].num_cached == 64
    default = Simulation(PROFILE, MeshConfig(prefill=1, decode=1), arrivals)
    default.run()
    assert default.jobs[1].num_cached == 512


def test_slo_aware_prefills_on_the_decode_worker_when_the_prefill_queue_is_long_and_every_request_finishes():
    arrivals = poisson(40.0, 512, 4, 200, seed=3)  # more prompt work than one prefill worker keeps up with
    result = run(MeshConfig(prefill=1, decode=1, policy="slo_aware", heartbeat_s=0.0, slo_tpot_s=0.5), arrivals)
    local = result.routes[("slo_aware", True)]
    assert 0 < local < 200 and result.routes[("slo_aware", False)] > 0
    assert all(f >= a for f, a, r in zip(result.finish_s, result.arrival_s, result.rejected) if not r)
    idle = run(MeshConfig(prefill=1, decode=1, policy="slo_aware", heartbeat_s=0.0), poisson(0.5, 512, 4, 20))
    assert idle.routes == {("slo_aware", False): 20}  # no queue: every prompt goes to the prefill worker


def test_a_pack_limit_gives_each_prompt_its_own_step_as_the_engine_does():
    config = MeshConfig(prefill=1, decode=1, prefill_limits=RoleLimits(64, 512, pack_prompt_tokens=64))
    result = run(config, [Arrival(0.0, 200, 1), Arrival(0.0, 200, 1)])
    step = 0.01 + 0.001 * 200 + 1e-6 * 200 ** 2  # one prompt per step: the first's token comes a step sooner
    assert result.first_token_s == pytest.approx((step + 200e-6, 2 * step + 200e-6))
