"""The cache service's settings."""

from __future__ import annotations

from dataclasses import dataclass

from kvmesh.services.common.config import ServerConfig, check, knob

DEFAULT_PORT = 50060


@dataclass(frozen=True)
class CacheConfig(ServerConfig):
    """Settings of `kvmesh cache`."""

    port: int = knob(DEFAULT_PORT, "Port to bind; 0 picks a free one (printed at start).")
    dram_bytes: int = knob(1 << 30, "Byte budget of the DRAM tier; least recently used blocks are evicted beyond it.")
    scheduler: str = knob("127.0.0.1:50050", "Address of the scheduler to register with; empty: do not register.")
    advertise_host: str = knob("", "Host other workers reach this service at; empty: the bound host.")

    def validate(self) -> None:
        super().validate()
        check(self.dram_bytes > 0, f"dram_bytes must be > 0, got {self.dram_bytes}")
