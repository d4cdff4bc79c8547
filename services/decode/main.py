"""`kvmesh decode`: a decode worker — its engine on a dedicated thread, its KV pool open to prefill workers'
writes through the transports, registered with the scheduler."""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from kvmesh.services.clients.cache import worker_cache_client
from kvmesh.services.clients.scheduler import FailureReporter
from kvmesh.services.common import config as config_mod
from kvmesh.services.common import metrics
from kvmesh.services.common.server import MeshServer, Service, serve
from kvmesh.services.decode.config import DecodeConfig
from kvmesh.services.decode.peer_fetch import PoolFetchServicer
from kvmesh.services.decode.servicer import DecodeServicer
from kvmesh.services.decode.spill import Spiller
from kvmesh.services.decode.worker import DecodeWorker
from kvmesh.services.common.transfer_telemetry import report
from kvmesh.services.worker.readiness import self_transfer
from kvmesh.services.worker.startup import WorkerKit, setup_worker
from kvmesh.services.worker.transport_watch import TransportWatch
from kvmesh.transports.receiver import Receiver
from kvmesh.transports.service import add_to_server
from kvmesh.v1 import cache_pb2, cache_pb2_grpc, decode_pb2, decode_pb2_grpc, scheduler_pb2


def speculator(config: DecodeConfig, max_model_len: int):
    """The engine's draft-token proposer for `--speculative`, counting into the spec_decode metrics; None when
    off."""
    if config.speculative == "none":
        return None
    from kvmesh.services.engine.speculative import NgramSpeculator, SpeculativeConfig

    spec = SpeculativeConfig(config.speculative, config.num_speculative_tokens, config.ngram_min, config.ngram_max)
    return NgramSpeculator(spec, max_model_len, on_verify=metrics.observe_spec_decode)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The decode worker's flags: one per DecodeConfig field."""
    config_mod.add_arguments(parser, DecodeConfig, "decode")


@dataclass
class DecodeParts:
    """A decode worker mounted on a server: its domain object, its receiver (the pool open to transports), the
    descriptor peers write with, and what closes its transports (the region too)."""

    worker: DecodeWorker
    receiver: Receiver
    descriptor: Callable[[], object]
    close: Callable[[], Awaitable[None]]


def mount(config: DecodeConfig, server: MeshServer, kit: WorkerKit) -> DecodeParts:
    """Open kit's KV pool to transports, build the decode worker, host the Decode and KVTransfer services, and
    check (before SERVING) that one real block crosses each transport into the pool."""
    kit.engine.speculator = speculator(config, kit.engine.max_model_len)  # before the engine thread starts
    receiver = Receiver(kit.region, kit.layout, backends=kit.backends, observer=report)
    needs_cache = config.cache_decode_kv or config.kv_spill == "cache"
    cache = worker_cache_client(config, server.channels, kit.layout) if needs_cache else None
    spill = Spiller(kit.engine_thread, cache, receiver, asyncio.get_running_loop()) \
        if config.kv_spill == "cache" else None
    if spill is not None:
        spill.attach()  # before the engine thread starts
    reporter = FailureReporter(server.channels, config.scheduler, reporter=config.instance_id or "decode")
    worker = DecodeWorker(kit.engine_thread, receiver, server.channels, config.handoff_lease_s, config.queue_timeout_s,
                          config.local_prefill_max_tokens, config.kv_events_max_hashes,
                          cache if config.cache_decode_kv else None, reporter,
                          kv_load_failure=config.kv_load_failure, spill=spill)
    server.add_service(Service.of(decode_pb2, decode_pb2_grpc, DecodeServicer(worker, config.prefill_timeout_s)))
    server.add_task(worker.keep_prefilling_alive)
    server.add_service(Service("kvmesh.v1.KVTransfer", receiver.servicer(), add_to_server))
    pool = PoolFetchServicer(kit.engine_thread, kit.region, kit.layout, kit.backends,  # peer pull: its pool's Fetch
                             None if config.transport == "auto" else config.transport, config.transport_chaos or None,
                             server.tls is not None)
    server.add_service(Service.of(cache_pb2, cache_pb2_grpc, pool))

    def descriptor():
        receiver.address = kit.address()
        return receiver.descriptor()

    async def close() -> None:
        await reporter.close()
        await pool.close()
        receiver.close()
        if cache is not None:
            await cache.close()

    async def transports_ready(_server) -> None:  # one real block through each backend, before SERVING
        await self_transfer(kit.region, kit.layout, receiver, descriptor(), receiver.backends)

    server.add_readiness(transports_ready)
    return DecodeParts(worker, receiver, descriptor, close)


async def setup(config: DecodeConfig, server: MeshServer) -> None:
    """Load the engine, open the KV pool to transports, host the Decode and KVTransfer services."""
    kit = await setup_worker(config, server, name="decode", prefix_caching=config.prefix_caching)
    parts = mount(config, server, kit)
    worker, descriptor = parts.worker, parts.descriptor
    worker.claims.registrations = kit.run(
        worker, scheduler_pb2.WORKER_ROLE_DECODE, on_start=descriptor, on_stopped=[parts.close],
        descriptor=descriptor, kv_events=worker.kv_events if config.prefix_caching else None,
        local_prefill_max_tokens=config.local_prefill_max_tokens, colocated=config.colocated, reports_arrivals=True)
    if config.transport_check_s > 0:  # readiness that stays true: a transport lost later takes the worker out
        server.add_task(TransportWatch(server, kit.engine_thread, kit.region, kit.layout, parts.receiver, descriptor,
                                       config.transport_check_s, worker.claims.registrations).run)


def run(args: argparse.Namespace) -> int:
    """Entry point of `kvmesh decode`."""
    config = config_mod.from_args(DecodeConfig, "decode", args)
    return serve(config, lambda server: setup(config, server), name="decode")
