"""`kvmesh scheduler`: the worker registry and router as a gRPC service."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from functools import partial

from kvmesh.services.common import config as config_mod
from kvmesh.services.common.server import MeshServer, Service, serve
from kvmesh.services.scheduler.breaker import Breaker
from kvmesh.services.scheduler.cache_probe import CacheProbe
from kvmesh.services.scheduler.config import SchedulerConfig
from kvmesh.services.scheduler.explain import observe_links, observe_models
from kvmesh.services.scheduler.lease_clock import WatchedClock
from kvmesh.services.scheduler.links import LinkBook
from kvmesh.services.scheduler.policies import get_policy
from kvmesh.services.scheduler.health_probe import HealthProber
from kvmesh.services.scheduler.planner_setup import build_planner, load_profile
from kvmesh.services.scheduler.planner_window import ArrivalWindow
from kvmesh.services.scheduler.registry import Registry
from kvmesh.services.scheduler.servicer import SchedulerServicer, observe_breakers
from kvmesh.v1 import scheduler_pb2, scheduler_pb2_grpc

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The scheduler's flags: one per SchedulerConfig field."""
    config_mod.add_arguments(parser, SchedulerConfig, "scheduler")


async def expire_leases(registry: Registry, interval_s: float, book: LinkBook | None = None) -> None:
    """Drop lapsed workers every interval_s and refresh the breaker, cost-model and link-model gauges, forever
    (cancelled at stop)."""
    while True:
        await asyncio.sleep(interval_s)
        for worker in registry.expire():
            log.warning("lease lapsed: dropped %s at %s", worker.worker_id, worker.spec.address)
        observe_breakers(registry)
        observe_models(registry)
        observe_links(book, registry)


def setup(config: SchedulerConfig, server: MeshServer) -> SchedulerServicer:
    """Host the Scheduler service and its expiry task on server; return the servicer."""
    clock = WatchedClock(tick_s=min(0.1, config.lease_s / 10), warn_s=config.lease_s / 4)
    registry = Registry(config.lease_s, clock=clock, breaker=partial(
        Breaker, config.breaker_failures, config.breaker_cooldown_s, config.breaker_probe_window_s))
    probe = CacheProbe() if config.cache_probe else None
    prober = HealthProber(registry, config.health_check_timeout_s)
    servicer = SchedulerServicer(registry, get_policy(config.policy), config.policy, config.queue_limits(), probe,
                                 prober, config.slo_ttft_s, config.slo_tpot_s, config.links())
    server.add_service(Service.of(scheduler_pb2, scheduler_pb2_grpc, servicer))
    interval = min(1.0, config.lease_s / 4)

    async def expiry(_server: MeshServer) -> None:
        await expire_leases(registry, interval, servicer.links.book)

    async def recheck(_server: MeshServer) -> None:
        await prober.watch_open(min(0.25, config.breaker_cooldown_s / 4))

    async def watch(_server: MeshServer) -> None:
        await clock.tick()

    server.add_task(watch)
    server.add_task(expiry)
    server.add_task(recheck)
    if config.planner_interval_s > 0:
        servicer.window = ArrivalWindow(config.planner_window_s)  # Route records each request in it
        planner = build_planner(config, registry, servicer.window)

        async def plan(_server: MeshServer) -> None:
            await planner.run(config.planner_interval_s)

        server.add_task(plan)
    server.on_stop(prober.close)
    if probe is not None:
        server.on_stop(probe.close)
    return servicer


def run(args: argparse.Namespace) -> int:
    """Entry point of `kvmesh scheduler`."""
    config = config_mod.from_args(SchedulerConfig, "scheduler", args)
    try:  # a bad planner profile is one line and exit 2, before anything starts
        load_profile(config.planner_profile if config.planner_interval_s > 0 else "")
    except config_mod.ConfigError as exc:
        print(f"kvmesh scheduler: {exc}", file=sys.stderr, flush=True)
        return 2
    return serve(config, lambda server: setup(config, server), name="scheduler")
