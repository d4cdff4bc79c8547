"""Starting an engine worker: the set-up prefill and decode share, in one call, and their life with the server.

    kit = await setup_worker(config, server, name="decode", prefix_caching=config.prefix_caching)
    worker = DecodeWorker(kit.engine_thread, ...)               # the worker's own parts, over kit.region
    kit.run(worker, scheduler_pb2.WORKER_ROLE_DECODE, on_stopped=[receiver.close])

`setup_worker` applies the thread count, reclaims shared-memory segments a crashed worker left behind, loads the
engine off the event loop with its KV pool in a region the transports can reach, and puts it on its own thread.
`WorkerKit.run` starts the engine thread and the handoff table with the server, ends them once in-flight requests
have drained (handoffs first, so their cleanups still reach the engine), and registers the worker.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass

from kvmesh.services.common import ids
from kvmesh.services.common.config import ConfigError
from kvmesh.services.common.registration import (KVEventsFn, LoadFn, RegistrationClient, advertise_address,
                                                   register_everywhere, scheduler_addresses)
from kvmesh.services.common.server import MeshServer
from kvmesh.services.common.transfer_samples import SENT
from kvmesh.services.worker.config import WorkerConfig
from kvmesh.services.worker.engine_thread import EngineThread
from kvmesh.v1 import common_pb2, scheduler_pb2

log = logging.getLogger(__name__)
Hook = Callable[[], "Awaitable[None] | None"]


def set_threads(config: WorkerConfig) -> None:
    """Pin the process to `cpus` (if given) and apply the torch thread count (flag, else KVMESH_TORCH_THREADS,
    else one per pinned core)."""
    import torch

    cores = config.cpu_set()
    if cores:
        os.sched_setaffinity(0, cores)
    threads = config.torch_threads or int(os.environ.get("KVMESH_TORCH_THREADS", "0") or 0) or len(cores)
    if threads:
        torch.set_num_threads(threads)


def load_engine(config: WorkerConfig, backends: list[str], prefix_caching: bool = False):
    """The engine, its KV pool placed in a region the transports can reach: shared memory when shm is offered,
    with `--kv-pool local` the engine's own torch memory on its device; with prefix_caching its pool keeps
    finished requests' full blocks findable by hash."""
    from kvmesh.services.engine.engine import LLMEngine
    from kvmesh.services.engine.loader import SharedPoolMemory
    from kvmesh.transports import LOCAL_POOL, allocate_region

    regions = []
    tp = config.tensor_parallel_size

    def storage(num_layers: int, num_blocks: int, block_nbytes: int):
        # tensor-parallel ranks map the pool by its path: then it is mappable memory whatever the backends
        regions.append(allocate_region(num_layers, num_blocks, block_nbytes, backends, mappable=tp > 1))
        return SharedPoolMemory(regions[-1].array, regions[-1].path) if tp > 1 else regions[-1].array

    local = config.kv_pool == LOCAL_POOL
    engine = LLMEngine.from_path(config.model, dtype=config.dtype, device=config.device,
                                 block_size=config.block_size, kv_cache_bytes=config.kv_cache_bytes,
                                 max_num_batched_tokens=config.max_num_batched_tokens,
                                 max_num_seqs=config.max_num_seqs, kv_storage=None if local else storage,
                                 enable_prefix_caching=prefix_caching, tensor_parallel_size=tp)
    engine.model.attention = config.attention
    engine.scheduler.pack_prompt_tokens = config.pack_prompt_tokens
    return engine, local_region(engine.kv_cache, config, backends) if local else regions[0]


def local_region(kv_cache, config: WorkerConfig, backends: list[str]):
    """The transports' view of a pool the engine allocated in its own memory (`--kv-pool local`), logged."""
    from kvmesh.transports import LOCAL_POOL, KVRegion, available_backends, pool_backends

    if kv_cache.pool.device.type != "cpu":
        raise ConfigError(f"--kv-pool local on {config.device}: the KV transports move host memory only, so a "
                          f"pool in device memory cannot be sent or received yet; run with --kv-pool local on "
                          f"--device cpu")
    dropped = [b for b in available_backends() if b not in pool_backends(available_backends(), LOCAL_POOL)]
    log.info("KV pool: local (%s memory of this process, %d blocks); transports offered: %s%s", config.device,
             kv_cache.num_blocks, ",".join(backends) or "none",
             f"; not offered: {','.join(dropped)} (needs the pool in its own memory)" if dropped else "")
    return KVRegion(array=kv_cache.byte_view())


def register(server: MeshServer, config: WorkerConfig, role: int | Callable[[], int], layout: common_pb2.KVLayout,
             descriptor: Callable[[], common_pb2.TransportDescriptor] | None, load: LoadFn,
             kv_events: KVEventsFn | None = None, local_prefill_max_tokens: int | None = None,
             colocated: bool = False, reports_arrivals: bool = False,
             flexible: bool = False) -> list[RegistrationClient]:
    """Register this worker with every scheduler and keep it registered while the server runs; kv_events(full)
    gives the KV events each heartbeat carries, local_prefill_max_tokens the tail it prefills itself, colocated
    whether it prefills every prompt itself and reports_arrivals whether it notes each request it takes
    (decode workers). A flexible worker's role is a callable read at each registration (see worker/flip.py)."""
    if not config.scheduler:
        return []

    def request() -> scheduler_pb2.RegisterRequest:
        return scheduler_pb2.RegisterRequest(
            role=role() if callable(role) else role, address=advertise_address(config.host, server.port, config.advertise_host),
            host_id=ids.host_id(), instance_id=server.instance_id, transports=config.backends(),
            layout=layout, descriptor=descriptor() if descriptor else None, model=layout.model_id,
            local_prefill_max_tokens=local_prefill_max_tokens, colocated=colocated, flexible=flexible,
            spills_kv=getattr(config, "kv_spill", "none") == "cache")  # decode workers' --kv-spill

    return register_everywhere(server, scheduler_addresses(config.scheduler), request, load, kv_events,
                               getattr(config, "kv_events_max_hashes", 4096), reports_arrivals)


def with_steps(load: scheduler_pb2.WorkerLoad, engine_thread: EngineThread) -> scheduler_pb2.WorkerLoad:
    """A heartbeat's load: `load` plus the engine steps timed since the last one, the prefill backlog and the KV
    transfers sent (what the scheduler fits its cost and link models to and counts in admission)."""
    for shape, seconds in engine_thread.drain_step_samples():
        load.steps.add(num_prefill_tokens=shape.num_prefill_tokens, num_attention_pairs=shape.num_attention_pairs,
                       num_decode_seqs=shape.num_decode_seqs, num_context_tokens=shape.num_context_tokens,
                       seconds=seconds)
    load.num_pending_prefill_tokens = engine_thread.num_pending_prefill_tokens
    load.num_pending_prefill = engine_thread.num_pending_prefill
    return SENT.drain_into(load)  # the KV transfers it sent, for the scheduler's link models


@dataclass
class WorkerKit:
    """What every engine worker starts with: its engine on a dedicated thread, the engine's KV region, the
    layout peers see, and the transport backends it offers."""

    config: WorkerConfig
    server: MeshServer
    engine_thread: EngineThread
    region: object
    layout: common_pb2.KVLayout
    backends: list[str]

    @property
    def engine(self):
        """The worker's LLMEngine (touch it only from the engine thread once `run` has started it)."""
        return self.engine_thread.engine

    def address(self) -> str:
        """The address peers dial to reach this worker (valid once the server is bound)."""
        return advertise_address(self.config.host, self.server.port, self.config.advertise_host)

    def run(self, worker, role: int | Callable[[], int], *, on_start: Callable[[], None] | None = None, on_stopped: Iterable[Hook] = (),
            descriptor: Callable[[], common_pb2.TransportDescriptor] | None = None,
            kv_events: KVEventsFn | None = None, local_prefill_max_tokens: int | None = None,
            colocated: bool = False, reports_arrivals: bool = False,
            flexible: bool = False) -> list[RegistrationClient]:
        """Run `worker` (it has `handoffs` and `load`) with the server: on_start() once bound, then the engine
        thread and the handoff table; at stop, after in-flight requests drained, the handoffs, the engine
        thread, then each of on_stopped in order. Registers with every scheduler as `role` (returns the
        registrations)."""
        closers = list(on_stopped)

        async def start(_server: MeshServer) -> None:
            if on_start is not None:
                on_start()
            self.engine_thread.start()
            worker.handoffs.start()

        async def stop() -> None:
            await worker.handoffs.close()
            await asyncio.to_thread(self.engine_thread.stop)
            for close in closers:
                result = close()
                if inspect.isawaitable(result):
                    await result

        self.server.add_task(start)
        self.server.on_stopped(stop)
        return register(self.server, self.config, role, self.layout, descriptor,
                        lambda: with_steps(worker.load(), self.engine_thread), kv_events,
                        local_prefill_max_tokens, colocated, reports_arrivals, flexible)


async def setup_worker(config: WorkerConfig, server: MeshServer, *, name: str,
                       prefix_caching: bool = False) -> WorkerKit:
    """Apply the thread count, reclaim stale segments, load the engine (off the loop) into a region the
    transports reach, and give it a thread named `<name>-engine` (started by `WorkerKit.run`)."""
    from kvmesh.services.engine.errors import UnsupportedModelError
    from kvmesh.transports import reclaim_stale

    set_threads(config)
    reclaim_stale()
    backends = config.backends()
    try:
        engine, region = await asyncio.to_thread(load_engine, config, backends, prefix_caching)
    except UnsupportedModelError as exc:  # a model or a split this engine cannot run: the operator's to change
        raise ConfigError(str(exc)) from exc
    engine_thread = EngineThread(engine, asyncio.get_running_loop(), name=f"{name}-engine")
    return WorkerKit(config, server, engine_thread, region, engine.layout.to_proto(), backends)
