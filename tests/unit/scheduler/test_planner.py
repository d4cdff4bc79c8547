"""The planner's decision as a pure function: the window's mix decides the split, the threshold and the hold time
hold it back, the least-loaded workers flip, and a scaler is asked only for what flips cannot do."""

from __future__ import annotations

import pytest

from kvmesh.services.kv_identity import KVLayout
from kvmesh.services.plan.costs import DecodeModel, PrefillModel, Profile
from kvmesh.services.plan.metrics import SLO
from kvmesh.services.plan.sim import MeshConfig
from kvmesh.services.plan.trace import Arrival
from kvmesh.services.scheduler import planner
from kvmesh.services.scheduler.planner import Changes, PlannerSettings, Split, changes, decide
from kvmesh.services.scheduler.planner_window import ArrivalWindow, WindowStats
from kvmesh.services.scheduler.registry import Load, Registry, Role, WorkerSpec

# the scheduler's priors: ~4,000 prompt tokens/s per worker, a 20 ms decode step growing with the batch
PROFILE = Profile(PrefillModel(0.005, 2.5e-4, 0.0), DecodeModel(0.02, 1e-3, 1e-6), 1000, 8.0)
SLO_MS = SLO(ttft_ms=2000, tpot_ms=50)
BASE = MeshConfig(prefill=1, decode=1, cache=False, policy="least_loaded", heartbeat_s=0)
PROMPT_HEAVY = WindowStats(8.0, ((1000, 4),) * 100)  # long prompts, a few tokens out: prefill-bound
DECODE_HEAVY = WindowStats(6.0, ((32, 256),) * 100)  # short prompts, long replies: decode-bound
LAYOUT = KVLayout("m", "float32", 16, 1, 1, 1)


def _predict(stats: WindowStats, num_flexible: int = 4, settings: PlannerSettings = PlannerSettings()):
    arrivals = planner.workload(stats, 60.0, settings.max_sim_requests)
    splits = planner.candidate_splits(Split(0, 0), num_flexible, settings)
    return planner.simulate_splits(PROFILE, arrivals, splits, SLO_MS, BASE)


def test_a_prompt_heavy_window_flips_workers_to_prefill():
    decision = decide(Split(2, 2), _predict(PROMPT_HEAVY), now=100.0, last_change_at=None,
                      settings=PlannerSettings())
    assert decision.action == "flip"
    assert decision.target.prefill > 2 and decision.target.total == 4
    assert decision.target_goodput > 1.1 * decision.current_goodput
    assert decision.changes.to_prefill == decision.target.prefill - 2 and decision.changes.to_decode == 0


def test_a_decode_heavy_window_flips_workers_to_decode():
    decision = decide(Split(2, 2), _predict(DECODE_HEAVY), now=100.0, last_change_at=None,
                      settings=PlannerSettings())
    assert decision.action == "flip"
    assert decision.target == Split(1, 3)
    assert decision.changes == Changes(to_decode=1)
    assert decision.gain > 0.1


def test_the_split_the_window_needs_is_kept():
    decision = decide(Split(1, 3), _predict(DECODE_HEAVY), now=100.0, last_change_at=None,
                      settings=PlannerSettings())
    assert decision.action == "keep" and decision.target == Split(1, 3)


def test_a_gain_below_the_threshold_changes_nothing():
    predicted = {Split(1, 3): 1.05, Split(2, 2): 1.0, Split(3, 1): 0.5}
    decision = decide(Split(2, 2), predicted, 100.0, None, PlannerSettings(threshold=0.1))
    assert decision.action == "keep" and decision.target == Split(2, 2)
    assert decide(Split(2, 2), predicted, 100.0, None, PlannerSettings(threshold=0.02)).action == "flip"


def test_the_hold_time_is_respected():
    predicted = {Split(1, 3): 2.0, Split(2, 2): 1.0, Split(3, 1): 0.5}
    held = decide(Split(2, 2), predicted, now=100.0, last_change_at=50.0, settings=PlannerSettings(hold_s=60))
    assert held.action == "hold" and held.target == Split(1, 3) and "hold 60 s" in held.reason
    later = decide(Split(2, 2), predicted, now=111.0, last_change_at=50.0, settings=PlannerSettings(hold_s=60))
    assert later.action == "flip"


def test_equal_goodput_prefers_the_fewest_moves():
    predicted = {Split(1, 5): 2.0, Split(2, 4): 2.0, Split(3, 3): 1.0, Split(4, 2): 0.5, Split(5, 1): 0.1}
    decision = decide(Split(4, 2), predicted, 0.0, None, PlannerSettings())
    assert decision.target == Split(2, 4) and decision.changes.to_decode == 2


def test_a_mesh_without_a_role_counts_as_serving_nothing():
    decision = decide(Split(0, 4), {Split(1, 3): 1.0, Split(2, 2): 0.5}, 0.0, None, PlannerSettings())
    assert decision.action == "flip" and decision.target == Split(1, 3) and decision.current_goodput == 0.0


def test_with_a_scaler_a_bigger_mesh_is_asked_for():
    settings = PlannerSettings(max_workers=5, can_scale=True)
    decision = decide(Split(2, 2), _predict(DECODE_HEAVY, 4, settings), 0.0, None, settings)
    assert decision.action == "scale"
    assert decision.target.total == 5 and decision.target.decode >= 3
    assert sum(n for _, n in decision.changes.add) >= 1 and not decision.changes.remove


def test_with_a_scaler_an_idle_mesh_shrinks():
    settings = PlannerSettings(max_workers=4, can_scale=True)
    predicted = {Split(1, 1): 1.0, Split(1, 2): 1.0, Split(2, 1): 1.0, Split(1, 3): 1.0, Split(2, 2): 1.0,
                 Split(3, 1): 1.0}
    decision = decide(Split(2, 2), predicted, 0.0, None, settings)
    assert decision.action == "scale" and decision.target == Split(1, 1)
    assert decision.changes.remove == ((Role.PREFILL, 1), (Role.DECODE, 1))


def test_changes_flip_first_then_scale():
    assert changes(Split(3, 1), Split(1, 3)) == Changes(to_decode=2)
    assert changes(Split(3, 1), Split(2, 3)) == Changes(to_decode=1, add=((Role.DECODE, 1),))
    assert changes(Split(2, 2), Split(1, 2)) == Changes(remove=((Role.PREFILL, 1),))


def test_candidate_splits_keep_the_fixed_workers_and_one_of_each_role():
    assert planner.candidate_splits(Split(0, 0), 3, PlannerSettings()) == [Split(1, 2), Split(2, 1)]
    assert planner.candidate_splits(Split(2, 0), 2, PlannerSettings()) == [Split(2, 2), Split(3, 1)]
    scaled = planner.candidate_splits(Split(0, 0), 2, PlannerSettings(max_workers=3, can_scale=True))
    assert scaled == [Split(1, 1), Split(1, 2), Split(2, 1)]


def test_the_least_loaded_workers_flip():
    registry = Registry(lease_s=60)
    workers = [registry.register(WorkerSpec(Role.PREFILL, f"127.0.0.1:{5000 + i}", layout=LAYOUT))
               for i in range(3)]
    for worker, waiting in zip(workers, (5, 0, 2)):
        registry.heartbeat(worker.worker_id, Load(num_waiting=waiting))
    chosen = planner.choose_flips(workers, Changes(to_decode=2))
    assert [(w.spec.address, role) for w, role in chosen] == [("127.0.0.1:5001", Role.DECODE),
                                                             ("127.0.0.1:5002", Role.DECODE)]


def test_the_window_keeps_only_recent_requests_and_their_rate():
    now = [0.0]
    window = ArrivalWindow(10.0, clock=lambda: now[0])
    for t in range(20):
        now[0] = float(t)
        window.record(100 + t, 0 if t % 2 else 32)
    stats = window.stats()
    assert stats.num_requests == 11  # t = 9 .. 19
    assert stats.rate_per_s == pytest.approx(1.1)
    assert stats.lengths[0] == (109, 128) and stats.lengths[-1] == (119, 128)  # no max_tokens: the default
    assert (110, 32) in stats.lengths


def test_the_synthetic_workload_is_bounded_and_drawn_from_the_window():
    stats = WindowStats(2.0, ((10, 5), (2000, 7)) * 400)
    arrivals = planner.workload(stats, 60.0, max_requests=150)
    assert len(arrivals) == 150
    assert {(a.input_length, a.output_length) for a in arrivals} == {(10, 5), (2000, 7)}
    assert planner.workload(WindowStats(0.0, ()), 60.0, 150) == []


def test_a_young_window_rates_over_its_age_and_an_overflowing_one_over_what_it_holds():
    now = [100.0]
    window = ArrivalWindow(60.0, max_samples=1000, clock=lambda: now[0])
    for i in range(20):  # 20 requests in the scheduler's first 10 s
        now[0] = 100.0 + i / 2
        window.record(10, 10)
    now[0] = 110.0
    assert window.stats().rate_per_s == pytest.approx(2.0)
    burst = ArrivalWindow(60.0, max_samples=10, clock=lambda: now[0])
    for i in range(50):  # 50 in 5 s, only the last 10 kept
        now[0] = 200.0 + i / 10
        burst.record(10, 10)
    assert burst.stats().num_requests == 10 and burst.stats().rate_per_s == pytest.approx(10 / 0.9)


def test_the_backlog_is_the_queued_prompts_and_running_sequences_from_the_heartbeats():
    registry = Registry(lease_s=60)
    prefill = registry.register(WorkerSpec(Role.PREFILL, "127.0.0.1:5000", layout=LAYOUT))
    decode = registry.register(WorkerSpec(Role.DECODE, "127.0.0.1:5001", layout=LAYOUT))
    registry.heartbeat(prefill.worker_id, Load(num_pending_prefill=3, num_pending_prefill_tokens=3000))
    registry.heartbeat(decode.worker_id, Load(num_running=2))
    queued = planner.backlog(registry.workers(), WindowStats(1.0, ((10, 100),)), max_requests=100)
    assert sorted((a.time_s, a.input_length, a.output_length) for a in queued) == \
        [(0.0, 1, 50)] * 2 + [(0.0, 1000, 100)] * 3
    assert len(planner.backlog(registry.workers(), WindowStats(1.0, ((10, 100),)), max_requests=4)) == 4


def test_a_backlog_that_no_split_clears_in_time_is_seen_and_not_counted():
    stats = DECODE_HEAVY
    window = planner.workload(stats, 60.0, 200)
    long_queue = [Arrival(0.0, 1000, 4)] * 40  # 10 s of prefill work for one worker
    splits = [Split(1, 3), Split(3, 1)]
    empty = planner.simulate_splits(PROFILE, window, splits, SLO_MS, BASE)
    queued = planner.simulate_splits(PROFILE, long_queue + window, splits, SLO_MS, BASE, len(long_queue))
    assert empty[Split(1, 3)] > empty[Split(3, 1)]  # the window alone wants decode workers
    assert queued[Split(1, 3)] < empty[Split(1, 3)]  # the queued prompts hold the one prefill worker up
