"""A 10x overload burst against `kvmesh up`: refused at once, admitted ones on time, memory bounded.

    python bench/overload_burst.py [--model DIR] [--input-len 256] [--output-len 32] [--slo-ttft-ms 2000]
        [--unloaded 20] [--burst-rate 15] [--burst-s 10] [--bursts 2] [--pack-prompt-tokens 0]
        [--worker-nice 0] [--out bench/overload_burst.json]

One mesh (`kvmesh up`, 1 prefill + 1 decode, slo_aware, the TTFT objective as the scheduler's default) serves:
first `--unloaded` requests one at a time (the unloaded TTFT p99), then `--bursts` Poisson bursts at
`--burst-rate` requests/s for `--burst-s` seconds each (the rate is ~10x what one prefill worker sustains for these
prompts on this machine: 256 tokens take ~0.7 s), with a pause between them for the mesh to drain. Reports, per
burst: how many were refused (429) and how fast (send to status, p50/p99/max), the admitted requests' TTFT p99
against the unloaded p99, and every service's RSS after each phase (from /proc), so growth from burst to burst
shows. `--pack-prompt-tokens` sets the workers' knob of that name (0: the engine packs every queued prompt its
token budget holds into one step); `--worker-nice N` lowers every engine worker thread's CPU priority by N once
the mesh is up (does the gateway's and scheduler's refusal then win the cores?). Retry-After on every 429 is
asserted by the e2e tests (tests/e2e/test_admission_blocks.py, test_slo_routing.py); here it is the timing.
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


def process_tree() -> dict[int, list[int]]:
    """Every process's children, by parent pid (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    return children


def rss_by_service(root: int) -> dict[str, float]:
    """MiB of resident memory per child of `kvmesh up` (named by its subcommand), its own children included."""
    children = process_tree()

    def rss(pid: int) -> float:
        try:
            pages = int(Path(f"/proc/{pid}/statm").read_text().split()[1])
        except (OSError, IndexError, ValueError):
            return 0.0
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20 + sum(rss(c) for c in children.get(pid, []))

    out = {}
    for pid in children.get(root, []):
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        name = next((a.decode() for a in argv if a.decode() in ("scheduler", "cache", "prefill", "decode",
                                                                  "gateway", "worker")), str(pid))
        out[f"{name}-{pid}"] = round(rss(pid), 1)
    return out


def renice_workers(root: int, niceness: int) -> list[int]:
    """Lower the CPU priority of every thread of the mesh's engine workers (prefill, decode, their children) by
    `niceness`, so the gateway and scheduler win the cores under load; the workers' pids."""
    children = process_tree()
    pids = [int(name.rsplit("-", 1)[1]) for name in rss_by_service(root) if name.split("-")[0] in ("prefill",
                                                                                                   "decode")]
    todo = list(pids)
    while todo:
        pid = todo.pop()
        todo += children.get(pid, [])
        for task in Path(f"/proc/{pid}/task").iterdir():  # nice is per thread on Linux
            os.setpriority(os.PRIO_PROCESS, int(task.name), niceness)
    return pids


def serve(http_port: int, out: Path, args, extra: list[str]) -> dict:
    subprocess.run([sys.executable, "-m", "kvmesh.services.cli", "bench", "serve", "--base-url",
                    f"http://127.0.0.1:{http_port}", "--dataset-name", "random", "--input-len", str(args.input_len),
                    "--output-len", str(args.output_len), "--slo-ttft-ms", str(args.slo_ttft_ms), "--out", str(out),
                    "--request-timeout-s", "300", "--no-progress", "--seed", str(time.time_ns() % 100000), *extra],
                   check=True, stdout=subprocess.DEVNULL)
    return json.loads(out.read_text())


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


def burst_figures(summary: dict, unloaded_p99: float) -> dict:
    requests = summary["requests"]
    refused = [1e3 * r["e2e_s"] for r in requests if r["error"] == "http_429"]
    admitted = [1e3 * r["ttft_s"] for r in requests if r["error"] is None]
    return {"sent": len(requests), "completed": summary["completed"], "refused_429": len(refused),
            "other_errors": {k: v for k, v in summary["errors"].items() if k != "http_429"},
            "refusal_ms": {"p50": pct(refused, 0.5), "p99": pct(refused, 0.99), "max": max(refused, default=0)},
            "admitted_ttft_ms": {"p50": pct(admitted, 0.5), "p99": pct(admitted, 0.99)},
            "admitted_p99_vs_unloaded": pct(admitted, 0.99) / unloaded_p99}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model")
    parser.add_argument("--input-len", type=int, default=256)
    parser.add_argument("--output-len", type=int, default=32)
    parser.add_argument("--slo-ttft-ms", type=float, default=2000.0)
    parser.add_argument("--unloaded", type=int, default=20)
    parser.add_argument("--burst-rate", type=float, default=15.0)
    parser.add_argument("--burst-s", type=float, default=10.0)
    parser.add_argument("--bursts", type=int, default=2)
    parser.add_argument("--pack-prompt-tokens", type=int, default=0)
    parser.add_argument("--worker-nice", type=int, default=0, help="renice the engine workers' threads by this")
    parser.add_argument("--out", default=str(HERE / "overload_burst.json"))
    args = parser.parse_args()
    if not args.model:
        from kvmesh.services.models import default_model

        args.model = str(default_model(progress=lambda m: print(m, file=sys.stderr)))
    http_port = free_port()
    env = {"KVMESH_SCHEDULER_SLO_TTFT_S": str(args.slo_ttft_ms / 1000),
           "KVMESH_PREFILL_PACK_PROMPT_TOKENS": str(args.pack_prompt_tokens),
           "KVMESH_DECODE_PACK_PROMPT_TOKENS": str(args.pack_prompt_tokens)}
    proc = start_mesh(args.model, ["--threads-per-worker", "1"], env, http_port, free_port())
    report = {"when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "args": vars(args), "rss_mib": {}}
    if args.worker_nice:
        report["reniced"] = renice_workers(proc.pid, args.worker_nice)
    try:
        with tempfile.TemporaryDirectory() as tmp_name:
            tmp = Path(tmp_name)
            report["rss_mib"]["start"] = rss_by_service(proc.pid)
            print("unloaded ...", file=sys.stderr, flush=True)
            quiet = serve(http_port, tmp / "unloaded.json", args, ["--num-prompts", str(args.unloaded),
                                                                   "--max-concurrency", "1"])
            ttfts = [1e3 * r["ttft_s"] for r in quiet["requests"] if r["error"] is None]
            report["unloaded"] = {"completed": quiet["completed"], "errors": quiet["errors"],
                                  "ttft_ms": {"p50": pct(ttfts, 0.5), "p99": pct(ttfts, 0.99)}}
            report["rss_mib"]["after unloaded"] = rss_by_service(proc.pid)
            report["bursts"] = []
            for i in range(args.bursts):
                print(f"burst {i + 1} ...", file=sys.stderr, flush=True)
                n = int(args.burst_rate * args.burst_s)
                summary = serve(http_port, tmp / f"burst{i}.json", args, ["--num-prompts", str(n),
                                                                          "--request-rate", str(args.burst_rate)])
                report["bursts"].append(burst_figures(summary, report["unloaded"]["ttft_ms"]["p99"]))
                time.sleep(5)
                report["rss_mib"][f"after burst {i + 1}"] = rss_by_service(proc.pid)
    finally:
        proc.terminate()
        proc.wait(60)
    report["loadavg"] = os.getloadavg()
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps({k: report[k] for k in ("unloaded", "bursts", "rss_mib")}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
