"""`kvmesh bench trace-gen`: deterministic, the asked reuse and rate, multi-turn history as shared blocks."""

import json

import pytest

from kvmesh.services.bench.lengths import LengthDist, parse_length
from kvmesh.services.bench.trace_gen import TraceSpec, generate, reuse_ratio, write_trace
from kvmesh.services.cli import main

BS = 16


def spec(**kw):
    base = dict(num_requests=400, rate=10.0, input_len=LengthDist("fixed", 8 * BS), output_len=LengthDist("fixed", 4),
                prefix_reuse=0.5, num_system_prompts=4, turns=1, block_size=BS, seed=3)
    return TraceSpec(**{**base, **kw})


def test_the_same_seed_writes_the_same_bytes(tmp_path):
    a, b, c = tmp_path / "a.jsonl", tmp_path / "b.jsonl", tmp_path / "c.jsonl"
    args = ["bench", "trace-gen", "--num-requests", "200", "--rate", "5", "--turns", "3", "--block-size", "16",
            "--input-len", "lognormal:40:0.7", "--output-len", "uniform:2:9"]
    assert main([*args, "--out", str(a), "--seed", "1"]) == 0
    assert main([*args, "--out", str(b), "--seed", "1"]) == 0
    assert main([*args, "--out", str(c), "--seed", "2"]) == 0
    assert a.read_bytes() == b.read_bytes() != c.read_bytes()
    records = [json.loads(line) for line in a.read_text().splitlines()]
    assert len(records) == 200 and set(records[0]) == {"timestamp", "input_length", "output_length", "hash_ids"}


@pytest.mark.parametrize("reuse", [0.0, 0.25, 0.5, 0.75])
def test_the_prefix_reuse_ratio_is_what_was_asked(reuse):
    records = generate(spec(prefix_reuse=reuse))
    # each prompt has 8 full blocks, round(8 * reuse) of them from a shared chain; only a chain's first use is new
    assert reuse_ratio(records) == pytest.approx(reuse, abs=0.02)
    assert all(len(r["hash_ids"]) == 8 and r["input_length"] == 8 * BS for r in records)


def test_the_rate_and_the_order_of_timestamps():
    records = generate(spec(num_requests=2000, rate=20.0))
    stamps = [r["timestamp"] for r in records]
    assert stamps == sorted(stamps)
    assert (len(records) - 1) / ((stamps[-1] - stamps[0]) / 1000) == pytest.approx(20.0, rel=0.08)


def test_a_later_turn_starts_with_the_previous_prompts_full_blocks():
    records = generate(spec(num_requests=30, turns=3, rate=0.5, turn_interval_s=0.5, prefix_reuse=0.0,
                            input_len=parse_length("uniform:20:50")))
    seen, later_turns = set(), 0
    for i, b in enumerate(records):
        if b["hash_ids"][0] in seen:  # no system prefix asked: only a later turn starts with a known block
            later_turns += 1
            parents = [a for a in records[:i] if b["hash_ids"][:a["input_length"] // BS] ==
                       a["hash_ids"][:a["input_length"] // BS] and a["hash_ids"][0] == b["hash_ids"][0]]
            parent = parents[-1]
            assert b["input_length"] > parent["input_length"] + parent["output_length"]
            assert b["timestamp"] - parent["timestamp"] == 500
        seen.update(b["hash_ids"])
    assert later_turns == 20  # 10 conversations of 3 turns


def test_bad_specs_are_refused():
    for bad in (dict(prefix_reuse=1.5), dict(turns=0), dict(rate=0.0)):
        with pytest.raises(ValueError):
            generate(spec(**bad))


def test_write_trace_is_one_object_a_line(tmp_path):
    path = tmp_path / "t.jsonl"
    write_trace(generate(spec(num_requests=3)), path)
    assert len(path.read_text().splitlines()) == 3
