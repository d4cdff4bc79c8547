"""The simulator with workers that flip roles mid-run: a flipped worker drains what it holds (no request is lost),
then serves in its new role, and flipping to the workload's side pays off."""

from __future__ import annotations

import pytest

from kvmesh.services.plan.costs import DecodeModel, PrefillModel, Profile
from kvmesh.services.plan.flips import FlipSimulation
from kvmesh.services.plan.metrics import SLO, predict
from kvmesh.services.plan.sim import MeshConfig, Simulation
from kvmesh.services.plan.trace import poisson
from kvmesh.services.scheduler.registry import Role

PROFILE = Profile(PrefillModel(0.005, 2.5e-4, 0.0), DecodeModel(0.02, 1e-3, 1e-6), 1000, 8.0)
CONFIG = MeshConfig(prefill=1, decode=3, cache=False, policy="least_loaded", heartbeat_s=0)
PROMPT_HEAVY = poisson(8.0, 1000, 16, 400, seed=1)  # long prompts, short replies: prefill-bound on 1P+3D


def to_prefill_once(count: int):
    """A replan that, at its first round, flips `count` decode workers (the first registered) to prefill."""
    asked = []

    def replan(now, sim):
        if asked:
            return []
        asked.append(now)
        return [(w.worker_id, Role.PREFILL) for w in sim.registry.workers(Role.DECODE)[:count]]

    return replan


def test_flipped_workers_drain_then_serve_in_their_new_role_and_no_request_is_lost():
    sim = FlipSimulation(PROFILE, CONFIG, PROMPT_HEAVY, to_prefill_once(2), interval_s=5.0)
    result = sim.run()
    assert not any(result.rejected)
    assert all(f >= a >= 0 for a, f in zip(result.arrival_s, result.finish_s))  # every request finished
    assert len(sim.flips) == 2 and all(done >= asked == 5.0 and role == Role.PREFILL
                                       for asked, done, role in sim.flips)
    assert sim.split() == (3, 1) and not sim.draining
    assert len(sim.registry.workers(Role.PREFILL)) == 3 and len(sim.registry.workers(Role.DECODE)) == 1


def test_flipping_toward_the_bottleneck_raises_goodput():
    slo = SLO(ttft_ms=2000, tpot_ms=100)
    static = predict(Simulation(PROFILE, CONFIG, PROMPT_HEAVY).run(), slo)
    flipped = predict(FlipSimulation(PROFILE, CONFIG, PROMPT_HEAVY, to_prefill_once(2), 5.0).run(), slo)
    assert flipped.goodput_rps > 1.5 * static.goodput_rps


def test_a_replan_that_asks_nothing_changes_nothing():
    plain = Simulation(PROFILE, CONFIG, PROMPT_HEAVY).run()
    rounds = []
    sim = FlipSimulation(PROFILE, CONFIG, PROMPT_HEAVY, lambda now, s: rounds.append(now) or [], 5.0)
    assert sim.run().finish_s == pytest.approx(plain.finish_s)
    assert rounds[:3] == [5.0, 10.0, 15.0] and sim.flips == []


def test_a_flip_to_the_role_a_worker_has_is_ignored():
    def same_role(now, sim):
        return [(w.worker_id, Role.DECODE) for w in sim.registry.workers(Role.DECODE)]

    sim = FlipSimulation(PROFILE, CONFIG, PROMPT_HEAVY[:50], same_role, 1.0)
    sim.run()
    assert sim.flips == [] and sim.split() == (1, 3)


def test_colocated_meshes_and_no_interval_are_refused():
    with pytest.raises(ValueError):
        FlipSimulation(PROFILE, MeshConfig(colocated=2), PROMPT_HEAVY, lambda now, s: [], 5.0)
    with pytest.raises(ValueError):
        FlipSimulation(PROFILE, CONFIG, PROMPT_HEAVY, lambda now, s: [], 0.0)
