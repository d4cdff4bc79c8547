"""The scheduler's planner against every static split, in `kvmesh plan`'s simulator alone (issue 19).

    python bench/planner.py [--profile bench/plan-profile-smollm2.json] [--workers 4] [--phase-s 120]
                            [--interval-s 15] [--window-s 30] [--out bench/planner.json]

A workload whose prompt lengths shift mid-run — short chat, then long documents, then short chat, each phase
made by `trace-gen` (services/bench/trace_gen.py) — is played on `--workers` workers:

- static: every P:D split, the whole run in one simulation;
- planner: the same run in a FlipSimulation (services/plan/flips.py), where every `--interval-s` the planner's own
  code (the ArrivalWindow, `workload`, `candidate_splits`, `simulate_splits`, `decide`, `choose_flips`) looks at
  the last `--window-s` of arrivals and may flip workers; a flipped worker leaves routing, drains what it holds,
  then serves in its new role.

Goodput counts requests within both SLOs over the run's span (first arrival to last finish).
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass

import numpy as np

from kvmesh.services.bench.lengths import LengthDist
from kvmesh.services.bench.trace_gen import TraceSpec, generate
from kvmesh.services.plan.costs import Profile
from kvmesh.services.plan.flips import FlipSimulation
from kvmesh.services.plan.metrics import SLO, predict, request_latencies
from kvmesh.services.plan.sim import MeshConfig, SimResult, Simulation
from kvmesh.services.plan.trace import Arrival
from kvmesh.services.scheduler import planner
from kvmesh.services.scheduler.planner import PlannerSettings, Split
from kvmesh.services.scheduler.planner_window import ArrivalWindow

from machine import machine


@dataclass(frozen=True)
class Phase:
    name: str
    seconds: float
    rate: float
    input_len: LengthDist
    output_len: LengthDist


def phases(args) -> list[Phase]:
    chat = (LengthDist("uniform", 32, 128), LengthDist("uniform", 64, 192))
    docs = (LengthDist("uniform", 600, 1000), LengthDist("uniform", 8, 32))
    return [Phase("chat", args.phase_s, args.chat_rate, *chat), Phase("documents", args.phase_s, args.docs_rate, *docs),
            Phase("chat", args.phase_s, args.chat_rate, *chat)]


def trace(plan: list[Phase], seed: int) -> list[Arrival]:
    """The phases one after another, each a trace-gen trace (no prefix reuse: the cache is not what is measured)."""
    arrivals, start = [], 0.0
    for i, phase in enumerate(plan):
        spec = TraceSpec(max(1, round(phase.rate * phase.seconds)), phase.rate, phase.input_len, phase.output_len,
                         prefix_reuse=0.0, seed=seed + i)
        arrivals += [Arrival(start + r["timestamp"] / 1000.0, r["input_length"], r["output_length"])
                     for r in generate(spec) if r["timestamp"] / 1000.0 < phase.seconds]
        start += phase.seconds
    return arrivals


def static(profile, split: Split, arrivals, base: MeshConfig) -> SimResult:
    """One simulation of the whole run on a fixed split."""
    config = MeshConfig(prefill=split.prefill, decode=split.decode, policy=base.policy, cache=False,
                        heartbeat_s=base.heartbeat_s, slo_ttft_s=base.slo_ttft_s, slo_tpot_s=base.slo_tpot_s)
    return Simulation(profile, config, arrivals).run()


def figures(result: SimResult, slo: SLO, plan: list[Phase]) -> dict:
    """Goodput and attainment over the run, and the attainment of the requests arriving in each phase."""
    prediction = predict(result, slo)
    ttft, tpot, served = request_latencies(result)
    ok = served & (ttft <= slo.ttft_ms) & (tpot <= slo.tpot_ms)
    arrival, bounds = np.asarray(result.arrival_s), np.cumsum([0.0] + [p.seconds for p in plan])
    phases_ok = [float(ok[(arrival >= lo) & (arrival < hi)].mean()) for lo, hi in zip(bounds, bounds[1:])]
    return {"goodput_rps": round(prediction.goodput_rps, 4), "slo_attainment": round(prediction.attainment, 4),
            "num_requests": prediction.num_requests, "num_rejected": prediction.num_rejected,
            "phase_attainment": [round(x, 3) for x in phases_ok]}


def replanner(profile, slo, base, settings: PlannerSettings, window_s: float, log: list, frozen=(0.0, 0.0),
              with_backlog: bool = True):
    """The planner's decision at each round of a FlipSimulation, from the arrivals of the last window_s; no flips
    in the interval `frozen` (the counterfactual of a flip)."""
    last_change = [None]

    def replan(now: float, sim: FlipSimulation):
        if frozen[0] <= now < frozen[1]:
            return []
        clock = [0.0]
        window = ArrivalWindow(window_s, clock=lambda: clock[0])
        for job in sim.jobs:
            if now - window_s <= job.arrival_s <= now:
                clock[0] = job.arrival_s
                window.record(job.input_length, job.output_length)
        clock[0] = now
        stats = window.stats()
        if not stats.num_requests:
            return []
        queued = planner.backlog(sim.registry.workers(), stats, settings.max_sim_requests) if with_backlog else []
        work = queued + planner.workload(stats, window_s, settings.max_sim_requests)
        current = Split(*sim.split())
        splits = planner.candidate_splits(Split(0, 0), current.total, settings)
        predicted = planner.simulate_splits(profile, work, splits, slo, base, len(queued))
        decision = planner.decide(current, predicted, now, last_change[0], settings)
        log.append({"t_s": round(now, 1), "action": decision.action, "current": str(decision.current),
                    "target": str(decision.target), "predicted_gain": round(decision.gain, 3),
                    "current_goodput": round(decision.current_goodput, 3),
                    "target_goodput": round(decision.target_goodput, 3)})
        if decision.action != "flip":
            return []
        last_change[0] = now
        return [(w.worker_id, role) for w, role in planner.choose_flips(sim.registry.workers(), decision.changes)]

    return replan


def planned(profile, arrivals, slo, base, args, frozen=(0.0, 0.0)) -> tuple[SimResult, list[dict], list]:
    """The planner-driven run: (its result, every decision, the flips as (asked at, done at, role))."""
    settings = PlannerSettings(args.threshold, args.hold_s, max_sim_requests=args.max_sim_requests)
    p, d = (int(x) for x in args.start.split("x"))
    config = MeshConfig(prefill=p, decode=d, policy=base.policy, cache=False, heartbeat_s=base.heartbeat_s,
                        slo_ttft_s=base.slo_ttft_s, slo_tpot_s=base.slo_tpot_s)
    log: list = []
    replan = replanner(profile, slo, base, settings, args.window_s, log, frozen, not args.no_backlog)
    sim = FlipSimulation(profile, config, arrivals, replan, args.interval_s)
    return sim.run(), log, sim.flips


def ok_between(result: SimResult, slo: SLO, start: float, end: float) -> int:
    """Requests arriving in [start, end) served within both SLOs."""
    ttft, tpot, served = request_latencies(result)
    arrival = np.asarray(result.arrival_s)
    return int((served & (ttft <= slo.ttft_ms) & (tpot <= slo.tpot_ms) & (arrival >= start) & (arrival < end)).sum())


def check_predictions(profile, arrivals, slo, base, args, result: SimResult, decisions: list[dict]) -> list[dict]:
    """Each flip's predicted gain against the measured one: the requests arriving in the window after it that
    met both SLOs, with the flip against the same run with no flip in that window."""
    checks = []
    for d in (d for d in decisions if d["action"] == "flip"):
        t, end = d["t_s"], d["t_s"] + args.window_s
        without, _, _ = planned(profile, arrivals, slo, base, args, frozen=(t, end))
        ok_with, ok_without = ok_between(result, slo, t, end), ok_between(without, slo, t, end)
        measured = ok_with / ok_without - 1 if ok_without else (math.inf if ok_with else 0.0)
        checks.append({"t_s": t, "flip": f"{d['current']} -> {d['target']}", "predicted_gain": d["predicted_gain"],
                       "measured_gain": round(measured, 3), "ok_with": ok_with, "ok_without": ok_without})
    return checks


def run_seed(args, seed: int, profile: Profile, slo: SLO, base: MeshConfig) -> dict:
    """Every static split and the planner on one seed's workload."""
    plan = phases(args)
    arrivals = trace(plan, seed)
    rows = {f"static {Split(p, args.workers - p)}": figures(static(profile, Split(p, args.workers - p), arrivals,
                                                                   base), slo, plan)
            for p in range(1, args.workers)}
    result, decisions, flips = planned(profile, arrivals, slo, base, args)
    rows["planner"] = figures(result, slo, plan)
    best = max(r["goodput_rps"] for n, r in rows.items() if n.startswith("static"))
    return {"seed": seed, "num_requests": len(arrivals), "results": rows, "decisions": decisions,
            "flips": [{"asked_s": round(a, 2), "done_s": round(d, 2), "role": r.name.lower()} for a, d, r in flips],
            "planner_vs_best_static": round(rows["planner"]["goodput_rps"] / best, 3) if best else None,
            "predictions": check_predictions(profile, arrivals, slo, base, args, result, decisions)}


def show(run: dict) -> None:
    print(f"\nseed {run['seed']}: {run['num_requests']} requests")
    print("| mesh | goodput/s | SLO attainment | per phase | rejected |\n| --- | --- | --- | --- | --- |")
    for name, row in run["results"].items():
        per_phase = " / ".join(f"{100 * x:.0f} %" for x in row["phase_attainment"])
        print(f"| {name} | {row['goodput_rps']:.3f} | {100 * row['slo_attainment']:.1f} % | {per_phase} | "
              f"{row['num_rejected']} |")
    print(f"planner / best static: {run['planner_vs_best_static']}")
    for d in run["decisions"]:
        if d["action"] != "keep":
            print(f"  t={d['t_s']:.0f}s {d['action']} {d['current']} -> {d['target']} ({d['predicted_gain']:+.0%})")
    for f in run["flips"]:
        print(f"  flip to {f['role']}: asked {f['asked_s']} s, serving {f['done_s']} s")
    for c in run["predictions"]:
        print(f"  t={c['t_s']:.0f}s {c['flip']}: predicted {c['predicted_gain']:+.0%}, measured "
              f"{c['measured_gain']:+.0%} ({c['ok_with']} vs {c['ok_without']} within SLO in the next window)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="bench/plan-profile-smollm2.json")
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--phase-s", type=float, default=120.0)
    parser.add_argument("--chat-rate", type=float, default=3.0)
    parser.add_argument("--docs-rate", type=float, default=0.8)
    parser.add_argument("--slo-ttft-ms", type=float, default=5000)
    parser.add_argument("--slo-tpot-ms", type=float, default=150)
    parser.add_argument("--interval-s", type=float, default=15.0)
    parser.add_argument("--window-s", type=float, default=30.0)
    parser.add_argument("--threshold", type=float, default=0.1)
    parser.add_argument("--hold-s", type=float, default=30.0)
    parser.add_argument("--max-sim-requests", type=int, default=200)
    parser.add_argument("--start", default="2x2", help="the planner's starting split, PxD")
    parser.add_argument("--no-backlog", action="store_true", help="plan from an empty mesh (the queued work unseen)")
    parser.add_argument("--seeds", default="0,1,2,3,4", help="workload seeds, comma-separated")
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    profile = Profile.load(args.profile)
    slo = SLO(args.slo_ttft_ms, args.slo_tpot_ms)
    base = MeshConfig(prefill=1, decode=1, cache=False, heartbeat_s=1.0, slo_ttft_s=slo.ttft_ms / 1000,
                      slo_tpot_s=slo.tpot_ms / 1000)
    print("phases: " + ", ".join(f"{p.name} {p.seconds:g} s at {p.rate:g}/s" for p in phases(args)))
    runs = [run_seed(args, int(seed), profile, slo, base) for seed in args.seeds.split(",")]
    for run in runs:
        show(run)
    ratios = [r["planner_vs_best_static"] for r in runs]
    summary = {"mean_ratio": round(sum(ratios) / len(ratios), 3), "min_ratio": min(ratios),
               "max_ratio": max(ratios)}
    print(f"\nplanner / best static over {len(runs)} seeds: mean {summary['mean_ratio']}, "
          f"min {summary['min_ratio']}, max {summary['max_ratio']}")
    if args.out:
        with open(args.out, "w") as out:
            json.dump({"args": vars(args), "machine": machine(), "summary": summary, "runs": runs}, out, indent=1)


if __name__ == "__main__":
    main()
