"""The `kvmesh plan` command: `kvmesh plan profile` measures, `kvmesh plan --profile …` simulates and searches."""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kvmesh.services.plan.search import Plan


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of `kvmesh plan` and its `profile` sub-command."""
    parser.add_argument("--profile", help="a profile JSON written by `kvmesh plan profile`")
    parser.add_argument("--trace", help="a Mooncake-format JSONL trace (timestamp ms, input_length, "
                                        "output_length, hash_ids)")
    parser.add_argument("--trace-block-size", type=int, default=512, help="tokens per hash id in --trace")
    parser.add_argument("--rate", type=float, help="instead of --trace: Poisson arrivals per second")
    parser.add_argument("--input-len", type=int, default=256, help="with --rate: prompt tokens")
    parser.add_argument("--output-len", type=int, default=64, help="with --rate: output tokens")
    parser.add_argument("--num-requests", type=int, default=1000, help="with --rate: how many requests")
    parser.add_argument("--seed", type=int, default=0, help="with --rate: the arrivals' random seed")
    parser.add_argument("--slo-ttft-ms", type=float, help="time-to-first-token target, ms")
    parser.add_argument("--slo-tpot-ms", type=float, help="time-per-output-token target, ms")
    parser.add_argument("--cores", type=int, help="cores the mesh's workers may use in all")
    parser.add_argument("--cores-per-worker", type=int, default=1, help="cores each worker is pinned to")
    parser.add_argument("--max-num-seqs", type=_ints, default=(16, 64), help="grid of max_num_seqs, e.g. 16,64")
    parser.add_argument("--max-num-batched-tokens", type=_ints, default=(512, 2048),
                        help="grid of max_num_batched_tokens (chunk size), e.g. 512,2048")
    parser.add_argument("--pack-prompt-tokens", type=_ints, default=(0,),
                        help="grid of pack_prompt_tokens (a step starts another prompt only below this many prompt "
                             "tokens; 0: to the budget), e.g. 0,64")
    parser.add_argument("--policy", default="least_loaded", help="the scheduler's routing policy to simulate")
    parser.add_argument("--heartbeat-s", type=float, default=1.0, help="workers' heartbeat interval as the "
                        "scheduler sees loads (its lease / 3); 0: every load change at once")
    parser.add_argument("--no-cache", action="store_true", help="simulate without a KV cache (no prefix reuse)")
    parser.add_argument("--top", type=int, default=5, help="how many configurations to print")
    parser.add_argument("--json", action="store_true", help="print the ranked configurations as JSON")
    parser.set_defaults(func=run)
    sub = parser.add_subparsers(dest="plan_command")
    prof = sub.add_parser("profile", help="measure this machine's prefill and decode cost models")
    prof.add_argument("--model", required=True, help="model folder (HF format)")
    prof.add_argument("--out", default="kvmesh-profile.json", help="where to write the profile JSON")
    prof.add_argument("--threads", type=int, default=1, help="torch threads (one worker's share of the cores)")
    prof.add_argument("--quick", action="store_true", help="a small grid (seconds on the test models)")
    prof.set_defaults(func=run_profile_command)


def run_profile_command(args: argparse.Namespace) -> int:
    """`kvmesh plan profile`: measure, fit, save, summarise."""
    from kvmesh.services.plan.profile import QUICK, ProfileGrid, run_profile

    def progress(phase: str, i: int, n: int) -> None:
        print(f"\rprofiling {phase:<8} {i + 1:>3}/{n}", end="", file=sys.stderr, flush=True)

    t = time.perf_counter()
    profile = run_profile(args.model, QUICK if args.quick else ProfileGrid(), args.threads, progress)
    print(file=sys.stderr)
    profile.save(args.out)
    p, d = profile.prefill, profile.decode
    print(f"prefill s = {p.a:.3g} + {p.b:.3g}·tokens + {p.c:.3g}·tokens²")
    print(f"decode step s = {d.a:.3g} + {d.b:.3g}·batch + {d.c:.3g}·context_tokens")
    print(f"transfer {profile.transfer_gbps:.2f} GB/s, {profile.kv_bytes_per_token} KV bytes/token; "
          f"cpu {profile.cpu.get('model_name')}; {time.perf_counter() - t:.1f} s; written to {args.out}")
    return 0


def _check(args: argparse.Namespace) -> str | None:
    if not args.profile:
        return "--profile FILE is needed (make one with `kvmesh plan profile --model DIR`)"
    if bool(args.trace) == (args.rate is not None):
        return "give one of --trace FILE or --rate R"
    if args.slo_ttft_ms is None or args.slo_tpot_ms is None or args.cores is None:
        return "--slo-ttft-ms, --slo-tpot-ms and --cores are needed"
    return None


def _ms(figures: dict, digits: int) -> str:
    """'p50 / p90' of a latency, or '-' when no request was served."""
    if figures["p50"] is None:
        return "- / -"
    return f"{figures['p50']:.{digits}f} / {figures['p90']:.{digits}f}"


def _table(plans: list[Plan]) -> str:
    rows = [f"{'mesh':<18}{'cores':>6}{'goodput/s':>11}{'/core':>8}{'SLO %':>7}{'TTFT p50/p90 ms':>20}"
            f"{'TPOT p50/p90 ms':>18}"]
    for plan in plans:
        c, p = plan.config, plan.prediction
        mesh = f"colocated x{c.colocated}" if c.colocated else f"{c.prefill}P + {c.decode}D"
        rows.append(f"{mesh:<18}{plan.cores:>6}{p.goodput_rps:>11.3f}{plan.goodput_per_core:>8.3f}"
                    f"{100 * p.attainment:>7.1f}{_ms(p.ttft_ms, 0):>20}{_ms(p.tpot_ms, 1):>18}\n    {plan.command}")
    return "\n".join(rows)


def run(args: argparse.Namespace) -> int:
    """`kvmesh plan`: simulate every placement that fits --cores and print the best by goodput per core."""
    # imported here: `kvmesh --help` builds every sub-command's parser and should not load the simulator
    from kvmesh.services.plan.costs import Profile
    from kvmesh.services.plan.metrics import SLO
    from kvmesh.services.plan.search import SearchSpace, search
    from kvmesh.services.plan.trace import poisson, read_trace

    problem = _check(args)
    if problem:
        print(f"kvmesh plan: {problem}", file=sys.stderr)
        return 2
    try:
        profile = Profile.load(args.profile)
        arrivals = (read_trace(args.trace) if args.trace else
                    poisson(args.rate, args.input_len, args.output_len, args.num_requests, args.seed))
        space = SearchSpace(args.cores, args.cores_per_worker, args.max_num_seqs, args.max_num_batched_tokens,
                            args.policy, not args.no_cache, args.heartbeat_s, args.trace_block_size,
                            args.pack_prompt_tokens)
        space.validate()
    except (OSError, ValueError, KeyError) as exc:
        print(f"kvmesh plan: {exc}", file=sys.stderr)
        return 2

    def progress(i: int, n: int, config) -> None:
        print(f"\rsimulating {i + 1}/{n} ({len(arrivals)} requests)", end="", file=sys.stderr, flush=True)

    plans = search(profile, arrivals, SLO(args.slo_ttft_ms, args.slo_tpot_ms), space, progress)
    print(file=sys.stderr)
    top = plans[:max(1, args.top)]
    if args.json:
        print(json.dumps([p.to_json() for p in top], indent=1))
        return 0
    span = arrivals[-1].time_s - arrivals[0].time_s
    print(f"workload: {len(arrivals)} requests over {span:.1f} s ({len(arrivals) / span if span else 0:.2f}/s), "
          f"prompts {sum(a.input_length for a in arrivals) / len(arrivals):.0f} and replies "
          f"{sum(a.output_length for a in arrivals) / len(arrivals):.0f} tokens on average; SLO TTFT "
          f"{args.slo_ttft_ms:g} ms, TPOT {args.slo_tpot_ms:g} ms; {len(plans)} distinct placements within {args.cores} cores")
    print(_table(top))
    return 0
