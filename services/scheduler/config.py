"""The scheduler's settings."""

from __future__ import annotations

from dataclasses import dataclass

from kvmesh.services.common.config import ServerConfig, check, knob
from kvmesh.services.scheduler.admission import QueueLimits, parse_priority_limits
from kvmesh.services.scheduler.policies import POLICIES, Links

DEFAULT_PORT = 50050


@dataclass(frozen=True)
class SchedulerConfig(ServerConfig):
    """Settings of `kvmesh scheduler`."""

    port: int = knob(DEFAULT_PORT, "Port to bind; 0 picks a free one (printed at start).")
    lease_s: float = knob(10.0, "Seconds a worker stays registered without a heartbeat.")
    policy: str = knob("slo_aware", "Routing policy: slo_aware (the least predicted TTFT within the SLOs, from "
                                    "cost models fitted to the workers' heartbeats), least_loaded, kv_aware, "
                                    "round_robin or power_of_two.", choices=tuple(POLICIES))
    slo_ttft_s: float = knob(0.0, "Default time-to-first-token objective (seconds) of a request that sets none; "
                                  "slo_aware refuses at once (RESOURCE_EXHAUSTED, retry-after) a request no route "
                                  "is predicted to meet. 0: none.")
    slo_tpot_s: float = knob(0.0, "Default time-per-output-token objective (seconds), as slo_ttft_s. 0: none.")
    transfer_gbps: float = knob(8.0, "Prior of the prefill-to-decode KV handoff's speed (GB/s) in the "
                                     "predictions, until the workers' reported transfers fit one (see links.py).")
    cache_dram_gbps: float = knob(4.0, "Prior of a KV fetch's speed from the cache's DRAM tier (GB/s).")
    cache_ssd_gbps: float = knob(1.0, "Prior of a KV fetch's speed from the cache's SSD tier (GB/s).")
    kv_move_fixed_s: float = knob(0.002, "Prior of the fixed cost (seconds) of one KV handoff or fetch.")
    cache_probe: bool = knob(True, "Ask the registered cache how much of each prompt it holds (the request's "
                                   "one lookup, 250 ms deadline): Route reports it, the kv_aware policy weighs it, "
                                   "and the prefill worker fetches by it without asking again.")
    max_queue: int = knob(64, "Admission limit: a decode worker with this many queued requests (waiting at its last "
                              "heartbeat, a colocated worker's prompts not yet computed, and those routed to it "
                              "since) takes no more; when every decode worker is over it, Route fails with "
                              "RESOURCE_EXHAUSTED and a retry-after from the predicted queue drain.")
    max_queue_per_priority: str = knob("", "Lower queue limits for less urgent requests (priority: lower is more "
                                           "urgent, as vLLM's; default 0), as PRIORITY:LIMIT pairs, e.g. '1:16,10:4':"
                                           " a request of priority 1 or more is admitted only while its decode "
                                           "worker has fewer than 16 queued, one of 10 or more fewer than 4; more "
                                           "urgent ones up to max_queue. Empty: max_queue for every priority.")
    breaker_failures: int = knob(2, "Consecutive failures of a worker (failed calls its peers report, failed health "
                                    "checks the scheduler makes on each report) that open its circuit breaker: no "
                                    "routes go to it until the cool-down has passed.")
    breaker_cooldown_s: float = knob(2.0, "Seconds an open breaker keeps its worker out of routing; a failed health "
                                          "check restarts it. Then one probe route goes through (half-open).")
    breaker_probe_window_s: float = knob(2.0, "Seconds after the half-open probe route with no failure reported "
                                              "that close the breaker.")
    health_check_timeout_s: float = knob(0.5, "Deadline of the health check that verifies a reported failure and "
                                              "re-checks open breakers.")
    planner_interval_s: float = knob(0.0, "Seconds between rounds of the planner loop, which simulates every P:D "
                                          "split of the flexible (--role auto) workers on the recent traffic and "
                                          "flips roles when one is predicted to raise goodput. 0: off.")
    planner_window_s: float = knob(60.0, "Seconds of recent requests (arrival rate, prompt and output lengths) the "
                                         "planner plans for.")
    planner_threshold: float = knob(0.1, "Predicted relative goodput gain (0.1: 10 %) a split must bring before "
                                         "the planner changes the mesh.")
    planner_hold_s: float = knob(60.0, "Seconds after a flip or a scale command before the planner changes the "
                                       "mesh again.")
    planner_profile: str = knob("", "A `kvmesh plan profile` JSON the planner simulates with until the workers' "
                                    "heartbeats have fitted cost models.")
    planner_costs: str = knob("fits", "The cost models the planner simulates with: fits (the workers' fitted ones, "
                                      "--planner-profile for a role none has fitted yet) or profile (only "
                                      "--planner-profile: measured apart from a loaded or noisy mesh).",
                              choices=("fits", "profile"))
    planner_max_requests: int = knob(200, "Requests each of the planner's simulations plays at most.")
    scale_command: str = knob("", "Command the planner runs as `CMD add|remove prefill|decode N` when the best mesh "
                                  "(up to --max-workers) needs workers added or removed; empty: flips only.")
    max_workers: int = knob(0, "Most prefill plus decode workers the planner may ask --scale-command for; 0: the "
                               "mesh's size stays as it is.")

    def links(self) -> Links:
        """The KV movement priors of the predictions."""
        return Links(self.transfer_gbps, self.cache_dram_gbps, self.cache_ssd_gbps, self.kv_move_fixed_s)

    def queue_limits(self) -> QueueLimits:
        """Admission's queue limits: max_queue, capped per priority."""
        return QueueLimits(self.max_queue, parse_priority_limits(self.max_queue_per_priority))

    def validate(self) -> None:
        super().validate()
        try:
            parse_priority_limits(self.max_queue_per_priority)
        except ValueError as e:
            check(False, str(e))
        check(self.lease_s > 0, f"lease_s must be > 0, got {self.lease_s}")
        check(self.max_queue >= 1, f"max_queue must be >= 1, got {self.max_queue}")
        check(self.breaker_failures >= 1, f"breaker_failures must be >= 1, got {self.breaker_failures}")
        check(self.breaker_cooldown_s > 0, f"breaker_cooldown_s must be > 0, got {self.breaker_cooldown_s}")
        check(self.breaker_probe_window_s > 0,
              f"breaker_probe_window_s must be > 0, got {self.breaker_probe_window_s}")
        check(self.health_check_timeout_s > 0,
              f"health_check_timeout_s must be > 0, got {self.health_check_timeout_s}")
        check(min(self.slo_ttft_s, self.slo_tpot_s, self.kv_move_fixed_s) >= 0,
              "slo_ttft_s, slo_tpot_s and kv_move_fixed_s must be >= 0")
        check(min(self.transfer_gbps, self.cache_dram_gbps, self.cache_ssd_gbps) > 0,
              "transfer_gbps, cache_dram_gbps and cache_ssd_gbps must be > 0")
        check(self.planner_interval_s >= 0 and self.planner_hold_s >= 0 and self.planner_threshold >= 0,
              "planner_interval_s, planner_hold_s and planner_threshold must be >= 0")
        check(self.planner_window_s > 0 and self.planner_max_requests >= 1 and self.max_workers >= 0,
              "planner_window_s must be > 0, planner_max_requests >= 1 and max_workers >= 0")
        check(self.planner_costs in ("fits", "profile"), f"planner_costs must be fits or profile, got "
              f"{self.planner_costs!r}")
        check(self.planner_costs == "fits" or bool(self.planner_profile),
              "planner_costs=profile needs --planner-profile (make one with `kvmesh plan profile --model DIR`)")
        check(self.policy in POLICIES, f"policy must be one of {sorted(POLICIES)}, got {self.policy!r}")
