"""When each request is sent: offsets in seconds from the start of a run, fixed before the run starts.

A schedule decided up front means a slow server never slows the offered load (an open loop, as `vllm bench
serve` and DistServe measure); `--max-concurrency` caps what is in flight on top of it.
"""

from __future__ import annotations

import math
import random


def offsets(num: int, rate: float, burstiness: float = 1.0, seed: int = 0,
            process: str = "gamma") -> list[float]:
    """`num` send times for a mean `rate` requests/s.

    process "gamma": gaps drawn from a gamma distribution of shape `burstiness` and mean 1/rate (burstiness 1 is a
    Poisson process; below 1 burstier, above 1 steadier), as `vllm bench serve --burstiness` does.
    process "constant": evenly spaced. A rate of inf sends everything at once (all offsets 0).
    """
    if num < 0:
        raise ValueError("the number of requests must be >= 0")
    if rate <= 0 or math.isnan(rate):
        raise ValueError(f"request rate must be > 0 (inf sends all at once), got {rate}")
    if math.isinf(rate):
        return [0.0] * num
    if process == "constant":
        return [i / rate for i in range(num)]
    if burstiness <= 0:
        raise ValueError(f"burstiness must be > 0, got {burstiness}")
    rng = random.Random(seed)
    theta = 1.0 / (rate * burstiness)  # gamma(k, theta) has mean k * theta = 1 / rate
    at, out = 0.0, []
    for _ in range(num):
        out.append(at)
        at += rng.gammavariate(burstiness, theta)
    return out


def from_timestamps(timestamps_ms: list[float], time_scale: float = 1.0) -> list[float]:
    """A trace's recorded send times (milliseconds) as offsets from its first request, stretched by `time_scale`
    (0.5 replays twice as fast)."""
    if time_scale <= 0:
        raise ValueError(f"time scale must be > 0, got {time_scale}")
    if not timestamps_ms:
        return []
    first = min(timestamps_ms)
    return [(t - first) / 1000.0 * time_scale for t in timestamps_ms]
