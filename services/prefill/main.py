"""`kvmesh prefill`: a prefill worker — its engine on a dedicated thread, writing each prompt's KV into decode
workers' blocks through the transports, registered with the scheduler."""

from __future__ import annotations

import argparse
import asyncio

from kvmesh.services.clients.cache import worker_cache_client
from kvmesh.services.common import config as config_mod
from kvmesh.services.common.engine_thread import EngineThread
from kvmesh.services.common.registration import advertise_address
from kvmesh.services.common.server import MeshServer, Service, serve
from kvmesh.services.common.worker import load_engine, register, set_threads
from kvmesh.services.prefill.config import PrefillConfig
from kvmesh.services.prefill.servicer import PrefillServicer
from kvmesh.services.prefill.worker import PrefillWorker
from kvmesh.transports import Receiver, Sender, reclaim_stale_segments
from kvmesh.transports.service import add_to_server
from kvmesh.v1 import prefill_pb2, prefill_pb2_grpc, scheduler_pb2


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The prefill worker's flags: one per PrefillConfig field."""
    config_mod.add_arguments(parser, PrefillConfig, "prefill")


async def setup(config: PrefillConfig, server: MeshServer) -> None:
    """Load the engine, open a sender over its KV pool, host the Prefill service."""
    set_threads(config)
    backends = config.backends()
    reclaim_stale_segments()
    # the pool is open to transports like a decode worker's (shared memory when shm is offered): the cache
    # delivers cached prefixes straight into it
    engine, region = await asyncio.to_thread(load_engine, config, backends)
    layout = engine.layout.to_proto()
    sender = Sender(region, layout, backends=backends, force=None if config.transport == "auto" else config.transport,
                    chaos=config.transport_chaos or None)
    cache = worker_cache_client(config, server.channels, layout)
    receiver = Receiver(region, layout, backends=backends) if cache is not None else None
    engine_thread = EngineThread(engine, asyncio.get_running_loop(), name="prefill-engine")
    worker = PrefillWorker(engine_thread, sender, config.handoff_lease_s, cache, receiver)
    server.add_service(Service.of(prefill_pb2, prefill_pb2_grpc, PrefillServicer(worker, config.prefill_timeout_s)))
    if receiver is not None:
        server.add_service(Service("kvmesh.v1.KVTransfer", receiver.servicer(), add_to_server))

    async def start(_server: MeshServer) -> None:
        if receiver is not None:
            receiver.address = advertise_address(config.host, server.port, config.advertise_host)
        engine_thread.start()
        worker.handoffs.start()

    async def stop() -> None:
        if worker.cache is not None:
            await worker.cache.close()
        await worker.handoffs.close()
        await sender.close()
        await asyncio.to_thread(engine_thread.stop)
        if receiver is not None:
            receiver.close(close_region=False)
        region.close()

    server.add_task(start)
    server.on_stopped(stop)  # after in-flight requests drained
    register(server, config, scheduler_pb2.WORKER_ROLE_PREFILL, engine.layout, None, worker.load)


def run(args: argparse.Namespace) -> int:
    """Entry point of `kvmesh prefill`."""
    config = config_mod.from_args(PrefillConfig, "prefill", args)
    return serve(config, lambda server: setup(config, server), name="prefill")
