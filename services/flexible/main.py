"""`kvmesh worker --role auto`: a flexible worker — one engine thread and one KV pool behind both the Prefill and
the Decode service (and the KVTransfer receiver), registered in one role at a time and flipping to the other when
the scheduler asks (flip.py)."""

from __future__ import annotations

import argparse

from kvmesh.services.common import config as config_mod
from kvmesh.services.common.server import MeshServer, serve
from kvmesh.services.decode import main as decode_main
from kvmesh.services.flexible.config import FlexibleConfig
from kvmesh.services.flexible.flip import DECODE, PREFILL, RoleFlipper
from kvmesh.services.prefill import main as prefill_main
from kvmesh.services.worker.startup import setup_worker


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flexible worker's flags: one per FlexibleConfig field."""
    config_mod.add_arguments(parser, FlexibleConfig, "worker")


async def setup(config: FlexibleConfig, server: MeshServer) -> None:
    """Load the engine, mount the decode side (the pool open to transports) and the prefill side (a sender over
    the same pool, sharing the decode side's receiver for cache deliveries), register as the initial role."""
    kit = await setup_worker(config, server, name="worker", prefix_caching=config.prefix_caching)
    decode = decode_main.mount(config, server, kit)
    prefill = prefill_main.mount(config, server, kit, receiver=decode.receiver)
    flipper = RoleFlipper(PREFILL if config.initial_role == "prefill" else DECODE, prefill.worker, decode.worker,
                          config.drain_poll_s, config.flip_migrate_after_s)

    async def close_transports() -> None:
        await prefill.close()
        await decode.close()  # closes the region too

    server.on_stop(flipper.close)
    registrations = kit.run(
        flipper, flipper.current, on_start=decode.descriptor, on_stopped=[close_transports],
        descriptor=decode.descriptor, kv_events=decode.worker.kv_events if config.prefix_caching else None,
        local_prefill_max_tokens=config.local_prefill_max_tokens, reports_arrivals=True, flexible=True)
    decode.worker.claims.registrations = registrations
    flipper.attach(registrations)


def run(args: argparse.Namespace) -> int:
    """Entry point of `kvmesh worker`."""
    config = config_mod.from_args(FlexibleConfig, "worker", args)
    return serve(config, lambda server: setup(config, server), name="worker")
