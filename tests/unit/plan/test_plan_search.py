"""The placement search: what it tries, how it ranks, and the command lines it prints."""

from __future__ import annotations

from kvmesh.services.plan.costs import DecodeModel, PrefillModel, Profile
from kvmesh.services.plan.metrics import SLO
from kvmesh.services.plan.search import SearchSpace, candidates, command, search
from kvmesh.services.plan.sim import MeshConfig
from kvmesh.services.plan.trace import poisson
from kvmesh.services.plan.worker import RoleLimits

PROFILE = Profile(PrefillModel(0.005, 2e-4, 1e-8), DecodeModel(0.02, 1e-3, 1e-6), 1000, 8.0)


def test_candidates_fit_the_cores():
    space = SearchSpace(cores=4, max_num_seqs=(8,), max_num_batched_tokens=(256,))
    meshes = {(c.prefill, c.decode, c.colocated) for c in candidates(space)}
    assert len(meshes) == len(candidates(space))
    assert meshes == {(1, 1, 0), (1, 2, 0), (2, 1, 0), (1, 3, 0), (2, 2, 0), (3, 1, 0),
                      (0, 0, 1), (0, 0, 2), (0, 0, 3), (0, 0, 4)}
    wide = SearchSpace(cores=4, cores_per_worker=2)
    assert {(c.prefill, c.decode, c.colocated) for c in candidates(wide)} == {(1, 1, 0), (0, 0, 1), (0, 0, 2)}


def test_search_ranks_by_goodput_per_core_within_the_cores():
    arrivals = poisson(8.0, 256, 32, 300, seed=1)
    plans = search(PROFILE, arrivals, SLO(500, 60), SearchSpace(cores=3))
    assert plans and all(p.cores <= 3 for p in plans)
    per_core = [p.goodput_per_core for p in plans]
    assert per_core == sorted(per_core, reverse=True)
    assert per_core[0] > 0
    row = plans[0].to_json()
    assert set(row) >= {"goodput_rps", "predicted", "command", "cores"}
    assert ("colocated" in row) != ("prefill" in row and "decode" in row)
    meshes = [(p.config.prefill, p.config.decode, p.config.colocated, repr(p.prediction)) for p in plans]
    assert len(meshes) == len(set(meshes))  # a limit the workload never reached does not repeat a row


def test_commands_start_the_mesh_that_was_simulated():
    split = MeshConfig(prefill=1, decode=2, prefill_limits=RoleLimits(64, 512))
    line = command(split)
    assert line.endswith("kvmesh up --prefill 1 --decode 2 --prefill-cpus 0 --decode-cpus 1/2")
    assert "KVMESH_PREFILL_MAX_NUM_BATCHED_TOKENS=512" in line
    colocated = command(MeshConfig(colocated=2, decode_limits=RoleLimits(16, 256)))
    assert "KVMESH_DECODE_MAX_NUM_SEQS=16 KVMESH_DECODE_MAX_NUM_BATCHED_TOKENS=256 " in colocated
    assert command(MeshConfig(colocated=2), 2).endswith("kvmesh up --colocated --workers 2 --worker-cpus 0-1/2-3")


def test_a_pack_grid_multiplies_the_candidates_and_its_setting_reaches_the_command():
    plain = candidates(SearchSpace(cores=2, max_num_seqs=(8,), max_num_batched_tokens=(256,)))
    packed = candidates(SearchSpace(cores=2, max_num_seqs=(8,), max_num_batched_tokens=(256,),
                                    pack_prompt_tokens=(0, 64)))
    assert len(packed) == 2 * len(plain)
    split = MeshConfig(prefill=1, decode=1, prefill_limits=RoleLimits(64, 512, 64))
    assert "KVMESH_PREFILL_PACK_PROMPT_TOKENS=64 kvmesh up --prefill 1" in command(split)
    colocated = command(MeshConfig(colocated=1, decode_limits=RoleLimits(16, 256, 32)))
    assert "KVMESH_DECODE_PACK_PROMPT_TOKENS=32 kvmesh up --colocated" in colocated
    assert "PACK" not in command(MeshConfig(prefill=1, decode=1))
