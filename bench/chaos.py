"""A chaos soak: load `kvmesh up` while killing, freezing and restarting its parts, then count what was lost.

    python bench/chaos.py [--model DIR] [--duration-s 120] [--calm-s 20] [--clients 4] [--fault-every-s 5]
                          [--transport-chaos delay=1ms,corrupt=0.01,seed=7]
                          [--kv-load-failure recompute] [--out bench/chaos.json]

The mesh is `kvmesh up --prefill 2 --decode 2 --schedulers 2`, its transport wrapped in the chaos wrapper
(delayed and corrupted chunks). Clients send greedy requests (prompts from a fixed set, `ignore_eos`, so every
answer has a known length and a reference computed before the first fault) through the gateway's gRPC API. After
`--calm-s` undisturbed seconds, every `--fault-every-s` one fault hits a random part: SIGKILL of a prefill or decode
worker, the cache or one scheduler (the launcher restarts it), or SIGSTOP of a worker for 1-3 s (then SIGCONT).
At the end, with the load stopped and every part serving again:

- requests: completed, wrong (tokens differ from the reference), failed with a status (by code), and lost (an
  answer cut short without an error, or an error without a meaningful status: UNKNOWN, INTERNAL);
- leaks: blocks not free, handoffs or transfers alive on any worker; cache staging slots or transfers open;
  /dev/shm segments whose owner is dead;
- RSS drift of each process that lived through the whole run: mean of the last 10 % of samples over the first;
- goodput (completed requests/s) while faults run, over the calm phase's.

Exit status 0 only when nothing was wrong, lost or leaked. `tests/e2e/test_chaos_soak.py` runs it for a minute
(marker `soak`); RESULTS.md records a long run.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import grpc

from kvmesh.transports.shm import list_segments
from kvmesh.v1 import (cache_pb2, cache_pb2_grpc, common_pb2, decode_pb2, decode_pb2_grpc, gateway_pb2,
                       gateway_pb2_grpc, prefill_pb2_grpc)

SERVING = re.compile(r"kvmesh up: (\S+)\s+serving on ([^\s,]+)")
BACKOFF_S = 0.5
MEANINGFUL = {"UNAVAILABLE", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED", "DATA_LOSS", "ABORTED", "CANCELLED"}


class Up:
    """`kvmesh up` as a child, its "serving on" lines read into name -> address."""

    def __init__(self, args, grpc_port: int):
        cmd = [sys.executable, "-m", "kvmesh.services.cli", "up", "--prefill", "2", "--decode", "2",
               "--schedulers", "2", "--lease-s", "2", "--threads-per-worker", "1", "--grpc-port", str(grpc_port),
               "--http-port", str(_free_port()), "--restart-limit", "1000", "--restart-delay-s", "0.2"]
        cmd += ["--model", args.model]
        cmd += ["--transport-chaos", args.transport_chaos] if args.transport_chaos else []
        # a corrupt transfer is prefilled again on the decode worker rather than failed (--kv-load-failure)
        env = {**os.environ, "KVMESH_DECODE_KV_LOAD_FAILURE": args.kv_load_failure}
        self.process = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        self.addresses: dict[str, str] = {}
        self.log: list[str] = []
        threading.Thread(target=lambda: self.log.extend(self.process.stderr), daemon=True).start()
        for line in self.process.stdout:
            if m := SERVING.match(line):
                self.addresses[m.group(1)] = m.group(2)
            if "kvmesh up: ready" in line:
                threading.Thread(target=self.process.stdout.read, daemon=True).start()
                return
        raise RuntimeError(f"kvmesh up did not start: {''.join(self.log)[-2000:]}")

    def pids(self) -> dict[str, int]:
        """Child name -> pid now (by the `--port` in each child's command line)."""
        by_port = {a.rsplit(":", 1)[1]: n for n, a in self.addresses.items()}
        found = {}
        for entry in filter(str.isdigit, os.listdir("/proc")):
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) != self.process.pid:
                        continue
                with open(f"/proc/{entry}/cmdline") as f:
                    argv = f.read().split("\0")
            except (OSError, IndexError, ValueError):
                continue
            if "--port" in argv and argv[argv.index("--port") + 1] in by_port:
                found[by_port[argv[argv.index("--port") + 1]]] = int(entry)
        return found

    def stop(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(60)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rss_kib(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    except (OSError, StopIteration):
        return None


class Load:
    """Client threads sending greedy requests; every outcome recorded with its time."""

    def __init__(self, gateway: str, prompts: list[list[int]], max_tokens: int):
        self.channel = grpc.insecure_channel(gateway)
        self.stub = gateway_pb2_grpc.GatewayStub(self.channel)
        self.prompts, self.max_tokens = prompts, max_tokens
        self.reference: dict[int, list[int]] = {}
        self.outcomes: list[tuple[float, str, str]] = []  # (time, kind, detail)
        self.stopping = threading.Event()

    def ask(self, i: int) -> list[int]:
        params = common_pb2.SamplingParams(temperature=0.0, max_tokens=self.max_tokens, ignore_eos=True)
        request = gateway_pb2.GenerateRequest(prompt_token_ids=self.prompts[i], sampling=params)
        return [t for r in self.stub.Generate(request, timeout=120) for t in r.token_ids]

    def client(self, seed: int) -> None:
        rng = random.Random(seed)
        while not self.stopping.is_set():
            i = rng.randrange(len(self.prompts))
            try:
                tokens = self.ask(i)
            except grpc.RpcError as e:
                code = e.code().name
                self.outcomes.append((time.monotonic(), "failed" if code in MEANINGFUL else "lost",
                                      f"{code}: {(e.details() or '')[:160]}"))
                time.sleep(BACKOFF_S)  # as a client honouring Retry-After would: failures count time, not spins
                continue
            kind = "ok" if tokens == self.reference[i] else ("lost" if len(tokens) < self.max_tokens else "wrong")
            self.outcomes.append((time.monotonic(), kind, "" if kind == "ok" else f"prompt {i}: {tokens}"))


def fault(up: Up, rng: random.Random, faults: list[dict]) -> None:
    """One random fault, recorded."""
    pids = up.pids()
    workers = [n for n in pids if n.startswith(("prefill-", "decode-"))]
    action = rng.choice(["kill", "kill", "stop", "stop", "kill-cache", "kill-scheduler"])
    name = {"kill-cache": "cache", "kill-scheduler": rng.choice(["scheduler", "scheduler-1"])}.get(
        action, rng.choice(workers) if workers else "")
    if name not in pids:
        return
    record = {"t": time.monotonic(), "action": action, "target": name}
    if action == "stop":
        pause = rng.uniform(1.0, 3.0)
        os.kill(pids[name], signal.SIGSTOP)
        time.sleep(pause)
        os.kill(pids[name], signal.SIGCONT)
        record["paused_s"] = round(pause, 2)
    else:
        os.kill(pids[name], signal.SIGKILL)
    faults.append(record)


def leaks(up: Up, ours: set[int], timeout_s: float = 30.0) -> list[str]:
    """What is still taken once the load stopped: empty when nothing leaked (waits up to timeout_s to settle);
    `ours`: every pid the mesh's children had, whose segments must be gone once they are."""
    deadline = time.monotonic() + timeout_s
    while True:
        found = []
        for name, address in up.addresses.items():
            with grpc.insecure_channel(address) as channel:
                try:
                    if name.startswith(("prefill-", "decode-")):
                        stub = (decode_pb2_grpc.DecodeStub if name.startswith("decode") else
                                prefill_pb2_grpc.PrefillStub)(channel)
                        s = stub.Stats(decode_pb2.WorkerStatsRequest(), timeout=5)
                        if s.num_free_blocks != s.num_total_blocks or s.num_handoffs or s.num_transfers:
                            found.append(f"{name}: {s.num_total_blocks - s.num_free_blocks} blocks, "
                                         f"{s.num_handoffs} handoffs, {s.num_transfers} transfers")
                    elif name == "cache":
                        s = cache_pb2_grpc.CacheStub(channel).Stats(cache_pb2.StatsRequest(), timeout=5)
                        if s.staging_blocks_used or s.open_transfers:
                            found.append(f"cache: {s.staging_blocks_used} staging blocks, "
                                         f"{s.open_transfers} transfers open")
                except grpc.RpcError as e:
                    found.append(f"{name}: Stats failed ({e.code().name})")
        owners = {n: int(n.split("-")[1]) for n in list_segments()}
        found += [f"/dev/shm/{n}: its owner {pid} is dead" for n, pid in owners.items()
                  if pid in ours and not os.path.exists(f"/proc/{pid}")]
        if not found or time.monotonic() > deadline:
            return found
        time.sleep(0.5)


def rss_drift(samples: dict[tuple[str, int], list[int]], num_ticks: int) -> dict[str, float]:
    """Per process alive at every sample: last 10 % of its RSS samples over its first 10 %, minus one."""
    drift = {}
    for (name, pid), values in samples.items():
        if len(values) < num_ticks or len(values) < 10:
            continue
        k = max(1, len(values) // 10)
        drift[f"{name} ({pid})"] = round(sum(values[-k:]) / sum(values[:k]) - 1, 4)
    return drift


def run(args) -> dict:
    rng = random.Random(args.seed)
    prompts = [[rng.randrange(10, 1000) for _ in range(rng.randint(8, 120))] for _ in range(args.prompts)]
    if not args.model:
        from kvmesh.services.engine.model_init import init_model

        args.model = str(init_model(Path(tempfile.mkdtemp(prefix="kvmesh-chaos-")), "tiny", "llama", 0, "float32"))
    grpc_port = _free_port()
    up = Up(args, grpc_port)
    load = Load(f"127.0.0.1:{grpc_port}", prompts, args.max_tokens)
    faults: list[dict] = []
    rss: dict[tuple[str, int], list[int]] = {}
    try:
        for i in range(len(prompts)):  # references, before any fault (the transport chaos may already retry)
            load.reference[i] = load.ask(i)
        threads = [threading.Thread(target=load.client, args=(args.seed + c,)) for c in range(args.clients)]
        start = time.monotonic()
        for t in threads:
            t.start()
        ticks, next_fault = 0, start + args.calm_s
        while time.monotonic() - start < args.duration_s:
            ticks += 1
            for name, pid in up.pids().items():
                if (value := _rss_kib(pid)) is not None:
                    rss.setdefault((name, pid), []).append(value)
            if time.monotonic() >= next_fault:
                fault(up, rng, faults)
                next_fault = time.monotonic() + args.fault_every_s
                print(f"chaos: t={time.monotonic() - start:5.0f}s {faults[-1] if faults else ''}", flush=True)
            time.sleep(1.0)
        load.stopping.set()
        for t in threads:
            t.join(180)
        time.sleep(3.0)  # the last restarted children register again
        leaked = leaks(up, {pid for _, pid in rss})
    finally:
        status = up.stop() if up.process.poll() is None else up.process.returncode
    return summary(args, load, faults, leaked, rss_drift(rss, ticks), start, status)


def summary(args, load: Load, faults, leaked, drift, start: float, status: int) -> dict:
    kinds = Counter(kind for _, kind, _ in load.outcomes)
    calm_end = start + args.calm_s
    calm = sum(1 for t, k, _ in load.outcomes if k == "ok" and t < calm_end) / max(args.calm_s, 1e-9)
    chaos_s = max(args.duration_s - args.calm_s, 1e-9)
    during = sum(1 for t, k, _ in load.outcomes if k == "ok" and t >= calm_end) / chaos_s
    return {
        "config": vars(args), "requests": len(load.outcomes), "completed": kinds["ok"], "wrong": kinds["wrong"],
        "lost": kinds["lost"], "failed": dict(Counter(d.split(":")[0] for _, k, d in load.outcomes if k == "failed")),
        "examples": [d for _, k, d in load.outcomes if k != "ok"][:10],
        "faults": Counter(f"{f['action']} {f['target'].split('-')[0]}" for f in faults), "num_faults": len(faults),
        "leaks": leaked, "rss_drift": drift, "max_rss_drift": max(drift.values(), default=0.0),
        "goodput_calm_rps": round(calm, 3), "goodput_chaos_rps": round(during, 3),
        "goodput_ratio": round(during / calm, 3) if calm else None, "launcher_exit": status,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="", help="model folder (default: the tiny llama, made for the run)")
    parser.add_argument("--duration-s", type=float, default=120.0)
    parser.add_argument("--calm-s", type=float, default=20.0, help="undisturbed seconds first (goodput baseline)")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--fault-every-s", type=float, default=5.0)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--transport-chaos", default="delay=1ms,corrupt=0.01,seed=7")
    parser.add_argument("--kv-load-failure", default="recompute", choices=("fail", "recompute"),
                        help="the decode workers' policy for a corrupt transfer")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="", help="write the summary here as JSON")
    args = parser.parse_args(argv)
    result = run(args)
    text = json.dumps(result, indent=2, default=str)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    bad = result["wrong"] or result["lost"] or result["leaks"] or result["launcher_exit"] != 0
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
