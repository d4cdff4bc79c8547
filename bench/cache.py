"""KV cache pool benchmark: TTFT of 2,048-token prompts with 0 %, 50 % and 90 % of their prefix cached, served
from the DRAM tier and from the SSD tier, through a real mesh (scheduler, cache, one prefill and one decode
worker, gateway) on the `small` preset.

    python bench/cache.py [--out FILE.json] [--quick] [--results bench/RESULTS.md]

Each measurement uses a fresh random prompt. For a hit of k tokens, a first request with the prompt's first
k + 1 tokens puts its k / 16 blocks into the cache (waited for, so no background put competes with the
measured request); then the full prompt is sent with max_tokens=2 and TTFT is the time from the gRPC Generate
call to the first streamed token. The SSD runs use a cache whose DRAM budget is smaller than one block, so every
block is written to and read from the SSD tier's files (through the OS page cache, as a warm SSD would be).
Rows: {"tier", "hit_fraction", "cached_tokens", "ttft_s" (median), "ttft_all"}.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "e2e"))

PROMPT_TOKENS = 2048
BLOCK = 16
FRACTIONS = (0.0, 0.5, 0.9)


def cached_tokens_for(fraction: float) -> int:
    return int(PROMPT_TOKENS * fraction) // BLOCK * BLOCK


def stats(mesh):
    from kvmesh.v1 import cache_pb2, cache_pb2_grpc

    return cache_pb2_grpc.CacheStub(mesh.channel(mesh.cache.address)).Stats(cache_pb2.StatsRequest(), timeout=5)


def wait_puts(mesh, target: int, ssd: bool, timeout_s: float = 60.0) -> None:
    """Wait until the cache has stored target blocks in all (and, for ssd, published them on the SSD tier)."""
    deadline = time.monotonic() + timeout_s
    while True:
        s = stats(mesh)
        ssd_blocks = next((t.num_blocks for t in s.tiers if t.name == "ssd"), 0)
        if s.puts >= target and (not ssd or ssd_blocks >= target):
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"cache holds {s.puts} puts / {ssd_blocks} SSD blocks, expected {target}")
        time.sleep(0.05)


def ttft(mesh, ids: list[int]) -> tuple[float, int]:
    from kvmesh.v1 import common_pb2, gateway_pb2

    request = gateway_pb2.GenerateRequest(prompt_token_ids=ids, sampling=common_pb2.SamplingParams(
        temperature=0.0, max_tokens=2, ignore_eos=True))
    start = time.perf_counter()
    first, cached = None, 0
    for response in mesh.gateway_stub().Generate(request, timeout=300):
        if first is None and response.token_ids:
            first = time.perf_counter() - start
        if response.HasField("usage"):
            cached = response.usage.cached_tokens
    return first, cached


def run_tier(model: str, tier: str, reps: int, rng: random.Random) -> list[dict]:
    from mesh import start_mesh

    with tempfile.TemporaryDirectory() as ssd_dir:
        dram = "1" if tier == "ssd" else str(4 << 30)
        mesh = start_mesh(model, transport="shm", cache_args=("--dram-bytes", dram, "--ssd-dir", ssd_dir),
                          worker_args=("--kv-cache-bytes", str(1 << 30), "--max-num-batched-tokens", "2048",
                                       "--handoff-lease-s", "120"),
                          lease_s=10.0)
        rows, puts = [], 0
        try:
            ttft(mesh, [rng.randrange(3, 4000) for _ in range(PROMPT_TOKENS)])  # warm up every worker
            puts = PROMPT_TOKENS // BLOCK  # the warm-up's blocks, offered behind its response
            wait_puts(mesh, puts, tier == "ssd")
            for fraction in FRACTIONS:
                k, times, hits = cached_tokens_for(fraction), [], []
                for _ in range(reps):
                    prompt = [rng.randrange(3, 4000) for _ in range(PROMPT_TOKENS)]
                    if k:
                        ttft(mesh, prompt[:k + 1])
                        puts += k // BLOCK
                    wait_puts(mesh, puts, tier == "ssd")
                    seconds, cached = ttft(mesh, prompt)
                    times.append(seconds)
                    hits.append(cached)
                    puts += PROMPT_TOKENS // BLOCK - max(k, cached) // BLOCK
                    wait_puts(mesh, puts, False)  # the measured prompt's own offers, before the next one
                rows.append({"tier": tier, "hit_fraction": fraction, "cached_tokens": statistics.median(hits),
                             "ttft_s": statistics.median(times), "ttft_all": times})
                print(f"  {tier:4s} {fraction:4.0%} cached={rows[-1]['cached_tokens']:5.0f} "
                      f"ttft={rows[-1]['ttft_s'] * 1000:7.1f} ms", file=sys.stderr)
        finally:
            mesh.close()
    return rows


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    width = 0.38
    for i, tier in enumerate(("dram", "ssd")):
        mine = [r for r in rows if r["tier"] == tier]
        xs = [j + (i - 0.5) * width for j in range(len(mine))]
        ax.bar(xs, [r["ttft_s"] * 1000 for r in mine], width, label=tier.upper())
    ax.set_xticks(range(len(FRACTIONS)), [f"{f:.0%} cached" for f in FRACTIONS])
    ax.set_ylabel("TTFT, ms (median)")
    ax.set_title(f"TTFT of {PROMPT_TOKENS}-token prompts, small preset")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def write_results(rows: list[dict], command: str, path: Path, png: Path) -> None:
    cold = {r["tier"]: r["ttft_s"] for r in rows if r["hit_fraction"] == 0.0}
    lines = ["", f"## KV cache pool ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})", "", f"`{command}`", "",
             "| tier | cached | cached tokens | TTFT ms (median) | vs cold |", "| --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['tier']} | {r['hit_fraction']:.0%} | {r['cached_tokens']:.0f} | "
                     f"{r['ttft_s'] * 1000:.1f} | {r['ttft_s'] / cold[r['tier']]:.2f} |")
    lines += ["", f"![cache]({png.name})", ""]
    with open(path, "a") as f:
        f.write("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="write the rows as JSON here")
    parser.add_argument("--quick", action="store_true", help="one prompt per point instead of three")
    parser.add_argument("--results", type=Path, help="append a table to this markdown file, and cache.png beside it")
    parser.add_argument("--model", help="a model folder (default: make the small preset in a temporary folder)")
    args = parser.parse_args()
    import os

    os.environ.setdefault("KVMESH_TORCH_THREADS", "1")
    rng = random.Random(0)
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        if model is None:
            from kvmesh.services.engine.model_init import init_model

            model = str(init_model(Path(tmp) / "small", "small", "llama", 0, "float32"))
        rows = []
        for tier in ("dram", "ssd"):
            rows += run_tier(model, tier, 1 if args.quick else 3, rng)
    if args.out:
        args.out.write_text(json.dumps(rows, indent=2))
    print(json.dumps([{k: v for k, v in r.items() if k != "ttft_all"} for r in rows]))
    if args.results:
        png = args.results.with_name("cache.png")
        plot(rows, png)
        write_results(rows, "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]), args.results, png)


if __name__ == "__main__":
    main()
