"""How fast `kvmesh plan`'s simulator runs: one simulation per mesh of a Poisson workload, timed.

    python bench/plan_speed.py PROFILE.json [--num-requests 10000] [--rate 0.5] [--input-len 256]
                               [--output-len 64] [--mesh 1x1 --mesh c2 --mesh 64x64@60 ...]

A mesh is PxD (prefill x decode) or cN (N colocated workers), optionally @RATE to override --rate.
Prints one Markdown row per mesh: requests, how many finished and were rejected, engine steps, seconds.
"""

from __future__ import annotations

import argparse
import time

from kvmesh.services.plan.costs import Profile
from kvmesh.services.plan.sim import MeshConfig, Simulation
from kvmesh.services.plan.trace import poisson


def mesh(text: str, rate: float) -> tuple[str, MeshConfig, float]:
    shape, _, at = text.partition("@")
    rate = float(at) if at else rate
    if shape.startswith("c"):
        return text, MeshConfig(colocated=int(shape[1:])), rate
    p, d = (int(x) for x in shape.split("x"))
    return text, MeshConfig(prefill=p, decode=d), rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("profile")
    parser.add_argument("--num-requests", type=int, default=10_000)
    parser.add_argument("--rate", type=float, default=0.5)
    parser.add_argument("--input-len", type=int, default=256)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--mesh", action="append", default=[])
    args = parser.parse_args()
    profile = Profile.load(args.profile)
    print("| mesh | rate/s | requests | finished | rejected | engine steps | seconds |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, config, rate in (mesh(m, args.rate) for m in args.mesh or ["1x1", "c2", "8x8"]):
        arrivals = poisson(rate, args.input_len, args.output_len, args.num_requests)
        t = time.perf_counter()
        result = Simulation(profile, config, arrivals).run()
        seconds = time.perf_counter() - t
        finished = sum(1 for f in result.finish_s if f >= 0)
        print(f"| {name} | {rate:g} | {args.num_requests:,} | {finished:,} | {sum(result.rejected):,} | "
              f"{result.num_steps:,} | {seconds:.2f} |")


if __name__ == "__main__":
    main()
