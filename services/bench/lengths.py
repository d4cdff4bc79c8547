"""Length distributions for prompts and outputs: `fixed:N`, `uniform:LO:HI`, `lognormal:MEDIAN:SIGMA`.

Defaults are ShareGPT-like (long-tailed, a median of a few hundred prompt tokens and shorter answers), as
`vllm bench serve` draws from ShareGPT; every draw is clipped into [1, max].
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

SHAREGPT_INPUT = "lognormal:256:1.0"
SHAREGPT_OUTPUT = "lognormal:128:0.8"


@dataclass(frozen=True)
class LengthDist:
    """One parsed distribution; `sample(rng)` draws a length in [1, maximum]."""

    kind: str
    a: float
    b: float = 0.0
    maximum: int = 1 << 20

    def sample(self, rng: random.Random) -> int:
        """One length drawn from `rng` (the caller's seeded stream, so datasets are reproducible)."""
        if self.kind == "fixed":
            value = self.a
        elif self.kind == "uniform":
            value = rng.randint(int(self.a), int(self.b))
        else:
            value = rng.lognormvariate(math.log(self.a), self.b)
        return max(1, min(self.maximum, int(round(value))))

    def mean(self) -> float:
        """The distribution's mean before clipping (lognormal: median * exp(sigma^2 / 2))."""
        if self.kind == "fixed":
            return self.a
        if self.kind == "uniform":
            return (self.a + self.b) / 2
        return self.a * math.exp(self.b ** 2 / 2)


def parse_length(spec: str, maximum: int = 1 << 20) -> LengthDist:
    """`fixed:256`, `uniform:128:512`, `lognormal:256:1.0` (median, sigma), or a bare `256` (fixed)."""
    parts = spec.split(":")
    try:
        if len(parts) == 1:
            dist = LengthDist("fixed", float(parts[0]), maximum=maximum)
        elif parts[0] == "fixed" and len(parts) == 2:
            dist = LengthDist("fixed", float(parts[1]), maximum=maximum)
        elif parts[0] in ("uniform", "lognormal") and len(parts) == 3:
            dist = LengthDist(parts[0], float(parts[1]), float(parts[2]), maximum=maximum)
        else:
            raise ValueError
    except ValueError:
        raise ValueError(f"bad length distribution {spec!r}: use fixed:N, uniform:LO:HI or "
                         "lognormal:MEDIAN:SIGMA") from None
    if dist.a < 1 or (dist.kind == "uniform" and dist.b < dist.a) or (dist.kind == "lognormal" and dist.b < 0):
        raise ValueError(f"bad length distribution {spec!r}: lengths must be >= 1, LO <= HI, SIGMA >= 0")
    return dist
