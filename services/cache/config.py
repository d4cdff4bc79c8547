"""The cache service's settings."""

from __future__ import annotations

from dataclasses import dataclass

from kvmesh.services.common.config import TRANSPORTS, ServerConfig, check, knob

DEFAULT_PORT = 50060


@dataclass(frozen=True)
class CacheConfig(ServerConfig):
    """Settings of `kvmesh cache`."""

    port: int = knob(DEFAULT_PORT, "Port to bind; 0 picks a free one (printed at start).")
    dram_bytes: int = knob(1 << 30, "Byte budget of the DRAM tier; least recently used blocks are evicted beyond it.")
    ssd_dir: str = knob("", "Directory of the SSD tier (one file per block; survives restarts); empty: DRAM only.")
    ssd_bytes: int = knob(8 << 30, "Byte budget of the SSD tier; least recently used files are deleted beyond it.")
    write_queue: int = knob(256, "SSD writes (blocks) that may wait behind requests; more are skipped, not waited "
                                 "for.")
    scheduler: str = knob("127.0.0.1:50050", "Address of the scheduler to register with, or several comma-separated "
                                            "(registered and heartbeating with each); empty: do not register.")
    advertise_host: str = knob("", "Host other workers reach this service at; empty: the bound host.")
    staging_blocks: int = knob(1024, "Blocks of the staging region kept per KV layout, which Fetch copies held "
                                     "blocks into before sending them through a transport (allocated on first "
                                     "use and reused; memory is touched only as deep as concurrent fetches "
                                     "reach); one fetch delivers at most this many blocks.")
    staging_wait_s: float = knob(0.5, "Longest a Fetch waits for free staging blocks before delivering nothing "
                                       "(the requester computes the prefix instead).")
    transport: str = knob("auto", "KV transport Fetch delivers through: auto negotiates with the requester (the "
                                  "best both ends offer, same-host ones only on one host), or force one of "
                                  f"{', '.join(TRANSPORTS[1:])}.", choices=TRANSPORTS)
    transport_chaos: str = knob("", "Degrade Fetch's transfers for testing, e.g. 'corrupt=1' (see "
                                    "kvmesh.transports.chaos).")

    def validate(self) -> None:
        super().validate()
        check(self.dram_bytes > 0, f"dram_bytes must be > 0, got {self.dram_bytes}")
        check(self.ssd_bytes > 0, f"ssd_bytes must be > 0, got {self.ssd_bytes}")
        check(self.write_queue > 0, f"write_queue must be > 0, got {self.write_queue}")
        check(self.staging_blocks > 0, f"staging_blocks must be > 0, got {self.staging_blocks}")
        check(self.staging_wait_s >= 0, f"staging_wait_s must be >= 0, got {self.staging_wait_s}")
