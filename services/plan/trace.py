"""Workloads for the planner: Mooncake-format traces (JSONL: `timestamp` ms, `input_length`, `output_length`,
`hash_ids`, equal ids meaning equal 512-token blocks) and synthetic Poisson arrivals of fixed lengths."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

#: Tokens per hash id in a Mooncake trace.
TRACE_BLOCK_TOKENS = 512


@dataclass(frozen=True)
class Arrival:
    """One request of a workload: when it arrives (seconds from the start), its lengths, and its prompt's block
    hashes (a prefix of equal ids is a prefix of equal tokens)."""

    time_s: float
    input_length: int
    output_length: int
    hash_ids: tuple[int, ...] = ()


def read_trace(path: str | Path) -> list[Arrival]:
    """A Mooncake-format trace, sorted by arrival, times shifted so that the first request arrives at 0."""
    arrivals = []
    with open(path) as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                arrival = Arrival(float(row["timestamp"]) / 1000.0, int(row["input_length"]),
                                  int(row["output_length"]), tuple(int(h) for h in row.get("hash_ids", ())))
                if arrival.input_length < 1 or arrival.output_length < 1:
                    raise ValueError("input_length and output_length must be at least 1")
            except (ValueError, KeyError, TypeError) as exc:
                raise ValueError(f"{path}:{number}: not a Mooncake trace row ({exc})") from None
            arrivals.append(arrival)
    if not arrivals:
        raise ValueError(f"{path}: no requests")
    arrivals.sort(key=lambda a: a.time_s)
    start = arrivals[0].time_s
    return [Arrival(a.time_s - start, a.input_length, a.output_length, a.hash_ids) for a in arrivals]


def poisson(rate: float, input_length: int, output_length: int, num_requests: int, seed: int = 0) -> list[Arrival]:
    """num_requests arrivals at `rate` per second (exponential gaps), every prompt distinct."""
    if rate <= 0 or input_length <= 0 or output_length <= 0 or num_requests <= 0:
        raise ValueError("rate, input and output lengths and the number of requests must be positive")
    rng = random.Random(seed)
    blocks = -(-input_length // TRACE_BLOCK_TOKENS)
    now, arrivals = 0.0, []
    for i in range(num_requests):
        arrivals.append(Arrival(now, input_length, output_length, tuple(range(i * blocks, (i + 1) * blocks))))
        now += rng.expovariate(rate)
    return arrivals


def write_trace(path: str | Path, arrivals: Iterable[Arrival]) -> None:
    """Write arrivals as a Mooncake-format trace."""
    with open(path, "w") as out:
        for a in arrivals:
            out.write(json.dumps({"timestamp": round(a.time_s * 1000.0, 3), "input_length": a.input_length,
                                  "output_length": a.output_length, "hash_ids": list(a.hash_ids)}) + "\n")
