"""Datasets as token ids: equal block ids give equal prefixes, and the asked lengths are honoured."""

import json
import random

import pytest

from kvmesh.services.bench import datasets
from kvmesh.services.bench.lengths import LengthDist, parse_length

BS = 16


def tokens(seed=0):
    return datasets.BlockTokens(BS, seed=seed, token_ids=(100, 1000))


def write_trace(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_mooncake_equal_hash_ids_give_equal_prefixes_and_exact_lengths(tmp_path):
    trace = write_trace(tmp_path / "t.jsonl", [
        {"timestamp": 0, "input_length": 40, "output_length": 5, "hash_ids": [1, 2, 3]},
        {"timestamp": 10, "input_length": 35, "output_length": 7, "hash_ids": [1, 2, 9]},
        {"timestamp": 20, "input_length": 60, "output_length": 3, "hash_ids": [4]},
    ])
    a, b, c = (s.turns[0] for s in datasets.mooncake_sessions(datasets.read_mooncake(trace), tokens()))
    assert [len(r.prompt_ids) for r in (a, b, c)] == [40, 35, 60]  # cut inside block 3, padded past block 4
    assert [r.output_len for r in (a, b, c)] == [5, 7, 3]
    assert a.prompt_ids[:2 * BS] == b.prompt_ids[:2 * BS]  # ids 1, 2 shared
    assert a.prompt_ids[2 * BS:35] != b.prompt_ids[2 * BS:35]  # ids 3 and 9 differ
    assert a.prompt_ids[:BS] != c.prompt_ids[:BS]
    assert all(100 <= t < 1000 for r in (a, b, c) for t in r.prompt_ids)


def test_a_block_is_the_same_in_every_instance_and_differs_by_seed():
    assert tokens().block(42) == tokens().block(42)
    assert tokens(seed=1).block(42) != tokens(seed=2).block(42)
    assert len(tokens().block("system")) == BS


def test_mooncake_sessions_keep_timestamp_order_and_take_the_first_n(tmp_path):
    trace = write_trace(tmp_path / "t.jsonl", [
        {"timestamp": 30, "input_length": 4, "output_length": 1, "hash_ids": [3]},
        {"timestamp": 10, "input_length": 4, "output_length": 1, "hash_ids": [1]},
        {"timestamp": 20, "input_length": 4, "output_length": 1, "hash_ids": [2]},
    ])
    sessions = datasets.mooncake_sessions(datasets.read_mooncake(trace), tokens(), num=2)
    assert [s.timestamp_ms for s in sessions] == [10.0, 20.0]


def test_a_malformed_trace_line_is_named(tmp_path):
    trace = write_trace(tmp_path / "t.jsonl", [{"timestamp": 0, "input_length": 0, "output_length": 1}])
    with pytest.raises(ValueError, match="t.jsonl:1"):
        datasets.read_mooncake(trace)


def test_random_prompts_have_the_asked_lengths_and_a_common_prefix():
    sessions = datasets.random_sessions(50, LengthDist("uniform", 5, 9), LengthDist("fixed", 3), tokens(),
                                        seed=3, prefix_len=20)
    prompts = [s.turns[0].prompt_ids for s in sessions]
    assert all(25 <= len(p) <= 29 for p in prompts)
    assert all(s.turns[0].output_len == 3 for s in sessions)
    assert all(p[:20] == prompts[0][:20] for p in prompts)
    assert len({tuple(p[20:]) for p in prompts}) == 50  # the rest is each prompt's own


def test_multiturn_turns_resend_the_history_after_a_shared_system_prompt():
    sessions = datasets.multiturn_sessions(7, 3, LengthDist("fixed", 5), LengthDist("fixed", 4), tokens(),
                                           num_system_prompts=1, system_prompt_len=24)
    assert [len(s.turns) for s in sessions] == [3, 3, 1]  # 7 requests in all
    for s in sessions:
        for before, after in zip(s.turns, s.turns[1:]):
            assert after.prompt_ids[:len(before.prompt_ids)] == before.prompt_ids
            assert len(after.prompt_ids) == len(before.prompt_ids) + 4 + 5  # reply + new user message
    assert sessions[0].turns[0].prompt_ids[:24] == sessions[1].turns[0].prompt_ids[:24]
    assert len(sessions[0].turns[0].prompt_ids) == 29


def test_length_specs_parse_and_stay_in_bounds():
    rng = random.Random(0)
    assert parse_length("256").sample(rng) == 256
    assert parse_length("fixed:7").sample(rng) == 7
    uniform = parse_length("uniform:3:6")
    assert {uniform.sample(rng) for _ in range(200)} == {3, 4, 5, 6}
    lognormal = parse_length("lognormal:100:0.5", maximum=150)
    draws = sorted(lognormal.sample(rng) for _ in range(2001))
    assert 1 <= draws[0] and draws[-1] <= 150 and 85 <= draws[1000] <= 115  # the median is the first parameter
    for bad in ("uniform:5:3", "lognormal:100", "gauss:1:2", "fixed:0"):
        with pytest.raises(ValueError):
            parse_length(bad)
