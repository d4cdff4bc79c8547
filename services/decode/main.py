"""`kvmesh decode`: a decode worker — its engine on a dedicated thread, its KV pool open to prefill workers'
writes through the transports, registered with the scheduler."""

from __future__ import annotations

import argparse
import asyncio

from kvmesh.services.clients.cache import worker_cache_client
from kvmesh.services.common import config as config_mod
from kvmesh.services.common.engine_thread import EngineThread
from kvmesh.services.common.registration import advertise_address
from kvmesh.services.common.server import MeshServer, Service, serve
from kvmesh.services.common.worker import load_engine, register, set_threads
from kvmesh.services.decode.config import DecodeConfig
from kvmesh.services.decode.servicer import DecodeServicer
from kvmesh.services.decode.worker import DecodeWorker
from kvmesh.transports import Receiver, reclaim_stale_segments
from kvmesh.transports.service import add_to_server
from kvmesh.v1 import decode_pb2, decode_pb2_grpc, scheduler_pb2


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The decode worker's flags: one per DecodeConfig field."""
    config_mod.add_arguments(parser, DecodeConfig, "decode")


async def setup(config: DecodeConfig, server: MeshServer) -> None:
    """Load the engine, open the KV pool to transports, host the Decode and KVTransfer services."""
    set_threads(config)
    reclaim_stale_segments()
    backends = config.backends()
    engine, region = await asyncio.to_thread(load_engine, config, backends, config.prefix_caching)
    layout = engine.layout.to_proto()
    receiver = Receiver(region, layout, backends=backends)
    engine_thread = EngineThread(engine, asyncio.get_running_loop(), name="decode-engine")
    cache = worker_cache_client(config, server.channels, layout) if config.cache_decode_kv else None
    worker = DecodeWorker(engine_thread, receiver, server.channels, config.handoff_lease_s, config.queue_timeout_s,
                          config.local_prefill_max_tokens, config.kv_events_max_hashes, cache)
    server.add_service(Service.of(decode_pb2, decode_pb2_grpc, DecodeServicer(worker, config.prefill_timeout_s)))
    server.add_service(Service("kvmesh.v1.KVTransfer", receiver.servicer(), add_to_server))

    def descriptor():
        receiver.address = advertise_address(config.host, server.port, config.advertise_host)
        return receiver.descriptor()

    async def start(_server: MeshServer) -> None:
        descriptor()
        engine_thread.start()
        worker.handoffs.start()

    async def stop() -> None:
        await worker.handoffs.close()
        await asyncio.to_thread(engine_thread.stop)
        receiver.close()
        if cache is not None:
            await cache.close()

    server.add_task(start)
    server.on_stopped(stop)  # after in-flight requests drained
    register(server, config, scheduler_pb2.WORKER_ROLE_DECODE, engine.layout, descriptor, worker.load,
             worker.kv_events if config.prefix_caching else None, config.local_prefill_max_tokens)


def run(args: argparse.Namespace) -> int:
    """Entry point of `kvmesh decode`."""
    config = config_mod.from_args(DecodeConfig, "decode", args)
    return serve(config, lambda server: setup(config, server), name="decode")
