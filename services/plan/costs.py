"""The cost models the simulator runs on: fitted once by `kvmesh plan profile`, saved as JSON, loaded by the
planner. Plain numbers and closed forms only — no torch here, so planning needs no model and no engine."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

from kvmesh.services.cost_model import DecodeModel, PrefillModel, least_squares

__all__ = ["DecodeModel", "PrefillModel", "Profile", "fit_decode", "fit_prefill"]

#: Used when a profile carries no measured transfer figure: the shared-memory copy measured on a 2-core machine
#: of the kind kvmesh is developed on (shared/MACHINE.md: warm segment, ~11 GB/s), rounded down for the
#: checksums and headers a real handoff adds.
DEFAULT_TRANSFER_GBPS = 8.0


@dataclass(frozen=True)
class Profile:
    """A machine's cost models plus what the simulator needs to price a KV handoff."""

    prefill: PrefillModel
    decode: DecodeModel
    kv_bytes_per_token: int
    transfer_gbps: float = DEFAULT_TRANSFER_GBPS
    model: str = ""
    cpu: dict = field(default_factory=dict)
    samples: dict = field(default_factory=dict)

    def transfer_seconds(self, num_tokens: int) -> float:
        """Seconds to move num_tokens tokens' KV between two workers."""
        return num_tokens * self.kv_bytes_per_token / (self.transfer_gbps * 1e9)

    def save(self, path: str | Path) -> None:
        """Write the profile as JSON (fits, raw samples, CPU)."""
        Path(path).write_text(json.dumps(asdict(self), indent=1) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "Profile":
        """Read a profile written by `save` (JSON only: a profile is data, never code)."""
        raw = json.loads(Path(path).read_text())
        return cls(PrefillModel(**raw["prefill"]), DecodeModel(**raw["decode"]), int(raw["kv_bytes_per_token"]),
                   float(raw.get("transfer_gbps", DEFAULT_TRANSFER_GBPS)), raw.get("model", ""),
                   raw.get("cpu", {}), raw.get("samples", {}))


def fit_prefill(prompt_batches: Sequence[Sequence[int]], seconds: Sequence[float]) -> PrefillModel:
    """Fit a + b·Σn + c·Σn² to steps that each prefilled the whole prompts of lengths prompt_batches[i]."""
    rows = [(1.0, float(sum(batch)), float(sum(n * n for n in batch))) for batch in prompt_batches]
    return PrefillModel(*least_squares(rows, seconds))


def fit_decode(batches: Sequence[int], context_tokens: Sequence[int], seconds: Sequence[float]) -> DecodeModel:
    """Fit a + b·batch + c·context_tokens to measured decode steps."""
    rows = [(1.0, float(b), float(c)) for b, c in zip(batches, context_tokens)]
    return DecodeModel(*least_squares(rows, seconds))
