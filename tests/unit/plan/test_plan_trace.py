"""Workloads: Mooncake-format traces read and written, Poisson arrivals."""

from __future__ import annotations

import pytest

from kvmesh.services.plan.search import MAX_WORKERS_EXHAUSTIVE, SearchSpace, candidates
from kvmesh.services.plan.trace import Arrival, poisson, read_trace, write_trace


def test_a_trace_is_sorted_and_starts_at_zero(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text('{"timestamp": 5000, "input_length": 10, "output_length": 2, "hash_ids": [1]}\n\n'
                    '{"timestamp": 2000, "input_length": 700, "output_length": 3, "hash_ids": [1, 2]}\n')
    arrivals = read_trace(path)
    assert arrivals == [Arrival(0.0, 700, 3, (1, 2)), Arrival(3.0, 10, 2, (1,))]
    write_trace(tmp_path / "u.jsonl", arrivals)
    assert read_trace(tmp_path / "u.jsonl") == arrivals


def test_a_bad_trace_row_names_its_line(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text('{"timestamp": 0, "input_length": 10, "output_length": 2}\n{"timestamp": 1}\n')
    with pytest.raises(ValueError, match=":2:"):
        read_trace(path)
    path.write_text('{"timestamp": 0, "input_length": 0, "output_length": 2}\n')
    with pytest.raises(ValueError, match=":1:.*at least 1"):
        read_trace(path)


def test_poisson_arrivals_have_the_rate_and_distinct_prompts():
    arrivals = poisson(4.0, 1000, 8, 4000, seed=1)
    assert arrivals[-1].time_s / (len(arrivals) - 1) == pytest.approx(0.25, rel=0.1)
    assert all(len(a.hash_ids) == 2 for a in arrivals)  # 1,000 tokens: two 512-token blocks
    assert len({a.hash_ids for a in arrivals}) == len(arrivals)


def test_a_wide_machine_is_searched_with_every_core_in_use():
    workers = MAX_WORKERS_EXHAUSTIVE + 2
    meshes = {(c.prefill, c.decode, c.colocated) for c in candidates(SearchSpace(cores=workers))}
    assert {p + d + w for p, d, w in meshes} == {workers}
    assert len(meshes) == workers  # every split of the workers, and all colocated
