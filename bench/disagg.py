"""The DistServe experiment on this machine: the same cores, colocated vs disaggregated, under a mixed load.

    python bench/disagg.py [--model DIR] [--rates 0.5,1,2] [--duration-s 60] [--out bench/disagg.json]
                           [--configs disagg,colocated2,colocated2-chunk256,colocated1] [--slo-tpot-ms 150]

Long prompts (1-3 k tokens, few output tokens: documents to summarise) arrive among many short chats that stream
128 tokens each. In a colocated worker a long prompt's prefill shares steps with every running decode, so their
inter-token latency jumps while it computes (chunking bounds the jump, at the cost of the prompt's TTFT); split
workers keep decode steps free of prefills, at the cost of a KV transfer and of cores that cannot help each other.
Every configuration gets the same two cores:

    disagg               kvmesh up --prefill 1 --decode 1 --prefill-cpus 0 --decode-cpus 1
    disagg-throttled     the same, the transport throttled to a GPU cluster's KV-bandwidth-to-compute ratio
    colocated2           kvmesh up --colocated --workers 2 --worker-cpus 0/1
    colocated2-chunk256  the same, prefill chunks of 256 tokens (Sarathi-style) instead of 2048
    colocated1           kvmesh up --colocated --workers 1 --worker-cpus 0-1 (both cores, one engine)

Each configuration serves one Mooncake-format trace per rate (Poisson arrivals, replayed at their timestamps by
`kvmesh bench serve`); the JSON holds every run's summary, and the table printed at the end the figures the issue
asks for: ITL p99, TTFT p99, goodput at the SLOs (DistServe's: a request counts when it meets both) and their
ratios to colocated2.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
CONFIGS = {
    "disagg": (["--prefill", "1", "--decode", "1", "--prefill-cpus", "0", "--decode-cpus", "1"], {}),
    # --throttle: the link's rate that gives this machine a GPU cluster's KV-transfer-to-compute ratio r
    "disagg-throttled": (["--prefill", "1", "--decode", "1", "--prefill-cpus", "0", "--decode-cpus", "1",
                          "--transport-chaos", "throttle={throttle}"], {}),
    "colocated2": (["--colocated", "--workers", "2", "--worker-cpus", "0/1"], {}),
    "colocated2-chunk256": (["--colocated", "--workers", "2", "--worker-cpus", "0/1"],
                            {"KVMESH_MAX_NUM_BATCHED_TOKENS": "256"}),
    "colocated1": (["--colocated", "--workers", "1", "--worker-cpus", "0-1"], {}),
}


def mixed_trace(path: Path, rate: float, duration_s: float, seed: int, long_share: float = 0.2) -> int:
    """Write a Mooncake-format trace: Poisson arrivals at `rate`; a `long_share` of documents (1-3 k tokens in,
    16 out), the rest chats (64-256 in, 128 out); no two requests share a block. Returns the request count."""
    rng = random.Random(seed)
    t, n, next_id = 0.0, 0, 0
    with path.open("w") as f:
        while True:
            t += rng.expovariate(rate)
            if t > duration_s:
                return n
            long = rng.random() < long_share
            length = rng.randint(1024, 3072) if long else rng.randint(64, 256)
            blocks = -(-length // 512)
            f.write(json.dumps({"timestamp": int(t * 1000), "input_length": length, "output_length": 16 if long
                                else 128, "hash_ids": list(range(next_id, next_id + blocks))}) + "\n")
            next_id += blocks
            n += 1


def start_mesh(model: str, flags: list[str], env: dict[str, str], http_port: int, grpc_port: int):
    cmd = [sys.executable, "-m", "kvmesh.services.cli", "up", "--model", model, "--http-port", str(http_port),
           "--grpc-port", str(grpc_port), *flags]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            env={**os.environ, **env})
    for line in proc.stdout:
        if "kvmesh up: ready" in line:  # from here on the pipe is drained, so a chatty child never blocks on it
            threading.Thread(target=proc.stdout.read, daemon=True).start()
            return proc
    raise RuntimeError(f"kvmesh up {' '.join(flags)} did not start (exit {proc.wait()})")


def serve(http_port: int, trace: Path, args, out: Path) -> dict:
    cmd = [sys.executable, "-m", "kvmesh.services.cli", "bench", "serve", "--base-url",
           f"http://127.0.0.1:{http_port}", "--dataset-name", "mooncake", "--dataset-path", str(trace),
           "--slo-ttft-ms", str(args.slo_ttft_ms), "--slo-tpot-ms", str(args.slo_tpot_ms), "--out", str(out),
           "--request-timeout-s", "600", "--no-progress"]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return json.loads(out.read_text())


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_config(name: str, args, traces: dict[float, Path], tmp: Path) -> list[dict]:
    flags, env = CONFIGS[name]
    flags = [flag.format(throttle=args.throttle) for flag in flags]
    http_port = free_port()
    proc = start_mesh(args.model, flags, env, http_port, free_port())
    runs = []
    try:
        for rate, trace in traces.items():
            print(f"  {name} at {rate} req/s ...", file=sys.stderr, flush=True)
            summary = serve(http_port, trace, args, tmp / f"{name}-{rate}.json")
            summary.pop("requests", None)  # every request's timings: kept out of the committed JSON
            summary["bench_args"] = summary.pop("config", None)  # bench serve's own flags
            runs.append({"config": name, "rate": rate, "up_flags": flags, "up_env": env, **summary})
    finally:
        proc.terminate()
        proc.wait(60)
    return runs


def table(runs: list[dict]) -> str:
    base = {r["rate"]: r for r in runs if r["config"] == "colocated2"}
    lines = ["| config | rate (req/s) | done / failed | out tok/s | TTFT p99 (ms) | ITL p99 (ms) | TPOT p90 (ms) | "
             "goodput (req/s) | ITL p99 ÷ colocated2 | goodput ÷ colocated2 |", "|" + " --- |" * 10]
    for r in runs:
        b = base.get(r["rate"])
        itl = r["itl_ms"]["p99"] / b["itl_ms"]["p99"] if b and b["itl_ms"]["p99"] else float("nan")
        good = r["goodput_rps"] / b["goodput_rps"] if b and b["goodput_rps"] else float("nan")
        lines.append(f"| {r['config']} | {r['rate']:g} | {r['completed']} / {r['failed']} | {r['output_tok_s']:.1f} | "
                     f"{r['ttft_ms']['p99']:.0f} | {r['itl_ms']['p99']:.0f} | {r['tpot_ms']['p90']:.0f} | "
                     f"{r['goodput_rps']:.3f} | {itl:.2f} | {good:.2f} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="model folder (default: SmolLM2-135M-Instruct, as kvmesh up picks it)")
    parser.add_argument("--rates", default="0.5,1,2")
    parser.add_argument("--duration-s", type=float, default=60.0, help="seconds of arrivals per run")
    parser.add_argument("--configs", default="disagg,colocated2,colocated2-chunk256,colocated1")
    parser.add_argument("--slo-ttft-ms", type=float, default=5000.0)
    parser.add_argument("--slo-tpot-ms", type=float, default=150.0)
    parser.add_argument("--seed", type=int, default=0)
    # SmolLM2-135M in float32 makes 46 KB of KV per token (2 x 30 layers x 3 KV heads x 64 x 4 B); at ~2,000 prompt
    # tokens/s on one core that is ~92 MB/s, so 56 MB/s gives r = 1.63, an H100 + 25 Gb/s TCP (bench/throttle.py)
    parser.add_argument("--throttle", default="56MBps", help="disagg-throttled's link rate (chaos syntax)")
    parser.add_argument("--out", default=str(HERE / "disagg.json"))
    args = parser.parse_args()
    if not args.model:
        from kvmesh.services.models import default_model

        args.model = str(default_model(progress=lambda m: print(m, file=sys.stderr)))
    rates = [float(r) for r in args.rates.split(",")]
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        traces = {}
        for rate in rates:
            traces[rate] = tmp / f"trace-{rate}.jsonl"
            n = mixed_trace(traces[rate], rate, args.duration_s, args.seed)
            print(f"trace at {rate} req/s: {n} requests", file=sys.stderr)
        runs = [run for name in args.configs.split(",") for run in run_config(name, args, traces, tmp)]
    flags = next((line.split(":", 1)[1].split() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("flags")), [])
    report = {"when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "model": args.model,
              "machine": {"cpu": platform.processor(), "cores": os.cpu_count(),
                          "avx512_bf16": "avx512_bf16" in flags, "avx2": "avx2" in flags},
              "slo": {"ttft_ms": args.slo_ttft_ms, "tpot_ms": args.slo_tpot_ms}, "runs": runs}
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    print(table(runs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
