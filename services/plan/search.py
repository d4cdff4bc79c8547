"""The placement search: every mesh that fits the cores (prefill:decode counts, colocated worker counts) with
each role's engine limits from a small grid, simulated on the workload and ranked by goodput per core."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

from kvmesh.services.plan.costs import Profile
from kvmesh.services.plan.metrics import SLO, Prediction, predict
from kvmesh.services.plan.sim import MeshConfig, Simulation
from kvmesh.services.plan.trace import Arrival
from kvmesh.services.plan.worker import RoleLimits

#: Above this many workers the search tries only meshes that use every core: the pairs grow quadratically.
MAX_WORKERS_EXHAUSTIVE = 8
#: The engine's defaults, kept for the limit a role's grid does not vary.
DEFAULT_SEQS, DEFAULT_TOKENS = 64, 2048


@dataclass(frozen=True)
class SearchSpace:
    """What the search may choose from: `cores` in all, `cores_per_worker` each, and the grids of max_num_seqs
    (colocated workers), max_num_batched_tokens and pack_prompt_tokens (prefill and colocated workers)."""

    cores: int
    cores_per_worker: int = 1
    max_num_seqs: tuple[int, ...] = (16, 64)
    max_num_batched_tokens: tuple[int, ...] = (512, 2048)
    policy: str = "least_loaded"
    cache: bool = True
    heartbeat_s: float = 1.0
    trace_block_tokens: int = 512
    pack_prompt_tokens: tuple[int, ...] = (0,)

    def validate(self) -> None:
        """Raise ValueError when not even one worker fits or a grid is empty or not positive."""
        if self.cores_per_worker < 1 or self.cores < self.cores_per_worker:
            raise ValueError(f"--cores {self.cores} must hold at least one worker of {self.cores_per_worker} cores")
        if not self.max_num_seqs or not self.max_num_batched_tokens or min(
                self.max_num_seqs + self.max_num_batched_tokens) < 1:
            raise ValueError("the max_num_seqs and max_num_batched_tokens grids must be positive and non-empty")
        if not self.pack_prompt_tokens or min(self.pack_prompt_tokens) < 0:
            raise ValueError("the pack_prompt_tokens grid must be non-empty and >= 0 (0: pack to the budget)")


@dataclass(frozen=True)
class Plan:
    """One simulated placement, its cores, predicted figures and the `kvmesh up` line that starts it."""

    config: MeshConfig
    cores: int
    prediction: Prediction
    command: str

    @property
    def goodput_per_core(self) -> float:
        """Requests/s within both SLOs, per core used."""
        return self.prediction.goodput_rps / self.cores

    def to_json(self) -> dict:
        """The JSON row `kvmesh plan --json` prints."""
        c, p = self.config, self.prediction
        counts = {"colocated": c.colocated} if c.colocated else {"prefill": c.prefill, "decode": c.decode}
        limits = {"decode_limits": vars(c.decode_limits)} if c.colocated else {
            "prefill_limits": vars(c.prefill_limits), "decode_limits": vars(c.decode_limits)}
        pick = ("p50", "p90", "p99")
        return {**counts, **limits, "cores": self.cores, "goodput_rps": round(p.goodput_rps, 4),
                "goodput_per_core": round(self.goodput_per_core, 4), "slo_attainment": round(p.attainment, 4),
                "num_rejected": p.num_rejected,
                "predicted": {"ttft_ms": {k: p.ttft_ms[k] for k in pick}, "tpot_ms": {k: p.tpot_ms[k] for k in pick}},
                "command": self.command}


def _counts(workers: int) -> Iterator[tuple[int, int, int]]:
    """(prefill, decode, colocated) counts that fit `workers` workers."""
    every = workers > MAX_WORKERS_EXHAUSTIVE
    for total in ([workers] if every else range(1, workers + 1)):
        for p in range(1, total):
            yield p, total - p, 0
        yield 0, 0, total


def candidates(space: SearchSpace) -> list[MeshConfig]:
    """Every mesh of the search space."""
    space.validate()
    found = []
    for p, d, w in _counts(space.cores // space.cores_per_worker):
        base = dict(prefill=p, decode=d, colocated=w, policy=space.policy, cache=space.cache,
                    heartbeat_s=space.heartbeat_s, trace_block_tokens=space.trace_block_tokens)
        packs = space.pack_prompt_tokens
        if w:
            found += [MeshConfig(**base, decode_limits=RoleLimits(s, t, k))
                      for s in space.max_num_seqs for t in space.max_num_batched_tokens for k in packs]
        else:  # a decode worker's max_num_seqs never binds (landed KV joins at once): only the chunking varies
            found += [MeshConfig(**base, prefill_limits=RoleLimits(DEFAULT_SEQS, t, k),
                                 decode_limits=RoleLimits(DEFAULT_SEQS, DEFAULT_TOKENS))
                      for t in space.max_num_batched_tokens for k in packs]
    return found


def _cpus(first: int, count: int, per_worker: int) -> str:
    groups = []
    for i in range(count):
        lo = first + i * per_worker
        groups.append(str(lo) if per_worker == 1 else f"{lo}-{lo + per_worker - 1}")
    return "/".join(groups)


def command(config: MeshConfig, cores_per_worker: int = 1) -> str:
    """The `kvmesh up` line for config (engine limits through the workers' KVMESH_* environment variables)."""
    c, k = config, cores_per_worker
    policy = f"KVMESH_SCHEDULER_POLICY={c.policy} "
    if c.colocated:
        pack = _pack("DECODE", c.decode_limits)
        return (f"{policy}KVMESH_DECODE_MAX_NUM_SEQS={c.decode_limits.max_num_seqs} "
                f"KVMESH_DECODE_MAX_NUM_BATCHED_TOKENS={c.decode_limits.max_num_batched_tokens} {pack}"
                f"kvmesh up --colocated --workers {c.colocated} --worker-cpus {_cpus(0, c.colocated, k)}")
    return (f"{policy}KVMESH_PREFILL_MAX_NUM_BATCHED_TOKENS={c.prefill_limits.max_num_batched_tokens} "
            f"{_pack('PREFILL', c.prefill_limits)}"
            f"kvmesh up --prefill {c.prefill} --decode {c.decode} --prefill-cpus {_cpus(0, c.prefill, k)} "
            f"--decode-cpus {_cpus(c.prefill * k, c.decode, k)}")


def _pack(role: str, limits: RoleLimits) -> str:
    return f"KVMESH_{role}_PACK_PROMPT_TOKENS={limits.pack_prompt_tokens} " if limits.pack_prompt_tokens else ""


def search(profile: Profile, arrivals: Sequence[Arrival], slo: SLO, space: SearchSpace,
           progress: Callable[[int, int, MeshConfig], None] | None = None) -> list[Plan]:
    """Simulate every candidate; plans best first: goodput per core, then attainment, then fewer cores."""
    plans = []
    configs = candidates(space)
    for i, config in enumerate(configs):
        if progress:
            progress(i, len(configs), config)
        workers = config.colocated or config.prefill + config.decode
        result = Simulation(profile, config, arrivals).run()
        plans.append(Plan(config, workers * space.cores_per_worker, predict(result, slo),
                          command(config, space.cores_per_worker)))
    plans.sort(key=lambda p: (-p.goodput_per_core, -p.prediction.attainment, p.cores))
    return distinct(plans)


def distinct(plans: Sequence[Plan]) -> list[Plan]:
    """plans without those that repeat an earlier one's mesh and figures (a limit the workload never reached)."""
    seen, kept = set(), []
    for plan in plans:
        c = plan.config
        key = (c.prefill, c.decode, c.colocated, repr(plan.prediction))
        if key not in seen:
            seen.add(key)
            kept.append(plan)
    return kept
