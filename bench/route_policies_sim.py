"""Routing policies compared in `kvmesh plan`'s simulator (the scheduler's real Registry, router and policies on
a simulated clock, workers costed by a profile): goodput under SLOs on a mixed trace with prefix reuse (from
`kvmesh bench trace-gen`'s generator), each mesh size at a rate per worker pair, every policy on the same trace.

    python bench/route_policies_sim.py bench/plan-profile-smollm2.json [--mesh 2x2 --mesh 16x16 --mesh 64x64]
        [--rate-per-pair 0.8] [--num-requests 3000] [--slo-ttft-ms 3000] [--slo-tpot-ms 150] [--json OUT]

Prints a Markdown table: per mesh and policy, goodput (req/s within both SLOs), its ratio to least_loaded's in
the same run, SLO attainment, rejected requests, TTFT p50/p99 and TPOT p50/p99 (ms).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from kvmesh.services.bench.lengths import parse_length
from kvmesh.services.bench.trace_gen import TraceSpec, generate, reuse_ratio
from kvmesh.services.plan.costs import Profile
from kvmesh.services.plan.metrics import SLO, predict
from kvmesh.services.plan.sim import MeshConfig, Simulation
from kvmesh.services.plan.trace import Arrival

#: (label, policy, whether the scheduler is told the SLOs): slo_aware without them never refuses a request, which
#: separates what its routing gains from what its early refusals gain
VARIANTS = (("least_loaded", "least_loaded", False), ("kv_aware", "kv_aware", False),
            ("slo_aware, no SLO", "slo_aware", False), ("slo_aware", "slo_aware", True))


def arrivals(rate: float, num_requests: int, input_len: str, output_len: str, seed: int) -> tuple[list, float]:
    """A mixed trace with shared system prompts (half of each first prompt) and multi-turn reuse."""
    spec = TraceSpec(num_requests, rate, parse_length(input_len), parse_length(output_len), prefix_reuse=0.5,
                     num_system_prompts=4, turns=2, turn_interval_s=5.0, block_size=64, seed=seed)
    records = generate(spec)
    start = records[0]["timestamp"]
    return ([Arrival((r["timestamp"] - start) / 1000, r["input_length"], r["output_length"], tuple(r["hash_ids"]))
             for r in records], reuse_ratio(records))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("profile")
    parser.add_argument("--mesh", action="append", default=[])
    parser.add_argument("--rate-per-pair", type=float, default=0.8)
    parser.add_argument("--num-requests", type=int, default=3000)
    parser.add_argument("--input-len", default="lognormal:256:1.0")
    parser.add_argument("--output-len", default="lognormal:64:0.8")
    parser.add_argument("--slo-ttft-ms", type=float, default=3000)
    parser.add_argument("--slo-tpot-ms", type=float, default=150)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default="")
    args = parser.parse_args()
    profile = Profile.load(args.profile)
    slo = SLO(args.slo_ttft_ms, args.slo_tpot_ms)
    rows = []
    print("| mesh | rate/s | policy | goodput/s | vs least_loaded | SLO % | rejected | TTFT p50/p99 ms | "
          "TPOT p50/p99 ms |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for mesh in args.mesh or ["2x2", "16x16", "64x64"]:
        p, d = (int(x) for x in mesh.split("x"))
        rate = args.rate_per_pair * min(p, d)
        trace, reuse = arrivals(rate, args.num_requests, args.input_len, args.output_len, args.seed)
        base = None
        for label, policy, told in VARIANTS:
            config = MeshConfig(prefill=p, decode=d, policy=policy, trace_block_tokens=64,
                                slo_ttft_s=slo.ttft_ms / 1000 if told else 0.0,
                                slo_tpot_s=slo.tpot_ms / 1000 if told else 0.0)
            result = predict(Simulation(profile, config, trace).run(), slo)
            base = result.goodput_rps if policy == "least_loaded" else base
            rows.append({"mesh": mesh, "rate": rate, "policy": label, "reuse": reuse,
                         "goodput_rps": result.goodput_rps, "attainment": result.attainment,
                         "rejected": result.num_rejected, "ttft_ms": result.ttft_ms, "tpot_ms": result.tpot_ms})
            ratio = result.goodput_rps / base if base else float("nan")
            print(f"| {mesh} | {rate:g} | {label} | {result.goodput_rps:.3f} | {ratio:.2f} | "
                  f"{100 * result.attainment:.1f} | {result.num_rejected} | "
                  f"{result.ttft_ms.get('p50', 0):.0f}/{result.ttft_ms.get('p99', 0):.0f} | "
                  f"{result.tpot_ms.get('p50', 0):.0f}/{result.tpot_ms.get('p99', 0):.0f} |", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
