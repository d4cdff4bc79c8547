"""Borrowed KV memory: decode throughput with `--kv-spill cache` against preempt-and-recompute (`none`) on the same
workload, through a real mesh (scheduler, cache, one prefill and one decode worker) on the `small` preset.

    python bench/spill.py [--out FILE.json] [--quick] [--results bench/RESULTS.md]

Workload: N clients (4), each sending R requests (3) one after another, with long random prompts of P tokens
(1,024) and O output tokens each (128, greedy, ignore_eos), to a decode worker whose pool holds N prompts and room
for about one of them to grow to its full length, so running sequences keep running out of blocks as they grow. Preempting one costs recomputing
its whole context on the decode worker (in the batch's way); spilling costs moving the blocks the step is short. The requests go to the decode
worker directly (its Generate, with the plan a route would carry: the prefill worker to use), not through the
gateway: the scheduler's admission would refuse the baseline's oversubscription outright (it admits a worker
that cannot spill by prompt + max_tokens), and the point is what each worker does under that pressure.
Throughput = output tokens / seconds from the first send to the last token; each mode in its own mesh, modes
alternated over the rounds. Also read from the decode worker's /metrics: preemptions, blocks spilled and paged back.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import statistics
import sys
import tempfile
import time
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "e2e"))
from machine import machine  # noqa: E402

N, R, P, O, BLOCK = 4, 3, 1024, 128, 16
BLOCK_BYTES = 8 * 2 * BLOCK * 4 * 64 * 4  # the small preset: 8 layers, K and V, 4 KV heads of 64, float32
POOL_BLOCKS = N * P // BLOCK + O // BLOCK + 2  # the prompts, and room for about one sequence to grow


def counter(proc, name: str) -> float:
    """The sum of a counter's samples on the worker's /metrics."""
    url = re.search(r"kvmesh \S+ metrics on (http://\S+/metrics)", proc.stdout).group(1)
    with urllib.request.urlopen(url, timeout=5) as reply:
        text = reply.read().decode()
    return sum(float(v) for v in re.findall(rf"^{re.escape(name)}(?:{{[^}}]*}})? (\S+)$", text, re.M))


def generate(mesh, ids: list[int]) -> int:
    from kvmesh.v1 import common_pb2, decode_pb2, decode_pb2_grpc

    decode, prefill = mesh.decodes[0], mesh.prefills[0]
    request = decode_pb2.DecodeRequest(
        request_id=uuid.uuid4().hex, prompt_token_ids=ids, local_prefill=False,
        sampling=common_pb2.SamplingParams(temperature=0.0, max_tokens=O, ignore_eos=True),
        prefill=decode_pb2.PeerRef(address=prefill.address))
    stub = decode_pb2_grpc.DecodeStub(mesh.channel(decode.address))
    return sum(len(r.token_ids) for r in stub.Generate(request, timeout=600))


def run_mode(model: str, spill: bool, rng: random.Random) -> dict:
    from mesh import start_mesh

    env = {"KVMESH_DECODE_KV_SPILL": "cache" if spill else "none", "KVMESH_METRICS_PORT": "0",
           "KVMESH_DECODE_TRANSPORT_CHECK_S": "0"}
    mesh = start_mesh(model, transport="shm", env=env, lease_s=10.0,
                      worker_args=("--kv-cache-bytes", str(POOL_BLOCKS * BLOCK_BYTES), "--handoff-lease-s", "120",
                                   "--max-num-batched-tokens", "2048"))
    try:
        generate(mesh, [rng.randrange(3, 4000) for _ in range(P)])  # warm up both workers
        decode = mesh.decodes[0]
        prompts = [[[rng.randrange(3, 4000) for _ in range(P)] for _ in range(R)] for _ in range(N)]
        mesh.channel(decode.address)
        started = time.perf_counter()
        with ThreadPoolExecutor(N) as pool:
            tokens = sum(pool.map(lambda mine: sum(generate(mesh, ids) for ids in mine), prompts))
        seconds = time.perf_counter() - started
        mesh.worker_stats(decode, "decode")  # brings the preemption count to /metrics
        row = {"mode": "spill" if spill else "recompute", "tokens": tokens, "seconds": seconds,
               "tokens_per_s": tokens / seconds, "preemptions": counter(decode, "kvmesh:num_preemptions_total"),
               "spilled_blocks": counter(decode, "kvmesh:kv_blocks_spilled_total"),
               "paged_back_blocks": counter(decode, "kvmesh:kv_blocks_paged_back_total")}
    finally:
        mesh.close()
    print(f"  {row['mode']:9} {row['tokens_per_s']:7.1f} tok/s ({tokens} tokens in {seconds:.1f} s), "
          f"preemptions {row['preemptions']:.0f}, spilled {row['spilled_blocks']:.0f}", file=sys.stderr)
    return row


def summary(rows: list[dict]) -> dict:
    by_mode = {m: [r for r in rows if r["mode"] == m] for m in ("recompute", "spill")}
    med = {m: statistics.median(r["tokens_per_s"] for r in rs) for m, rs in by_mode.items()}
    ratios = [s["tokens_per_s"] / b["tokens_per_s"] for b, s in zip(by_mode["recompute"], by_mode["spill"])]
    return {"median_tokens_per_s": med, "ratio_per_round": ratios, "ratio_median": statistics.median(ratios)}


def write_results(rows: list[dict], total: dict, command: str, info: dict, path: Path) -> None:
    lines = ["", f"## Borrowed KV memory: spill vs preempt-and-recompute (issue #19), "
             f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}", "", f"`{command}`", "",
             f"{N} clients × {R} requests in turn, {P}-token prompts, {O} output tokens each (greedy, ignore_eos), "
             f"small preset; decode pool {POOL_BLOCKS} blocks of {BLOCK} tokens ({N} sequences need "
             f"{N * (P + O) // BLOCK} at their end). CPU: {info.get('Model name', '?')}, {info.get('CPU(s)', '?')} CPUs, 1-minute load "
             f"{info['loadavg']:.1f} at the end. lscpu flags: `{info.get('Flags', '?')}`", "",
             "| round | mode | output tok/s | seconds | preemptions | blocks spilled | blocks paged back |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for i, r in enumerate(rows):
        lines.append(f"| {i // 2 + 1} | {r['mode']} | {r['tokens_per_s']:.1f} | {r['seconds']:.1f} | "
                     f"{r['preemptions']:.0f} | {r['spilled_blocks']:.0f} | {r['paged_back_blocks']:.0f} |")
    ratios = ", ".join(f"{x:.2f}" for x in total["ratio_per_round"])
    lines += ["", f"Spill ÷ recompute throughput, per round: {ratios}; median {total['ratio_median']:.2f}."]
    with open(path, "a") as f:
        f.write("\n".join(lines) + "\n")


def main() -> None:
    global N, R, P, O, POOL_BLOCKS  # the workload's shape, read by run_mode and write_results
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="write the rows as JSON here")
    parser.add_argument("--quick", action="store_true", help="one round instead of three")
    parser.add_argument("--results", type=Path, help="append a table to this markdown file")
    parser.add_argument("--model", help="a model folder (default: make the small preset in a temporary folder)")
    parser.add_argument("--clients", type=int, default=N)
    parser.add_argument("--requests", type=int, default=R, help="requests per client, one after another")
    parser.add_argument("--prompt-len", type=int, default=P)
    parser.add_argument("--output-len", type=int, default=O)
    parser.add_argument("--spare-blocks", type=int, default=None,
                        help="pool blocks beyond the prompts' (default: room for about one sequence to grow)")
    args = parser.parse_args()
    N, R, P, O = args.clients, args.requests, args.prompt_len, args.output_len
    POOL_BLOCKS = N * P // BLOCK + (O // BLOCK + 2 if args.spare_blocks is None else args.spare_blocks)
    os.environ.setdefault("KVMESH_TORCH_THREADS", "1")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        if model is None:
            from kvmesh.services.engine.model_init import init_model

            model = str(init_model(Path(tmp) / "small", "small", "llama", 0, "float32"))
        for round_ in range(1 if args.quick else 3):  # both modes get the same prompts in a round
            rows += [run_mode(model, spill, random.Random(round_)) for spill in (False, True)]
    total = summary(rows)
    info = machine()
    if args.out:
        args.out.write_text(json.dumps({"rows": rows, "summary": total, "machine": info}, indent=2) + "\n")
    print(json.dumps(total))
    if args.results:
        write_results(rows, total, "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]), info,
                      args.results)


if __name__ == "__main__":
    main()
