"""kvmesh against vLLM's CPU server, side by side: the same workload through each, by `kvmesh bench serve`.

    python bench/vs_vllm.py --peer PEER_VENV [--model DIR] [--concurrency 8,32] [--prompts-per-slot 4]
                            [--configs vllm,disagg,colocated1,colocated2] [--dtype float32] [--out bench/vs_vllm.json]

The workload is the serving issue's (#13): streaming completions of 256-token prompts, 64 tokens out (ignore_eos),
at a fixed concurrency, SmolLM2-135M-Instruct; `--workload mixed` draws prompt lengths lognormally around 256
(sigma 0.8, 32..2,048 tokens) and outputs uniformly from 16 to 128 instead. Every server gets the machine's two
cores and nothing else runs beside it. vLLM runs as ../shared/PEERS.md says (its own venv, its default binding:
one core computes, one serves); each kvmesh configuration as bench/disagg.py starts it. The table compares each
with vLLM at the same concurrency: output tok/s (goal ≥ 1.0×) and ITL p99 (goal ≤ 1.0×).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from disagg import CONFIGS, free_port, start_mesh  # noqa: E402
from machine import machine  # noqa: E402

# one colocated engine on both cores with a smaller step budget: a prompt's prefill split over steps, so the
# decodes it joins wait less each step (Sarathi-style), its own first token a little later
CONFIGS = {**CONFIGS, **{f"colocated1-chunk{n}": (CONFIGS["colocated1"][0], {"KVMESH_MAX_NUM_BATCHED_TOKENS": str(n)})
                         for n in (64, 128, 256)}}
WORKLOADS = {"fixed": ("256", "64"), "mixed": ("lognormal:256:0.8", "uniform:16:128")}


def start_vllm(peer: Path, model: str, dtype: str, port: int, scratch: Path) -> subprocess.Popen:
    """vLLM's OpenAI server from its own venv, caches kept in `scratch`; returns once /v1/models answers."""
    env = {**os.environ, "VLLM_CACHE_ROOT": str(scratch / "vllm"), "TORCHINDUCTOR_CACHE_DIR": str(scratch / "inductor"),
           "HF_HOME": str(scratch / "hf"), "HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "4",
           "VLLM_NO_USAGE_STATS": "1"}
    cmd = [str(peer / "bin" / "python"), "-m", "vllm.entrypoints.openai.api_server", "--model", model,
           "--host", "127.0.0.1", "--port", str(port), "--dtype", dtype]
    log = open(scratch / "vllm.log", "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + 600  # torch.compile at start: 60-100 s on 2 cores, more when loaded
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"vLLM exited with {proc.returncode} before serving: see {scratch / 'vllm.log'}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=2):
                return proc
        except OSError:
            time.sleep(2)
    proc.kill()
    raise RuntimeError(f"vLLM did not serve within 600 s: see {scratch / 'vllm.log'}")


def serve(port: int, concurrency: int, args, out: Path) -> dict:
    input_len, output_len = WORKLOADS[args.workload]
    cmd = [sys.executable, "-m", "kvmesh.services.cli", "bench", "serve", "--base-url", f"http://127.0.0.1:{port}",
           "--max-concurrency", str(concurrency), "--num-prompts", str(concurrency * args.prompts_per_slot),
           "--input-len", input_len, "--output-len", output_len, "--seed", str(args.seed),
           "--slo-ttft-ms", str(args.slo_ttft_ms), "--slo-tpot-ms", str(args.slo_tpot_ms),
           "--request-timeout-s", "900", "--no-progress", "--out", str(out)]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    summary = json.loads(out.read_text())
    summary.pop("requests", None)
    return summary


def run_server(name: str, args, tmp: Path) -> list[dict]:
    port = free_port()
    print(f"{name}: starting", file=sys.stderr, flush=True)
    if name == "vllm":
        proc, flags, env = start_vllm(Path(args.peer), args.model, args.dtype, port, tmp), [], {}
    else:
        flags, env = CONFIGS[name]
        env = {**env, "KVMESH_DTYPE": args.dtype}  # every worker's dtype knob
        proc = start_mesh(args.model, flags, env, port, free_port())
    runs = []
    try:
        for concurrency in args.concurrency:
            print(f"  {name} at concurrency {concurrency} ...", file=sys.stderr, flush=True)
            summary = serve(port, concurrency, args, tmp / f"{name}-{concurrency}.json")
            summary["bench_args"] = summary.pop("config", None)
            runs.append({"server": name, "concurrency": concurrency, "up_flags": flags, **summary})
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return runs


def table(runs: list[dict]) -> str:
    base = {r["concurrency"]: r for r in runs if r["server"] == "vllm"}
    lines = ["| server | concurrency | done / failed | out tok/s | TTFT p50 / p99 (ms) | ITL p50 / p99 (ms) | "
             "goodput (req/s) | tok/s ÷ vLLM | ITL p99 ÷ vLLM |", "|" + " --- |" * 9]
    for r in runs:
        b = base.get(r["concurrency"])
        tok = f"{r['output_tok_s'] / b['output_tok_s']:.2f}" if b and b["output_tok_s"] else "—"
        itl = f"{r['itl_ms']['p99'] / b['itl_ms']['p99']:.2f}" if b and b["itl_ms"]["p99"] else "—"
        lines.append(f"| {r['server']} | {r['concurrency']} | {r['completed']} / {r['failed']} | "
                     f"{r['output_tok_s']:.1f} | {r['ttft_ms']['p50']:.0f} / {r['ttft_ms']['p99']:.0f} | "
                     f"{r['itl_ms']['p50']:.0f} / {r['itl_ms']['p99']:.0f} | {r['goodput_rps']:.3f} | {tok} | {itl} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peer", required=True, help="vLLM's venv (vllm-cpu installed as ../shared/PEERS.md says)")
    parser.add_argument("--model", help="model folder (default: SmolLM2-135M-Instruct, as kvmesh up picks it)")
    parser.add_argument("--configs", default="vllm,disagg,colocated1,colocated2")
    parser.add_argument("--concurrency", default="8,32", type=lambda s: [int(c) for c in s.split(",")])
    parser.add_argument("--prompts-per-slot", type=int, default=4, help="requests per run = concurrency x this")
    parser.add_argument("--workload", choices=sorted(WORKLOADS), default="fixed")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--slo-ttft-ms", type=float, default=10000.0)
    parser.add_argument("--slo-tpot-ms", type=float, default=200.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(HERE / "vs_vllm.json"))
    args = parser.parse_args()
    if not args.model:
        from kvmesh.services.models import default_model

        args.model = str(default_model(progress=lambda m: print(m, file=sys.stderr)))
    with tempfile.TemporaryDirectory() as tmp_name:
        runs = [run for name in args.configs.split(",") for run in run_server(name, args, Path(tmp_name))]
    report = {"when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "model": args.model, "dtype": args.dtype,
              "workload": args.workload, "machine": machine(),
              "slo": {"ttft_ms": args.slo_ttft_ms, "tpot_ms": args.slo_tpot_ms}, "runs": runs}
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    print(table(runs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
