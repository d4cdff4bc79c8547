"""The scheduler's planner on a real mesh of `--role auto` workers against every static split (issue 19).

    python bench/planner_mesh.py [--preset tiny] [--workers 4] [--phase-s 20] [--chat-rate 3] [--docs-rate 1.5]
                                 [--interval-s 2] [--window-s 6] [--hold-s 10] [--planner-profile FILE]
                                 [--slo-ttft-ms 4000] [--slo-tpot-ms 400] [--out bench/planner_mesh.json]

bench/planner.py's shifting workload — short chat, then long documents, then short chat, each phase a `trace-gen`
trace (no prefix reuse) — replayed by `kvmesh bench serve` (gRPC, the trace's own timestamps) against `--workers`
flexible workers of the tiny model (the test meshes' start_mesh):

- static: every P:D split, the planner off;
- planner: starting at the middle split, the scheduler's planner on (`--planner-interval-s` etc.; the workers' live
  fits, `--planner-profile` until there are some when given), flipping roles as it sees fit.

Goodput (requests within both SLOs per second of the run, failed ones counting against it) is `kvmesh bench
serve`'s; every configuration runs on the same machine in the same run, one after another. The planner's flips are
read from the scheduler's log.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "e2e"))
sys.path.insert(0, str(ROOT / "bench"))

BLOCK = 16
PHASE_IDS = 1_000_000  # each phase's block ids start this far apart: no prefix is shared across phases


def phases(args) -> list[tuple[str, float, str, str]]:
    """(name, rate, input lengths, output lengths) of each phase; documents stay within the tiny model's 1024
    positions."""
    chat = ("uniform:32:128", "uniform:32:96")
    docs = ("uniform:400:880", "uniform:4:16")
    return [("chat", args.chat_rate, *chat), ("documents", args.docs_rate, *docs), ("chat", args.chat_rate, *chat)]


def make_trace(args, path: Path) -> list[dict]:
    """The phases one after another as one Mooncake JSONL trace."""
    from kvmesh.services.bench.lengths import parse_length
    from kvmesh.services.bench.trace_gen import TraceSpec, generate

    records, start_ms = [], 0.0
    for i, (_, rate, input_len, output_len) in enumerate(phases(args)):
        spec = TraceSpec(max(1, round(rate * args.phase_s)), rate, parse_length(input_len),
                         parse_length(output_len), prefix_reuse=0.0, block_size=BLOCK, seed=args.seed + i)
        for record in generate(spec):
            if record["timestamp"] < args.phase_s * 1000:
                records.append({**record, "timestamp": start_ms + record["timestamp"],
                                "hash_ids": [h + i * PHASE_IDS for h in record["hash_ids"]]})
        start_ms += args.phase_s * 1000
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return records


def planner_flags(args) -> tuple[str, ...]:
    flags = ("--planner-interval-s", str(args.interval_s), "--planner-window-s", str(args.window_s),
             "--planner-hold-s", str(args.hold_s), "--planner-threshold", str(args.threshold),
             "--slo-ttft-s", str(args.slo_ttft_ms / 1000), "--slo-tpot-s", str(args.slo_tpot_ms / 1000))
    return flags + (("--planner-profile", args.planner_profile) if args.planner_profile else ())


def serve(args, mesh, trace: Path, out: Path) -> dict:
    """`kvmesh bench serve` replaying the trace against the mesh's gateway; its JSON summary."""
    run = subprocess.run([sys.executable, "-m", "kvmesh.services.cli", "bench", "serve", "--api", "grpc",
                          "--base-url", mesh.gateway.address, "--dataset-name", "mooncake", "--dataset-path",
                          str(trace), "--trace-block-size", str(BLOCK), "--slo-ttft-ms", str(args.slo_ttft_ms),
                          "--slo-tpot-ms", str(args.slo_tpot_ms), "--request-timeout-s", "600", "--out", str(out),
                          "--no-progress"], capture_output=True, text=True, timeout=3600)
    if run.returncode != 0:
        raise RuntimeError(f"bench serve failed:\n{run.stdout[-2000:]}\n{run.stderr[-2000:]}")
    return json.loads(out.read_text())


def run_config(args, model: str, trace: Path, folder: Path, prefill: int, planner: bool) -> dict:
    """One mesh of flexible workers starting at prefill P + the rest D, the trace replayed on it."""
    from mesh import start_mesh

    mesh = start_mesh(model, prefill=prefill, decode=args.workers - prefill, flexible=True,
                      scheduler_args=planner_flags(args) if planner else ())
    try:
        name = f"planner-from-{prefill}P" if planner else f"static-{prefill}P+{args.workers - prefill}D"
        data = serve(args, mesh, trace, folder / f"{name}.json")
        lines = [line[line.index("planner: "):].strip() for line in mesh.scheduler.stderr.splitlines()
                 if "planner_loop: planner: " in line]
    finally:
        mesh.close()
    keys = ("completed", "failed", "duration_s", "goodput_rps", "request_rps", "output_tok_s",
            "slo_attainment_pct")
    result = {"name": name, **{k: data.get(k) for k in keys}, "errors": data.get("errors"),
              "ttft_ms": {k: data["ttft_ms"][k] for k in ("p50", "p99")},
              "tpot_ms": {k: data["tpot_ms"][k] for k in ("p50", "p99")},
              "flips": [line for line in lines if line.startswith("planner: flip")],
              "rounds": {a: sum(line.startswith(f"planner: {a};") for line in lines)
                         for a in ("keep", "hold", "flip", "skip")}}
    print(json.dumps(result), flush=True)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny", choices=["tiny", "small"])
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--phase-s", type=float, default=20.0)
    parser.add_argument("--chat-rate", type=float, default=3.0)
    parser.add_argument("--docs-rate", type=float, default=1.5)
    parser.add_argument("--interval-s", type=float, default=2.0)
    parser.add_argument("--window-s", type=float, default=6.0)
    parser.add_argument("--hold-s", type=float, default=10.0)
    parser.add_argument("--threshold", type=float, default=0.1)
    parser.add_argument("--planner-profile", default="")
    parser.add_argument("--slo-ttft-ms", type=float, default=4000.0)
    parser.add_argument("--slo-tpot-ms", type=float, default=400.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(ROOT / "bench" / "planner_mesh.json"))
    args = parser.parse_args()
    from machine import machine
    from kvmesh.services.engine.model_init import init_model

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        model = str(init_model(folder / "model", args.preset, "llama", 0, "float32"))
        records = make_trace(args, folder / "trace.jsonl")
        runs = [run_config(args, model, folder / "trace.jsonl", folder, p, False) for p in range(1, args.workers)]
        runs.append(run_config(args, model, folder / "trace.jsonl", folder, args.workers // 2, True))
    best = max(runs[:-1], key=lambda r: r["goodput_rps"])
    summary = {"num_requests": len(records), "best_static": best["name"], "best_static_goodput_rps":
               best["goodput_rps"], "planner_goodput_rps": runs[-1]["goodput_rps"],
               "planner_over_best_static": runs[-1]["goodput_rps"] / best["goodput_rps"] if best["goodput_rps"]
               else None, "num_flips": len(runs[-1]["flips"])}
    Path(args.out).write_text(json.dumps({"args": vars(args), "machine": machine(), "summary": summary,
                                          "runs": runs}, indent=1) + "\n")
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
