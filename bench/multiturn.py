"""Multi-turn benchmark: TTFT of a conversation's second turn with and without `--cache-decode-kv`, against a
cold prompt of the same length, through a real mesh (scheduler, cache, one prefill and one decode worker,
gateway) on the `small` preset.

    python bench/multiturn.py [--out FILE.json] [--quick] [--results bench/RESULTS.md]

A conversation: a random 1,024-token first prompt generates a 256-token reply (greedy, ignore_eos); the second
turn's prompt is the first prompt, the reply and 64 new tokens (1,344 tokens), sent with max_tokens=2, and TTFT
is the time from the gRPC Generate call to its first streamed token. Between the turns the bench waits until the
cache has stored every block offered (the prompt's, and with the flag the reply's), so no put competes with the
measured request. The cold baseline is a fresh random 1,344-token prompt in the same mesh. One mesh per mode.
Rows: {"mode", "cold_ttft_s", "turn2_ttft_s", "turn2_cached_tokens", "ttft_all"}.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cache import stats, ttft  # noqa: E402 (bench/cache.py; importing it puts tests/e2e on sys.path)

FIRST, REPLY, NEW, BLOCK = 1024, 256, 64, 16


def reply_to(mesh, ids: list[int]) -> list[int]:
    tokens, _ = mesh.generate(ids, REPLY, timeout=300, ignore_eos=True)
    return tokens


def wait_settled(mesh, timeout_s: float = 60.0) -> None:
    """Until the cache's put count stops moving (offers arrive behind the response)."""
    deadline, last, still = time.monotonic() + timeout_s, -1, 0
    while still < 5:
        puts = stats(mesh).puts
        still = still + 1 if puts == last else 0
        last = puts
        if time.monotonic() > deadline:
            raise RuntimeError("the cache's puts never settled")
        time.sleep(0.1)


def run_mode(model: str, write_back: bool, reps: int, rng: random.Random) -> dict:
    from mesh import start_mesh

    env = {"KVMESH_DECODE_CACHE_DECODE_KV": "1" if write_back else "0"}
    mesh = start_mesh(model, transport="shm", env=env, cache_args=("--dram-bytes", str(4 << 30)),
                      worker_args=("--kv-cache-bytes", str(1 << 30), "--max-num-batched-tokens", "2048",
                                   "--handoff-lease-s", "120"), lease_s=10.0)
    cold, turn2, cached = [], [], []
    try:
        ttft(mesh, [rng.randrange(3, 4000) for _ in range(FIRST + REPLY + NEW)])  # warm up every worker
        for _ in range(reps):
            first = [rng.randrange(3, 4000) for _ in range(FIRST)]
            conversation = first + reply_to(mesh, first)
            wait_settled(mesh)
            seconds, hit = ttft(mesh, conversation + [rng.randrange(3, 4000) for _ in range(NEW)])
            turn2.append(seconds)
            cached.append(hit)
            wait_settled(mesh)
            cold.append(ttft(mesh, [rng.randrange(3, 4000) for _ in range(FIRST + REPLY + NEW)])[0])
            wait_settled(mesh)
            print(f"  write-back {'on ' if write_back else 'off'} turn 2 {seconds * 1e3:7.1f} ms "
                  f"(cached {hit}), cold {cold[-1] * 1e3:7.1f} ms", file=sys.stderr)
    finally:
        mesh.close()
    return {"mode": "write-back on" if write_back else "write-back off", "cold_ttft_s": statistics.median(cold),
            "turn2_ttft_s": statistics.median(turn2), "turn2_cached_tokens": statistics.median(cached),
            "ttft_all": {"cold": cold, "turn2": turn2}}


def write_results(rows: list[dict], command: str, path: Path) -> None:
    lines = ["", f"## Multi-turn: decoded KV to the cache ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})",
             "", f"`{command}`", "",
             f"Second turn: {FIRST}-token first prompt + {REPLY}-token reply + {NEW} new tokens; cold: a fresh "
             f"prompt of the same {FIRST + REPLY + NEW} tokens; medians.", "",
             "| mode | turn-2 cached tokens | turn-2 TTFT ms | cold TTFT ms | turn 2 ÷ cold |",
             "| --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['mode']} | {r['turn2_cached_tokens']:.0f} | {r['turn2_ttft_s'] * 1e3:.1f} | "
                     f"{r['cold_ttft_s'] * 1e3:.1f} | {r['turn2_ttft_s'] / r['cold_ttft_s']:.2f} |")
    with open(path, "a") as f:
        f.write("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="write the rows as JSON here")
    parser.add_argument("--quick", action="store_true", help="one conversation per mode instead of three")
    parser.add_argument("--results", type=Path, help="append a table to this markdown file")
    parser.add_argument("--model", help="a model folder (default: make the small preset in a temporary folder)")
    args = parser.parse_args()
    os.environ.setdefault("KVMESH_TORCH_THREADS", "1")
    rng = random.Random(0)
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        if model is None:
            from kvmesh.services.engine.model_init import init_model

            model = str(init_model(Path(tmp) / "small", "small", "llama", 0, "float32"))
        rows = [run_mode(model, write_back, 1 if args.quick else 3, rng) for write_back in (False, True)]
    if args.out:
        args.out.write_text(json.dumps(rows, indent=2) + "\n")
    print(json.dumps([{k: v for k, v in r.items() if k != "ttft_all"} for r in rows]))
    if args.results:
        write_results(rows, "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]), args.results)


if __name__ == "__main__":
    main()
