"""The flexible worker's settings: a decode worker's (the prefill side's are a subset) and its roles."""

from __future__ import annotations

from dataclasses import dataclass

from kvmesh.services.common.config import check, knob
from kvmesh.services.decode.config import DecodeConfig

ROLES = ("auto",)
INITIAL_ROLES = ("prefill", "decode")


@dataclass(frozen=True)
class FlexibleConfig(DecodeConfig):
    """Settings of `kvmesh worker`: one engine and one KV pool behind both the Prefill and the Decode service."""

    role: str = knob("auto", "auto: register as initial_role, able to flip (flexible), and take whichever role "
                             "the scheduler's heartbeat answers ask for (after draining the current role's work). "
                             "Fixed roles are `kvmesh prefill` and `kvmesh decode`.", choices=ROLES)
    initial_role: str = knob("decode", "The role to register in at start.", choices=INITIAL_ROLES)
    flip_migrate_after_s: float = knob(0.0, "Seconds a flip away from decode waits for the running streams to "
                                            "finish; past it, those still running are handed on — the gateway "
                                            "migrates each to another decode worker, as at a stop past --grace-s. "
                                            "0: wait until they finish.")
    drain_poll_s: float = knob(0.05, "Seconds between checks, during a flip, of whether the old role's in-flight "
                                     "work (prefills and their transfers, or decode streams) has drained.")

    def validate(self) -> None:
        super().validate()
        check(self.role in ROLES, f"role must be one of {', '.join(ROLES)}, got {self.role!r}")
        check(self.initial_role in INITIAL_ROLES,
              f"initial_role must be one of {', '.join(INITIAL_ROLES)}, got {self.initial_role!r}")
        check(self.flip_migrate_after_s >= 0,
              f"flip_migrate_after_s must be >= 0, got {self.flip_migrate_after_s}")
        check(self.drain_poll_s > 0, f"drain_poll_s must be > 0, got {self.drain_poll_s}")
        check(not self.colocated, "a flexible worker cannot be colocated: it prefills for other decode workers")
