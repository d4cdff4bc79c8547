"""`kvmesh cache`: the KV block cache as a gRPC service that registers itself with the scheduler."""

from __future__ import annotations

import argparse
import asyncio

from kvmesh.services.cache.config import CacheConfig
from kvmesh.services.cache.delivery import Delivery
from kvmesh.services.cache.servicer import CacheServicer
from kvmesh.services.cache.store import BlockStore
from kvmesh.services.cache.tiers import DramTier, SsdTier
from kvmesh.services.common import config as config_mod
from kvmesh.services.common import ids
from kvmesh.services.common.registration import advertise_address, register_everywhere, scheduler_addresses
from kvmesh.services.common.server import MeshServer, Service, serve
from kvmesh.services.common.transfer_samples import SENT
from kvmesh.transports import available_backends
from kvmesh.v1 import cache_pb2, cache_pb2_grpc, scheduler_pb2


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The cache's flags: one per CacheConfig field."""
    config_mod.add_arguments(parser, CacheConfig, "cache")


def setup(config: CacheConfig, server: MeshServer) -> CacheServicer:
    """Host the Cache service on server and, when a scheduler is configured, register with it."""
    ssd = SsdTier(config.ssd_bytes, config.ssd_dir) if config.ssd_dir else None
    store = BlockStore(DramTier(config.dram_bytes), ssd, write_queue=config.write_queue)
    servicer = CacheServicer(store, delivery(config, store))
    server.add_service(Service.of(cache_pb2, cache_pb2_grpc, servicer))

    async def close_store() -> None:
        await servicer.delivery.close()
        await asyncio.to_thread(store.close)

    server.on_stop(close_store)
    if config.scheduler:
        def register_request() -> scheduler_pb2.RegisterRequest:
            return scheduler_pb2.RegisterRequest(
                role=scheduler_pb2.WORKER_ROLE_CACHE,
                address=advertise_address(config.host, server.port, config.advertise_host), host_id=ids.host_id(),
                instance_id=server.instance_id, transports=servicer.delivery.backends)

        def load() -> scheduler_pb2.WorkerLoad:
            return SENT.drain_into(scheduler_pb2.WorkerLoad())  # its deliveries, for the fetch link models

        register_everywhere(server, scheduler_addresses(config.scheduler), register_request, load)
    return servicer


def delivery(config: CacheConfig, store: BlockStore) -> Delivery:
    """Fetch's transport side: staging lanes and senders, over the backends --transport allows."""
    forced = None if config.transport == "auto" else config.transport
    backends = [forced] if forced else available_backends()
    return Delivery(store, config.staging_blocks, config.staging_wait_s, backends=backends, force=forced,
                    chaos=config.transport_chaos or None)


def run(args: argparse.Namespace) -> int:
    """Entry point of `kvmesh cache`."""
    config = config_mod.from_args(CacheConfig, "cache", args)
    return serve(config, lambda server: setup(config, server), name="cache")
