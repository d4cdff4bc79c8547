"""How long one routing decision takes with many workers registered: the scheduler's real Registry, KV index and
router over synthetic registrations (heartbeats with varied loads, fitted cost models, a prompt held in part by
a few decode workers and the cache), each policy timed on the same states in the same run.

    python bench/route_scale.py [--prefill 64] [--decode 64] [--prompt-tokens 4000] [--routes 2000]
                                [--links fitted|prior] [--transports none|uniform|mixed]

`--links fitted` (the default, as a running scheduler has them) gives the predictions a link book in which half
the prefill workers have a fitted handoff link to every decode worker (the others fall back to the backend's fit)
and every prefill worker a fitted cache-fetch link; `--links prior` gives them the configured priors only.

Prints a Markdown table: p50/p99 of `router.route` (the decision) in CPU time on its thread and in wall time, and
the wall time of the whole in-process Route path the servicer runs (prompt hashing once, the KV index's lookup
for every decode worker, then the decision), in microseconds, with each policy's CPU p99 as a ratio of
least_loaded's; then the CPU's model and flags. On a shared, loaded machine the wall p99 mostly measures the
neighbours (every policy's alike); the CPU time is the decision's own cost.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import random
import statistics
import time
from pathlib import Path

from kvmesh.services.cost_model import DecodeModel, PrefillModel
from kvmesh.services.kv_identity import KVLayout, PromptHashes
from kvmesh.services.scheduler import router
from kvmesh.services.scheduler.links import MIN_SAMPLES, LinkBook, LinkSample, Reported
from kvmesh.services.scheduler.models import Fit
from kvmesh.services.scheduler.policies import POLICIES, Links, RouteQuery
from kvmesh.services.scheduler.predict import receiver_address
from kvmesh.services.scheduler.registry import Load, Registry, Role, WorkerSpec

LAYOUT = KVLayout("bench", "bfloat16", 16, 30, 3, 64)


#: Backends per worker, by --transports: every worker the same set (one group: the pairing's fast path), or
#: per host either a same-host-only set or a cross-host one (pairs decided per decode worker).
TRANSPORTS = {"none": lambda i: (), "uniform": lambda i: ("shm", "ucx", "grpc"),
              "mixed": lambda i: ("shm",) if i % 2 else ("ucx", "grpc")}


def build(num_prefill: int, num_decode: int, prompt: tuple[int, ...], rng: random.Random,
          transports: str = "uniform") -> Registry:
    """A registry of synthetic workers with varied loads and fits on 8 hosts; a few decode workers hold the
    prompt's head."""
    registry = Registry(lease_s=1e9)
    for role, count in ((Role.PREFILL, num_prefill), (Role.DECODE, num_decode)):
        for i in range(count):
            worker = registry.register(WorkerSpec(role, f"10.0.{role}.{i}:5000", layout=LAYOUT, host_id=f"h{i % 8}",
                                                  transports=TRANSPORTS[transports](i)))
            registry.heartbeat(worker.worker_id, Load(
                num_waiting=rng.randrange(4), num_running=rng.randrange(32), num_free_blocks=rng.randrange(1000),
                num_total_blocks=1000, num_pending_prefill_tokens=rng.randrange(20_000),
                num_pending_prefill=rng.randrange(4)))
            worker.steps.fit = Fit(PrefillModel(0.004, rng.uniform(1e-4, 3e-4), 1e-9),
                                   DecodeModel(0.01, rng.uniform(5e-4, 2e-3), 1e-7), 64)
            if role == Role.DECODE and i % 8 == 0:  # every eighth decode worker holds a part of the prompt
                held = PromptHashes(prompt, "").of(LAYOUT)[: rng.randrange(1, len(prompt) // 16)]
                registry.apply_kv_events(worker.worker_id, held, [], True)
    return registry


def fitted_links(registry: Registry, rng: random.Random) -> Links:
    """A link book as heartbeats would fill it: handoff links from every other prefill worker to every decode
    worker, fetch links into every prefill worker (the cache reports those)."""
    book = LinkBook()
    decode = [receiver_address(w) for w in registry.workers(Role.DECODE)]
    fetches = []
    for i, prefill in enumerate(registry.workers(Role.PREFILL)):
        if i % 2 == 0:
            book.add(prefill.worker_id, [Reported("shm", peer, LinkSample(n, 0.001 + n / 2e9)) for peer in decode
                                         for n in (rng.randrange(1 << 20, 1 << 26) for _ in range(MIN_SAMPLES))])
        fetches += [Reported("shm", receiver_address(prefill), LinkSample(n, 0.002 + n / 3e9, n // 4), True)
                    for n in (rng.randrange(1 << 20, 1 << 26) for _ in range(MIN_SAMPLES))]
    book.add("cache", fetches)
    return Links(book=book)


def route_once(registry: Registry, query: RouteQuery, policy) -> tuple[float, float, float]:
    """(wall seconds of the decision, its CPU seconds on this thread, wall seconds of hashing + KV index +
    decision) for one request. CPU time leaves out the time other processes held the core: on a shared, loaded
    machine the wall p99 measures the neighbours."""
    start = time.perf_counter()
    hashes = PromptHashes(query.prompt_token_ids, "")
    held = registry.kv_index.hit_tokens(registry.workers(Role.DECODE), query.prompt_token_ids, "", hashes)
    query = dataclasses.replace(query, decode_cached_tokens=held)
    decided, cpu = time.perf_counter(), time.thread_time()
    router.route(query, registry.routable(), policy, max_queue=64)
    cpu, end = time.thread_time() - cpu, time.perf_counter()
    return end - decided, cpu, end - start


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def cpu() -> dict:
    info = Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []
    pick = lambda key: next((line.split(":", 1)[1].strip() for line in info if line.startswith(key)), "")  # noqa: E731
    return {"model": pick("model name"), "flags": pick("flags"), "python": platform.python_version()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prefill", type=int, default=64)
    parser.add_argument("--decode", type=int, default=64)
    parser.add_argument("--prompt-tokens", type=int, default=4000)
    parser.add_argument("--routes", type=int, default=2000)
    parser.add_argument("--links", choices=("fitted", "prior"), default="fitted",
                        help="the predictions' KV link models: fitted per pair (a link book) or the priors")
    parser.add_argument("--transports", choices=sorted(TRANSPORTS), default="uniform",
                        help="backends the workers offer (see TRANSPORTS)")
    parser.add_argument("--json", default="", help="also write the results here")
    args = parser.parse_args()
    rng = random.Random(0)
    prompt = tuple(rng.randrange(1, 49_000) for _ in range(args.prompt_tokens))
    registry = build(args.prefill, args.decode, prompt, rng, args.transports)
    links = fitted_links(registry, rng) if args.links == "fitted" else Links()
    query = RouteQuery("bench", prompt, cached_tokens={LAYOUT: args.prompt_tokens // 2},
                       cached_ssd_tokens={LAYOUT: args.prompt_tokens // 4}, links=links)
    results = {}
    for _ in range(2):  # the first pass warms every policy up; the second is timed, policies interleaved
        times = {name: ([], [], []) for name in POLICIES}
        for i in range(args.routes):
            for name, policy in POLICIES.items():
                for column, value in zip(times[name], route_once(registry, dataclasses.replace(
                        query, request_id=f"r{i}"), policy)):
                    column.append(value)
        results = {name: {"decision_p50_us": 1e6 * percentile(d, 50), "decision_p99_us": 1e6 * percentile(d, 99),
                          "decision_cpu_p50_us": 1e6 * percentile(c, 50),
                          "decision_cpu_p99_us": 1e6 * percentile(c, 99),
                          "route_p50_us": 1e6 * percentile(w, 50), "route_p99_us": 1e6 * percentile(w, 99)}
                   for name, (d, c, w) in times.items()}
    base = results["least_loaded"]["decision_cpu_p99_us"]
    print(f"{args.prefill} prefill x {args.decode} decode workers ({args.transports} transports), "
          f"{args.prompt_tokens}-token prompt, {args.routes} routes per policy, {args.links} links\n")
    print("| policy | decision CPU p50 µs | decision CPU p99 µs | CPU p99 / least_loaded | decision wall p50 / p99 µs"
          " | Route path wall p50 / p99 µs |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, r in results.items():
        print(f"| {name} | {r['decision_cpu_p50_us']:.0f} | {r['decision_cpu_p99_us']:.0f} | "
              f"{r['decision_cpu_p99_us'] / base:.2f} | {r['decision_p50_us']:.0f} / {r['decision_p99_us']:.0f} | "
              f"{r['route_p50_us']:.0f} / {r['route_p99_us']:.0f} |")
    info = cpu()
    print(f"\nCPU: {info['model']}; Python {info['python']}\nflags: {info['flags']}")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": results, "cpu": info}, indent=1) + "\n")


if __name__ == "__main__":
    main()
