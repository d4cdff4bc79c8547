"""`kvmesh plan`'s predictions against the real mesh on the same trace (issue 13): TTFT and TPOT p50/p90 of
1P+1D and colocated x2, simulated and measured.

    python bench/plan_vs_mesh.py [--model DIR] [--profile FILE] [--rate 0.5] [--num-requests 40]
        [--input-len lognormal:256:0.5] [--output-len lognormal:64:0.5] [--policy least_loaded]
        [--out bench/plan_vs_mesh.json]

Profiles this machine first (`kvmesh plan profile`, unless --profile is given: a profile taken under other load
is off by up to 2x, see RESULTS), writes one `trace-gen` trace (Poisson, no prefix reuse), simulates it with
`kvmesh plan --trace` for every placement of 2 cores, one core each, and replays it with `kvmesh bench serve`
against `kvmesh up --prefill 1 --decode 1 --prefill-cpus 0 --decode-cpus 1` and `kvmesh up --colocated --workers 2
--worker-cpus 0/1`, each worker at one torch thread, the same routing policy as simulated. Prints simulated ÷
measured for each figure (the goal: within 20 %).
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

BLOCK = 64
MESHES = {"1P+1D": (["--prefill", "1", "--decode", "1", "--prefill-cpus", "0", "--decode-cpus", "1"],
                    lambda row: row.get("prefill") == 1 and row.get("decode") == 1),
          "colocated x2": (["--colocated", "--workers", "2", "--worker-cpus", "0/1"],
                           lambda row: row.get("colocated") == 2)}
FIGURES = (("ttft_ms", "p50"), ("ttft_ms", "p90"), ("tpot_ms", "p50"), ("tpot_ms", "p90"))


def cli(*argv: str, capture: bool = False) -> str:
    done = subprocess.run([sys.executable, "-m", "kvmesh.services.cli", *argv], check=True, text=True,
                          stdout=subprocess.PIPE if capture else subprocess.DEVNULL)
    return done.stdout or ""


def predicted(args, trace: Path) -> dict[str, dict]:
    rows = json.loads(cli("plan", "--profile", args.profile, "--trace", str(trace), "--trace-block-size", str(BLOCK),
                          "--cores", "2", "--cores-per-worker", "1", "--max-num-seqs", "64",
                          "--max-num-batched-tokens", "2048", "--policy", args.policy, "--slo-ttft-ms", "1e9",
                          "--slo-tpot-ms", "1e9", "--top", "1000", "--json", capture=True))
    return {name: next(r for r in rows if match(r)) for name, (_, match) in MESHES.items()}


def measured(args, trace: Path, tmp: Path) -> dict[str, dict]:
    out = {}
    for name, (flags, _) in MESHES.items():
        http_port = free_port()
        flags = [*flags, "--threads-per-worker", "1", "--policy", args.policy]
        proc = start_mesh(args.model, flags, {}, http_port, free_port())
        try:
            print(f"  {name} ...", file=sys.stderr, flush=True)
            path = tmp / f"{name}.json"
            cli("bench", "serve", "--base-url", f"http://127.0.0.1:{http_port}", "--dataset-name", "mooncake",
                "--dataset-path", str(trace), "--trace-block-size", str(BLOCK), "--out", str(path),
                "--request-timeout-s", "600", "--no-progress")
        finally:
            proc.terminate()
            proc.wait(60)
        summary = json.loads(path.read_text())
        summary.pop("requests", None)
        out[name] = summary
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model")
    parser.add_argument("--profile", help="a `kvmesh plan profile` JSON (default: profile now)")
    parser.add_argument("--rate", type=float, default=0.5)
    parser.add_argument("--num-requests", type=int, default=40)
    parser.add_argument("--input-len", default="lognormal:256:0.5")
    parser.add_argument("--output-len", default="lognormal:64:0.5")
    parser.add_argument("--policy", default="least_loaded")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(HERE / "plan_vs_mesh.json"))
    args = parser.parse_args()
    if not args.model:
        from kvmesh.services.models import default_model

        args.model = str(default_model(progress=lambda m: print(m, file=sys.stderr)))
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        if not args.profile:
            args.profile = str(tmp / "profile.json")
            print("profiling ...", file=sys.stderr, flush=True)
            cli("plan", "profile", "--model", args.model, "--out", args.profile)
        profile = json.loads(Path(args.profile).read_text())
        trace = tmp / "trace.jsonl"
        cli("bench", "trace-gen", "--out", str(trace), "--num-requests", str(args.num_requests), "--rate",
            str(args.rate), "--input-len", args.input_len, "--output-len", args.output_len, "--prefix-reuse", "0",
            "--block-size", str(BLOCK), "--seed", str(args.seed))
        sim = predicted(args, trace)
        real = measured(args, trace, tmp)
    print("| mesh | figure | simulated | measured | simulated ÷ measured |\n| --- | --- | --- | --- | --- |")
    rows = []
    for name in MESHES:
        for metric, q in FIGURES:
            s, m = sim[name]["predicted"][metric][q], real[name][metric][q]
            rows.append({"mesh": name, "figure": f"{metric} {q}", "simulated": s, "measured": m, "ratio": s / m})
            print(f"| {name} | {metric[:-3].upper()} {q} | {s:.0f} ms | {m:.0f} ms | {s / m:.2f} |")
    Path(args.out).write_text(json.dumps({
        "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "args": vars(args), "loadavg": os.getloadavg(),
        "profile_cpu": profile.get("cpu"), "rows": rows, "simulated": sim, "measured": real}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
