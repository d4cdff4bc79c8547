"""A shaped network link between two emulated hosts vs the chaos throttle: the same KV transfer, slowed either
by the kernel (a `tc tbf` rate limit on the prefill host's veth, TCP and all) or by the sender itself
(`--transport-chaos throttle=...`, a token bucket in the transport).

    sudo python bench/netns_link.py [--backends grpc,ucx] [--prompt-tokens 512] [--reps 3] [--out FILE]
                                    [--results bench/RESULTS.md]

Per backend: a mesh across network namespaces (tests/e2e/netns.py, netmesh.py: prefill on host A, decode on host
B, scheduler and cache on host C, gateway in the root namespace). The unshaped run sets the baseline transfer
time T0 and the KV bytes B; the rate R is chosen so that B/R is about --target-s seconds. Then A's egress is
shaped to R with tbf (same mesh), and a second mesh runs unshaped with chaos throttle=R. Reported: the
transfer time each request's Timings carries (the decode worker's first byte to verified commit), the effective
rate B/T, and both as ratios to the baseline and to the ideal B/R. netem (delay, loss) is used too where the
kernel has sch_netem (`--delay 5ms`); the sandbox this was written in has only tbf.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "e2e"))


def transfers(mesh, prompts: list[list[int]]) -> list[tuple[float, int, str]]:
    """(kv_transfer_seconds, kv_transfer_bytes, kv_transport) of each prompt, one at a time, after a warm-up."""
    out = []
    for prompt in prompts:
        _tokens, responses = mesh.generate(prompt, 2, timeout=300, ignore_eos=True)
        t = responses[-1].timings
        out.append((t.kv_transfer_seconds, t.kv_transfer_bytes, t.kv_transport))
    return out[1:]


def summary(name: str, runs, rate: float, base_s: float) -> dict:
    seconds = statistics.median(r[0] for r in runs)
    nbytes = statistics.median(r[1] for r in runs)
    return {"link": name, "transport": runs[0][2], "transfer_s": seconds, "kv_bytes": nbytes,
            "MBps": nbytes / seconds / 1e6, "vs_unshaped": seconds / base_s,
            "vs_ideal": seconds / (nbytes / rate) if rate else None, "runs": runs}


def tbf(rate: float) -> list[str]:
    """tbf arguments for rate bytes/s: a burst of 10 ms of traffic (at least 16 KiB), 200 ms of queue."""
    return ["tbf", "rate", f"{int(rate * 8)}bit", "burst", str(max(16384, int(rate / 100))), "latency", "200ms"]


def run_backend(model: str, backend: str, args, prompts) -> list[dict]:
    from netmesh import start_netns_mesh
    from netns import NetnsHosts

    worker_args = ("--handoff-lease-s", "120")
    with NetnsHosts(3) as hosts:
        a, b, c = hosts.hosts
        mesh = start_netns_mesh(model, control=c, prefills=[a], decodes=[b], transport=backend,
                                worker_args=worker_args)
        try:
            base = transfers(mesh, prompts())
            base_s, nbytes = statistics.median(r[0] for r in base), statistics.median(r[1] for r in base)
            rate = nbytes / args.target_s
            shaping = tbf(rate) if not args.delay else ["netem", "delay", args.delay, "rate", f"{int(rate * 8)}bit"]
            hosts.shape(a, *shaping)
            shaped = transfers(mesh, prompts())
        finally:
            mesh.close()
        mesh = start_netns_mesh(model, control=c, prefills=[a], decodes=[b], transport=backend,
                                chaos=f"throttle={rate / 1e6:.4f}MBps", worker_args=worker_args)
        try:
            hosts.shape(a, "pfifo")  # the link unshaped again
            throttled = transfers(mesh, prompts())
        finally:
            mesh.close()
    return [summary("unshaped", base, 0.0, base_s), summary(f"tc {shaping[0]} {rate / 1e6:.2f} MB/s", shaped,
                                                            rate, base_s),
            summary(f"chaos throttle {rate / 1e6:.2f} MB/s", throttled, rate, base_s)]


def cpu() -> dict:
    """`lscpu`'s model name, CPU count and flags."""
    fields = {}
    for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("Model name", "CPU(s)", "Flags"):
            fields[key.strip()] = value.strip()
    return fields


def markdown(rows: list[dict], args, machine: dict, load: tuple[float, float]) -> str:
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    lines = [f"## A shaped link between network namespaces vs the chaos throttle ({stamp})", "",
             f"`sudo .venv/bin/python bench/netns_link.py --backends {args.backends} --prompt-tokens "
             f"{args.prompt_tokens} --reps {args.reps} --target-s {args.target_s}`", "",
             f"Prefill on host A, decode on host B (network namespaces on a bridge); tiny llama, median of "
             f"{args.reps} requests each. Machine: \"{machine.get('Model name', '?')}\", "
             f"{machine.get('CPU(s)', '?')} CPUs; 1-minute load average {load[0]:.1f}–{load[1]:.1f}.", "",
             "| backend | link | KV bytes | transfer ms | MB/s | vs unshaped | vs ideal B/R |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for row in rows:
        ideal = f"{row['vs_ideal']:.2f}" if row["vs_ideal"] else "—"
        lines.append(f"| {row['transport']} | {row['link']} | {row['kv_bytes']:.0f} | {row['transfer_s'] * 1e3:.0f}"
                     f" | {row['MBps']:.2f} | {row['vs_unshaped']:.2f} | {ideal} |")
    lines += ["", f"<details><summary>lscpu flags</summary>\n\n`{machine.get('Flags', '')}`\n\n</details>", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backends", default="grpc,ucx")
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--target-s", type=float, default=1.0, help="shape the link so a transfer takes ~this")
    parser.add_argument("--delay", default="", help="netem delay too (needs sch_netem in the kernel)")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--results", type=Path, help="append a markdown section to this file")
    args = parser.parse_args()
    from netns import skip_reason
    if skip_reason():
        sys.exit(f"netns_link: {skip_reason()}")
    from kvmesh.services.engine.model_init import init_model
    rng = np.random.default_rng(0)

    def prompts() -> list[list[int]]:  # fresh tokens every request: no cache hit shortens a transfer
        return [rng.integers(10, 1000, args.prompt_tokens).tolist() for _ in range(args.reps + 1)]

    rows, load_start = [], Path("/proc/loadavg").read_text().split()[0]
    with tempfile.TemporaryDirectory() as tmp:
        model = str(init_model(Path(tmp) / "tiny", "tiny", "llama"))
        for backend in args.backends.split(","):
            rows += run_backend(model, backend, args, prompts)
            for row in rows[-3:]:
                print(f"{backend} {row['link']}: {row['transfer_s'] * 1e3:.0f} ms, {row['MBps']:.2f} MB/s",
                      file=sys.stderr)
    load = sorted((float(load_start), float(Path("/proc/loadavg").read_text().split()[0])))
    machine = cpu()
    if args.out:
        args.out.write_text(json.dumps({"rows": rows, "machine": machine}, indent=1) + "\n")
    if args.results:
        with args.results.open("a") as f:
            f.write("\n" + markdown(rows, args, machine, (load[0], load[1])))
    print(json.dumps([{k: v for k, v in r.items() if k != "runs"} for r in rows], indent=1))


if __name__ == "__main__":
    main()
