"""`kvmesh bench trace-gen`: a Mooncake-format trace with realistic cache behaviour, from a seed alone.

Each line is `{"timestamp": ms, "input_length": n, "output_length": m, "hash_ids": [...]}`; a hash id names one
`block_size`-token block, and equal ids mean equal blocks (so equal prefixes). Conversations start as a Poisson
process; each opens with a prefix of one of `num_system_prompts` shared chains of blocks — `prefix_reuse` of its
first prompt's full blocks (a system prompt or few-shot document of the depth that prompt needs) — and the rest
fresh. A conversation of `turns` turns resends its history: turn t's prompt is turn t−1's full blocks, then new
blocks for the rest of that prompt, its reply and a new user message, sent `turn_interval_s` after turn t−1.
"""

from __future__ import annotations

import itertools
import json
import random
from dataclasses import dataclass
from pathlib import Path

from kvmesh.services.bench import arrivals
from kvmesh.services.bench.lengths import LengthDist


@dataclass(frozen=True)
class TraceSpec:
    """What to generate; `rate` is requests per second over all turns."""

    num_requests: int
    rate: float
    input_len: LengthDist
    output_len: LengthDist
    prefix_reuse: float = 0.5
    num_system_prompts: int = 1
    turns: int = 1
    turn_interval_s: float = 2.0
    block_size: int = 512
    seed: int = 0

    def check(self) -> None:
        """Raise ValueError naming the first setting out of range."""
        if self.num_requests < 1 or self.rate <= 0:
            raise ValueError("--num-requests must be >= 1 and --rate > 0")
        if not 0.0 <= self.prefix_reuse <= 1.0:
            raise ValueError(f"--prefix-reuse must be in [0, 1], got {self.prefix_reuse}")
        if self.num_system_prompts < 1 or self.turns < 1 or self.block_size < 1 or self.turn_interval_s < 0:
            raise ValueError("--num-system-prompts, --turns and --block-size must be >= 1, --turn-interval-s >= 0")


class _Ids:
    """Fresh block ids, and the shared system-prompt chains (extended as deeper prefixes are asked for)."""

    def __init__(self, num_chains: int):
        self.counter = itertools.count()
        self.chains: list[list[int]] = [[] for _ in range(num_chains)]

    def fresh(self, n: int) -> list[int]:
        return [next(self.counter) for _ in range(n)]

    def prefix(self, chain: int, n: int) -> list[int]:
        ids = self.chains[chain]
        ids.extend(self.fresh(n - len(ids)) if n > len(ids) else [])
        return ids[:n]


def _conversation(spec: TraceSpec, rng: random.Random, ids: _Ids, start_s: float) -> list[dict]:
    bs, records = spec.block_size, []
    prev_ids: list[int] = []
    prev_in = prev_out = 0
    chain = rng.randrange(spec.num_system_prompts)
    for turn in range(spec.turns):
        user = spec.input_len.sample(rng)
        if turn == 0:
            length = user
            shared = ids.prefix(chain, round(spec.prefix_reuse * (length // bs)))
        else:
            length = prev_in + prev_out + user
            shared = prev_ids[:prev_in // bs]  # the previous prompt's full blocks; its partial tail differs
        hash_ids = shared + ids.fresh(-(-length // bs) - len(shared))
        output = spec.output_len.sample(rng)
        records.append({"timestamp": round((start_s + turn * spec.turn_interval_s) * 1000),
                        "input_length": length, "output_length": output, "hash_ids": hash_ids})
        prev_ids, prev_in, prev_out = hash_ids, length, output
    return records


def generate(spec: TraceSpec) -> list[dict]:
    """The trace's records, in timestamp order; the same spec always gives the same records."""
    spec.check()
    rng = random.Random(spec.seed)
    num_conversations = -(-spec.num_requests // spec.turns)
    starts = arrivals.offsets(num_conversations, spec.rate / spec.turns, 1.0, spec.seed)
    ids = _Ids(spec.num_system_prompts)
    records = [r for start in starts for r in _conversation(spec, rng, ids, start)]
    records.sort(key=lambda r: r["timestamp"])  # stable: a conversation's turns keep their order on ties
    return records[:spec.num_requests]


def reuse_ratio(records: list[dict]) -> float:
    """The share of all hash ids that an earlier record already named (what a perfect cache would hit)."""
    seen: set = set()
    total = reused = 0
    for record in records:
        for block_id in record["hash_ids"]:
            total += 1
            reused += block_id in seen
        seen.update(record["hash_ids"])
    return reused / total if total else 0.0


def write_trace(records: list[dict], path: str | Path) -> None:
    """One JSON object a line, as AIPerf's `mooncake_trace` dataset reads."""
    Path(path).write_text("".join(json.dumps(r, separators=(",", ":")) + "\n" for r in records))
