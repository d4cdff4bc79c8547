"""Routing policies on a real mesh: slo_aware vs least_loaded vs kv_aware, the same trace, the same workers.

    python bench/route_policies_mesh.py [--model DIR] [--prefill 1] [--decode 2] [--rate 0.8] [--num-requests 80]
        [--slo-ttft-ms 3000] [--slo-tpot-ms 150] [--policies least_loaded,kv_aware,slo_aware] [--out FILE.json]

One mixed trace with prefix reuse from `kvmesh bench trace-gen` (lognormal prompts and outputs, shared system
prompts, two-turn conversations that resend their history) is replayed at its timestamps by `kvmesh bench serve`
against `kvmesh up --prefill P --decode D --policy X`, once per policy, on a fresh mesh each time (so no policy
inherits another's cache). The scheduler gets the SLOs as its defaults (`KVMESH_SCHEDULER_SLO_*`): slo_aware
refuses at once, with a Retry-After, a request no route is predicted to meet; the others do not read them.
Goodput is `vllm bench serve`'s: requests within both SLOs per second of the run. Prints a Markdown table with each
policy's ratio to least_loaded and kv_aware, and writes every run's summary to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from disagg import free_port, start_mesh  # noqa: E402

BLOCK = 64  # tokens per trace hash id: finer than the prompts, so shared prefixes are visible to every policy


def trace(path: Path, args) -> None:
    subprocess.run([sys.executable, "-m", "kvmesh.services.cli", "bench", "trace-gen", "--out", str(path),
                    "--num-requests", str(args.num_requests), "--rate", str(args.rate), "--input-len",
                    args.input_len, "--output-len", args.output_len, "--prefix-reuse", "0.5",
                    "--num-system-prompts", "4", "--turns", "2", "--turn-interval-s", "5", "--block-size",
                    str(BLOCK), "--seed", str(args.seed)], check=True, stdout=subprocess.DEVNULL)


def run_policy(policy: str, args, path: Path, tmp: Path) -> dict:
    http_port = free_port()
    env = {"KVMESH_SCHEDULER_SLO_TTFT_S": str(args.slo_ttft_ms / 1000),
           "KVMESH_SCHEDULER_SLO_TPOT_S": str(args.slo_tpot_ms / 1000)}
    flags = ["--prefill", str(args.prefill), "--decode", str(args.decode), "--policy", policy,
             "--threads-per-worker", "1"]
    proc = start_mesh(args.model, flags, env, http_port, free_port())
    out = tmp / f"{policy}.json"
    try:
        print(f"  {policy} ...", file=sys.stderr, flush=True)
        subprocess.run([sys.executable, "-m", "kvmesh.services.cli", "bench", "serve", "--base-url",
                        f"http://127.0.0.1:{http_port}", "--dataset-name", "mooncake", "--dataset-path", str(path),
                        "--trace-block-size", str(BLOCK), "--slo-ttft-ms", str(args.slo_ttft_ms), "--slo-tpot-ms",
                        str(args.slo_tpot_ms), "--out", str(out), "--request-timeout-s", "300", "--no-progress"],
                       check=True, stdout=subprocess.DEVNULL)
    finally:
        proc.terminate()
        proc.wait(60)
    summary = json.loads(out.read_text())
    summary.pop("requests", None)  # every request's timings: kept out of the committed JSON
    summary["bench_args"] = summary.pop("config", None)
    return {"policy": policy, "up_flags": flags, **summary}


def table(runs: list[dict]) -> str:
    by = {r["policy"]: r["goodput_rps"] for r in runs}
    lines = ["| policy | done / failed | goodput (req/s) | vs least_loaded | vs kv_aware | SLO attainment % | "
             "TTFT p50 / p99 ms | TPOT p50 / p99 ms | failures |", "|" + " --- |" * 9]
    for r in runs:
        ratio = [f"{r['goodput_rps'] / by[b]:.2f}" if by.get(b) else "—" for b in ("least_loaded", "kv_aware")]
        lines.append(f"| {r['policy']} | {r['completed']} / {r['failed']} | {r['goodput_rps']:.3f} | {ratio[0]} | "
                     f"{ratio[1]} | {r['slo_attainment_pct']:.1f} | {r['ttft_ms']['p50']:.0f} / "
                     f"{r['ttft_ms']['p99']:.0f} | {r['tpot_ms']['p50']:.0f} / {r['tpot_ms']['p99']:.0f} | "
                     f"{r['errors'] or ''} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="model folder (default: SmolLM2-135M-Instruct, as kvmesh up picks it)")
    parser.add_argument("--prefill", type=int, default=1)
    parser.add_argument("--decode", type=int, default=2)
    parser.add_argument("--rate", type=float, default=0.8, help="requests per second, all turns")
    parser.add_argument("--num-requests", type=int, default=80)
    parser.add_argument("--input-len", default="lognormal:256:1.0")
    parser.add_argument("--output-len", default="lognormal:64:0.8")
    parser.add_argument("--slo-ttft-ms", type=float, default=3000.0)
    parser.add_argument("--slo-tpot-ms", type=float, default=150.0)
    parser.add_argument("--policies", default="least_loaded,kv_aware,slo_aware")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(HERE / "route_policies_mesh.json"))
    args = parser.parse_args()
    if not args.model:
        from kvmesh.services.models import default_model

        args.model = str(default_model(progress=lambda m: print(m, file=sys.stderr)))
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        path = tmp / "trace.jsonl"
        trace(path, args)
        runs = [run_policy(policy, args, path, tmp) for policy in args.policies.split(",")]
    flags = next((line.split(":", 1)[1].split() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("flags")), [])
    report = {"when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "args": vars(args),
              "machine": {"cores": os.cpu_count(), "loadavg": os.getloadavg(),
                          "flags": [f for f in flags if f.startswith(("avx", "amx", "fma"))]}, "runs": runs}
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    print(table(runs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
