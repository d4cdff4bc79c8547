"""`kvmesh prefill`: a prefill worker — its engine on a dedicated thread, writing each prompt's KV into decode
workers' blocks through the transports, registered with the scheduler."""

from __future__ import annotations

import argparse
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from kvmesh.services.clients.cache import worker_cache_client
from kvmesh.services.common import config as config_mod, tls
from kvmesh.services.common.server import MeshServer, Service, serve
from kvmesh.services.prefill.config import PrefillConfig
from kvmesh.services.prefill.prefix import PeerSources
from kvmesh.services.prefill.servicer import PrefillServicer
from kvmesh.services.prefill.worker import PrefillWorker
from kvmesh.services.common.transfer_telemetry import report, report_sent
from kvmesh.services.worker.startup import WorkerKit, setup_worker
from kvmesh.transports.receiver import Receiver
from kvmesh.transports.sender import Sender
from kvmesh.transports.service import add_to_server
from kvmesh.v1 import prefill_pb2, prefill_pb2_grpc, scheduler_pb2


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The prefill worker's flags: one per PrefillConfig field."""
    config_mod.add_arguments(parser, PrefillConfig, "prefill")


@dataclass
class PrefillParts:
    """A prefill worker mounted on a server: its domain object and what closes its transports."""

    worker: PrefillWorker
    close: Callable[[], Awaitable[None]]  # the sender, the cache client and a receiver of its own (not the region)
    receiver: Receiver | None


def mount(config: PrefillConfig, server: MeshServer, kit: WorkerKit, receiver: Receiver | None = None
          ) -> PrefillParts:
    """Open a sender over kit's KV pool, build the prefill worker and host the Prefill service. receiver: one the
    caller owns and hosts (a flexible worker's); without one, a receiver of its own (hosted here), into which the
    cache or a decode worker's pool (peer pull) delivers cached prefixes straight."""
    region, layout, backends = kit.region, kit.layout, kit.backends
    sender = Sender(region, layout, backends=backends, force=None if config.transport == "auto" else config.transport,
                    chaos=config.transport_chaos or None, observer=report_sent,
                    tls=tls.LIVE if server.tls else None)
    cache = worker_cache_client(config, server.channels, layout)
    own = receiver is None  # cached prefixes arrive in it: from the cache, or from a decode worker's pool
    if own:
        receiver = Receiver(region, layout, backends=backends, observer=report)
        server.add_service(Service("kvmesh.v1.KVTransfer", receiver.servicer(), add_to_server))
    peers = PeerSources(server.channels, layout, config.cache_timeout_s)
    worker = PrefillWorker(kit.engine_thread, sender, config.handoff_lease_s, cache, receiver, peers)
    server.add_service(Service.of(prefill_pb2, prefill_pb2_grpc, PrefillServicer(worker, config.prefill_timeout_s)))
    server.add_task(worker.keep_queued_alive)

    async def close() -> None:
        if cache is not None:
            await cache.close()
        await sender.close()
        if own:
            receiver.close(close_region=False)

    return PrefillParts(worker, close, receiver if own else None)


async def setup(config: PrefillConfig, server: MeshServer) -> None:
    """Load the engine, open a sender over its KV pool, host the Prefill service."""
    # the pool is open to transports like a decode worker's (shared memory when shm is offered): the cache
    # delivers cached prefixes straight into it
    kit = await setup_worker(config, server, name="prefill")
    parts = mount(config, server, kit)

    def start() -> None:
        if parts.receiver is not None:
            parts.receiver.address = kit.address()

    async def close_transports() -> None:
        await parts.close()
        kit.region.close()

    kit.run(parts.worker, scheduler_pb2.WORKER_ROLE_PREFILL, on_start=start, on_stopped=[close_transports])


def run(args: argparse.Namespace) -> int:
    """Entry point of `kvmesh prefill`."""
    config = config_mod.from_args(PrefillConfig, "prefill", args)
    return serve(config, lambda server: setup(config, server), name="prefill")
