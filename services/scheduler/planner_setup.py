"""Wiring the planner loop into the scheduler: its settings from the config, and the RoleControl it flips through."""

from __future__ import annotations

import dataclasses
import logging
import math

from kvmesh.services.common.config import ConfigError
from kvmesh.services.plan.costs import Profile
from kvmesh.services.plan.metrics import SLO
from kvmesh.services.plan.sim import MeshConfig
from kvmesh.services.scheduler.config import SchedulerConfig
from kvmesh.services.scheduler.planner import PlannerSettings
from kvmesh.services.scheduler.planner_loop import PlannerLoop
from kvmesh.services.scheduler.planner_window import ArrivalWindow
from kvmesh.services.scheduler.registry import Registry, Role, Worker

log = logging.getLogger(__name__)


class RegistryRoles:
    """The RoleControl over the scheduler's Registry: its flexible (`--role auto`) workers, and flips asked of them.
    A worker whose flip is still draining counts in the role it is flipping to, so the next round does not ask
    again for what is already under way."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry

    def flexible(self) -> list[Worker]:
        """The registry's flexible live workers, each in its current role or the one it is flipping to."""
        workers = []
        for worker in self.registry.flexible():
            desired = self.registry.desired_role(worker)
            if desired is not None and desired != worker.spec.role:
                worker = dataclasses.replace(worker, spec=dataclasses.replace(worker.spec, role=Role(desired)))
            workers.append(worker)
        return workers

    def request_role(self, address: str, role: Role, reason: str) -> bool:
        """Ask the worker at address to take role (False: no flexible worker there, or it has the role)."""
        return self.registry.request_role(address, role, reason)


def load_profile(path: str) -> Profile | None:
    """The --planner-profile file (None when not set); ConfigError naming the file and the fix when unreadable."""
    if not path:
        return None
    try:
        return Profile.load(path)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"--planner-profile {path}: not a readable profile ({exc}); make one with "
                          "`kvmesh plan profile --model DIR`") from None


def build_planner(config: SchedulerConfig, registry: Registry, window: ArrivalWindow) -> PlannerLoop:
    """The scheduler's planner loop from its config."""
    fallback = load_profile(config.planner_profile)
    settings = PlannerSettings(config.planner_threshold, config.planner_hold_s, config.max_workers,
                               bool(config.scale_command) and config.max_workers > 0, config.planner_max_requests)
    # no SLO set: every served request counts, so goodput is throughput
    slo = SLO(config.slo_ttft_s * 1000 if config.slo_ttft_s > 0 else math.inf,
              config.slo_tpot_s * 1000 if config.slo_tpot_s > 0 else math.inf)
    base = MeshConfig(prefill=1, decode=1, policy=config.policy, cache=False, max_queue=config.max_queue,
                      heartbeat_s=config.lease_s / 3, slo_ttft_s=config.slo_ttft_s, slo_tpot_s=config.slo_tpot_s)
    return PlannerLoop(registry, RegistryRoles(registry), window, settings, slo, base, fallback,
                       config.transfer_gbps, config.scale_command, use_fits=config.planner_costs == "fits")
