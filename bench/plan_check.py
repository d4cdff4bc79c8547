"""`kvmesh plan`'s simulator against the real engine: one colocated worker's step loop, replayed in real time.

    python bench/plan_check.py --model DIR --profile PROFILE.json [--rate 1] [--input-len 256] [--output-len 32]
                               [--num-requests 40] [--max-num-seqs 16] [--max-num-batched-tokens 512]
                               [--threads 1] [--cpus 1]

One LLMEngine (the profile's model, its thread count) is driven as a colocated worker's engine thread is:
requests join at their Poisson arrival times, `step()` runs while any is unfinished; each request's first
token and last token are stamped. The same arrivals run through the simulator as `colocated x1` with the same
limits. Prints TTFT and TPOT p50/p90 of both and their ratio. No gRPC, no gateway: this checks the cost
models and the step model, not the services around them.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

from kvmesh.services.plan.costs import Profile
from kvmesh.services.plan.sim import MeshConfig, SimResult, Simulation
from kvmesh.services.plan.trace import poisson
from kvmesh.services.plan.worker import RoleLimits


def replay(args, arrivals) -> SimResult:
    """Run the arrivals on a real engine in real time; the outcome in the simulator's shape."""
    import torch

    from kvmesh.services.engine.engine import LLMEngine
    from kvmesh.services.engine.sampler import SamplingParams

    torch.set_num_threads(args.threads)
    max_len = args.input_len + args.output_len + 16
    engine = LLMEngine.from_path(args.model, block_size=16, num_blocks=args.max_num_seqs * (max_len // 16 + 2) + 8,
                                 max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens)
    rng = np.random.default_rng(0)
    params = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True)
    first, finish = [-1.0] * len(arrivals), [-1.0] * len(arrivals)
    start, nxt = time.perf_counter(), 0
    while nxt < len(arrivals) or engine.has_unfinished():
        now = time.perf_counter() - start
        while nxt < len(arrivals) and arrivals[nxt].time_s <= now:
            engine.add_request(str(nxt), rng.integers(3, engine.vocab_size, args.input_len).tolist(), params)
            nxt += 1
        if not engine.has_unfinished():
            time.sleep(max(0.0, arrivals[nxt].time_s - now))
            continue
        outputs = engine.step()
        now = time.perf_counter() - start
        for out in outputs:
            i = int(out.request_id)
            if out.new_token_ids and first[i] < 0:
                first[i] = now
            if out.finished:
                finish[i] = now
    return SimResult(tuple(a.time_s for a in arrivals), tuple(first), tuple(finish),
                     tuple(a.output_length for a in arrivals), (False,) * len(arrivals), None, 0)


def figures(result: SimResult) -> dict:
    from kvmesh.services.plan.metrics import request_latencies

    ttft, tpot, _ = request_latencies(result)
    return {name: tuple(float(np.percentile(v, q)) for q in (50, 90)) for name, v in (("ttft", ttft), ("tpot", tpot))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--profile", required=True)
    for flag, kind, default in (("--rate", float, 1.0), ("--input-len", int, 256), ("--output-len", int, 32),
                                ("--num-requests", int, 40), ("--max-num-seqs", int, 16),
                                ("--max-num-batched-tokens", int, 512), ("--threads", int, 1), ("--cpus", str, "")):
        parser.add_argument(flag, type=kind, default=default)
    args = parser.parse_args()
    if args.cpus:
        os.sched_setaffinity(0, {int(c) for c in args.cpus.split(",")})
    arrivals = poisson(args.rate, args.input_len, args.output_len, args.num_requests, seed=0)
    config = MeshConfig(colocated=1, decode_limits=RoleLimits(args.max_num_seqs, args.max_num_batched_tokens),
                        cache=False)
    simulated = figures(Simulation(Profile.load(args.profile), config, arrivals).run())
    measured = figures(replay(args, arrivals))
    print("| metric | simulated p50 / p90 ms | engine p50 / p90 ms | simulated ÷ engine (p50, p90) |")
    print("| --- | --- | --- | --- |")
    for name in ("ttft", "tpot"):
        s, m = simulated[name], measured[name]
        print(f"| {name.upper()} | {s[0]:.0f} / {s[1]:.0f} | {m[0]:.0f} / {m[1]:.0f} | "
              f"{s[0] / m[0]:.2f}, {s[1] / m[1]:.2f} |")


if __name__ == "__main__":
    main()
