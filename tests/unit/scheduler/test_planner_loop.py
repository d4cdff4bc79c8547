"""The planner loop over a real Registry and a fake RoleControl: it simulates off the event loop, asks the
least-loaded flexible worker to flip, runs the scale command with the role and count, and reports each round."""

from __future__ import annotations

import argparse
import asyncio
import threading
from pathlib import Path

import grpc
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from kvmesh.services.common import metrics
from kvmesh.services.common.config import ConfigError
from kvmesh.services.common.server import MeshServer
from kvmesh.services.cost_model import StepShape
from kvmesh.services.kv_identity import KVLayout
from kvmesh.services.plan.costs import DecodeModel, PrefillModel, Profile
from kvmesh.services.plan.metrics import SLO
from kvmesh.services.plan.sim import MeshConfig
from kvmesh.services.scheduler import main as scheduler_main
from kvmesh.services.scheduler import planner
from kvmesh.services.scheduler.config import SchedulerConfig
from kvmesh.services.scheduler.models import StepSample
from kvmesh.services.scheduler.planner import PlannerSettings, Split
from kvmesh.services.scheduler.planner_loop import PlannerLoop, profile_from_fits
from kvmesh.services.scheduler.planner_setup import RegistryRoles
from kvmesh.services.scheduler.planner_window import ArrivalWindow
from kvmesh.services.scheduler.registry import Load, Registry, Role, WorkerSpec
from kvmesh.v1 import common_pb2, scheduler_pb2, scheduler_pb2_grpc

PROFILE = Profile(PrefillModel(0.005, 2.5e-4, 0.0), DecodeModel(0.02, 1e-3, 1e-6), 1000, 8.0)
LAYOUT = KVLayout("m", "float32", 16, 1, 1, 1)
EXPORTER = InMemorySpanExporter()


class FakeRoles:
    """Every live prefill/decode worker is flexible; request_role records the ask and says yes."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self.asked: list[tuple[str, Role, str]] = []

    def flexible(self):
        return [w for w in self.registry.workers() if w.spec.role in (Role.PREFILL, Role.DECODE)]

    def request_role(self, address: str, role: Role, reason: str) -> bool:
        self.asked.append((address, role, reason))
        return True


def _mesh(prefill_waiting=(3, 0), decode=2) -> Registry:
    registry = Registry(lease_s=600)
    for i, waiting in enumerate(prefill_waiting):
        w = registry.register(WorkerSpec(Role.PREFILL, f"127.0.0.1:{6000 + i}", layout=LAYOUT))
        registry.heartbeat(w.worker_id, Load(num_waiting=waiting))
    for i in range(decode):
        registry.register(WorkerSpec(Role.DECODE, f"127.0.0.1:{7000 + i}", layout=LAYOUT))
    return registry


def _decode_heavy_window() -> ArrivalWindow:
    now = [0.0]
    window = ArrivalWindow(60.0, clock=lambda: now[0])
    for i in range(360):  # 6 requests/s of 32-token prompts asking for 256 tokens
        now[0] = i / 6.0
        window.record(32, 256)
    return window


def _loop(registry, roles, settings=PlannerSettings(), command="") -> PlannerLoop:
    base = MeshConfig(prefill=1, decode=1, cache=False, policy="least_loaded", heartbeat_s=0)
    return PlannerLoop(registry, roles, _decode_heavy_window(), settings, SLO(2000, 50), base, PROFILE,
                       scale_command=command)


def _count(action: str) -> float:
    return metrics.REGISTRY.get_sample_value("kvmesh:planner_decisions_total", {"action": action}) or 0.0


def test_a_round_flips_the_least_loaded_prefill_worker_and_reports_it():
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(EXPORTER))
    trace.set_tracer_provider(provider)  # once per process; a provider set first by another test keeps it
    registry = _mesh()
    roles = FakeRoles(registry)
    flips_before = _count("flip")
    decision = asyncio.run(_loop(registry, roles).round())
    assert decision.action == "flip" and decision.current == Split(2, 2) and decision.target == Split(1, 3)
    assert [(a, r) for a, r, _ in roles.asked] == [("127.0.0.1:6001", Role.DECODE)]  # waiting 0, not 3
    assert _count("flip") == flips_before + 1
    assert metrics.REGISTRY.get_sample_value("kvmesh:planner_predicted_gain") == decision.gain
    spans = [s for s in EXPORTER.get_finished_spans() if s.name == "planner.decide"]
    if spans:  # another test installed the global provider first; the metrics were still checked
        assert spans[-1].attributes["kvmesh.planner.target"] == "1P+3D"
        assert spans[-1].attributes["kvmesh.planner.predicted_gain"] > 0.1


def test_the_next_round_within_the_hold_time_holds():
    registry = _mesh()
    roles = FakeRoles(registry)
    loop = _loop(registry, roles, PlannerSettings(hold_s=3600))

    async def two_rounds():
        return await loop.round(), await loop.round()  # the fake flips nothing: the registry shows 2P+2D still

    first, second = asyncio.run(two_rounds())
    assert first.action == "flip" and second.action == "hold"
    assert len(roles.asked) == 1


def test_the_simulations_run_off_the_event_loop(monkeypatch):
    """The fake simulation waits for a coroutine on the event loop to run: were it on the loop, it never would."""
    registry = _mesh()
    real = planner.simulate_splits
    seen = {}

    def blocking(*args):
        seen["thread"] = threading.get_ident()
        seen["loop_ran"] = seen["go"].wait(timeout=60)
        return real(*args)

    monkeypatch.setattr(planner, "simulate_splits", blocking)

    async def main():
        seen["go"], seen["loop_thread"] = threading.Event(), threading.get_ident()
        task = asyncio.create_task(_loop(registry, FakeRoles(registry)).round())
        while "thread" not in seen:
            await asyncio.sleep(0.01)
        seen["go"].set()  # runs only because the loop is free while the simulation runs
        return await task

    decision = asyncio.run(main())
    assert seen["loop_ran"] and seen["thread"] != seen["loop_thread"]
    assert decision.action == "flip"


def test_the_scale_command_gets_the_role_and_the_count(tmp_path: Path):
    out = tmp_path / "scaled.txt"
    registry = _mesh(prefill_waiting=(0,), decode=1)
    roles = FakeRoles(registry)
    command = f"sh -c 'echo \"$@\" >> {out}' scale"
    loop = _loop(registry, roles, PlannerSettings(max_workers=3, can_scale=True), command)
    decision = asyncio.run(loop.round())
    assert decision.action == "scale" and decision.target == Split(1, 2)
    assert out.read_text() == "add decode 1\n"
    assert loop.last_change_at is not None and roles.asked == []


def test_a_failing_scale_command_is_logged_and_counts_no_change(tmp_path: Path):
    registry = _mesh(prefill_waiting=(0,), decode=1)
    loop = _loop(registry, FakeRoles(registry), PlannerSettings(max_workers=3, can_scale=True), "false")
    assert asyncio.run(loop.round()).action == "scale"
    assert loop.last_change_at is None  # nothing changed: the next round may try again


def test_without_flexible_workers_or_traffic_the_round_is_skipped():
    registry = _mesh()
    quiet = PlannerLoop(registry, FakeRoles(registry), ArrivalWindow(60.0), PlannerSettings(), SLO(2000, 50),
                        MeshConfig(prefill=1, decode=1), PROFILE)
    assert asyncio.run(quiet.round()).reason == "no requests in the window"
    before = RegistryRoles(registry)  # the adapter before the role flip is merged: no flexible workers
    assert asyncio.run(_loop(registry, before).round()).action == "skip"


def test_the_profile_comes_from_the_fits_else_the_file():
    registry = _mesh()
    assert profile_from_fits(registry.workers(), None, 8.0) is None  # nothing fitted, no file
    assert profile_from_fits(registry.workers(), PROFILE, 8.0) == PROFILE
    worker = registry.workers(Role.PREFILL)[0]
    steps = tuple(StepSample(StepShape(n, n * n, 0, 0), 0.001 + 1e-4 * n) for n in range(100, 1700, 100))
    registry.heartbeat(worker.worker_id, Load(steps=steps))
    fitted = profile_from_fits(registry.workers(), PROFILE, 8.0)
    assert abs(fitted.prefill.seconds(1000) - (0.001 + 0.1)) < 0.01  # the fit, not the file's 0.255 s
    assert fitted.decode == PROFILE.decode  # no decode fit: the file's


def test_planner_costs_profile_plans_with_the_file_whatever_the_workers_fitted():
    registry = _mesh()
    worker = registry.workers(Role.PREFILL)[0]
    steps = tuple(StepSample(StepShape(n, n * n, 0, 0), 1e-6 * n) for n in range(100, 1700, 100))
    registry.heartbeat(worker.worker_id, Load(steps=steps))  # a fit far cheaper than the file
    seen = []
    real = planner.simulate_splits
    planner.simulate_splits = lambda profile, *args: seen.append(profile) or real(profile, *args)
    try:
        for use_fits in (True, False):
            loop = _loop(registry, FakeRoles(registry))
            loop.use_fits = use_fits
            asyncio.run(loop.round())
    finally:
        planner.simulate_splits = real
    assert seen[0] != PROFILE and seen[1] == PROFILE
    with pytest.raises(ConfigError, match="needs --planner-profile"):
        SchedulerConfig(planner_costs="profile").validate()
    SchedulerConfig(planner_costs="profile", planner_profile="p.json").validate()


async def _register(stub, role, port: int) -> None:
    layout = common_pb2.KVLayout(model_id="tiny", dtype="float32", block_size=16, num_layers=2, num_kv_heads=2,
                                 head_dim=8)
    descriptor = common_pb2.TransportDescriptor(backends=["grpc"], address=f"127.0.0.1:{port}", layout=layout)
    await stub.Register(scheduler_pb2.RegisterRequest(role=role, address=f"127.0.0.1:{port}", host_id="h",
                                                      transports=["grpc"], layout=layout, descriptor=descriptor),
                        timeout=5)


def test_route_records_each_real_request_in_the_planners_window():
    async def main():
        server = MeshServer(SchedulerConfig(port=0, planner_interval_s=3600), "scheduler")
        servicer = scheduler_main.setup(server.config, server)
        await server.start()
        try:
            async with grpc.aio.insecure_channel(server.address) as channel:
                stub = scheduler_pb2_grpc.SchedulerStub(channel)
                await _register(stub, scheduler_pb2.WORKER_ROLE_DECODE, 7001)
                await _register(stub, scheduler_pb2.WORKER_ROLE_PREFILL, 7002)
                await stub.Route(scheduler_pb2.RouteRequest(prompt_token_ids=[1, 2, 3], max_tokens=7), timeout=5)
                await stub.Route(scheduler_pb2.RouteRequest(prompt_token_ids=[1] * 40, max_tokens=9), timeout=5)
                await stub.Route(scheduler_pb2.RouteRequest(prompt_token_ids=[4], dry_run=True), timeout=5)
        finally:
            await server.stop(0)
        return servicer.window.stats()

    stats = asyncio.run(main())
    assert stats.lengths == ((3, 7), (40, 9))  # the dry run is no demand
    assert stats.rate_per_s > 0


def test_an_unreadable_planner_profile_stops_the_scheduler_with_one_line(tmp_path: Path, capsys):
    parser = argparse.ArgumentParser()
    scheduler_main.add_arguments(parser)
    args = parser.parse_args(["--planner-interval-s", "5", "--planner-profile", str(tmp_path / "none.json")])
    assert scheduler_main.run(args) == 2
    assert "kvmesh plan profile" in capsys.readouterr().err
