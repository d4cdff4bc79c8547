"""Flexible workers (`kvmesh worker --role auto`, issue #19): what serving with both services mounted costs, and
how long a flip takes.

    python bench/role_flip.py [--preset small] [--requests 20] [--flips 6] [--out bench/role_flip.json]

1. Overhead: the same greedy requests (one at a time, 64 prompt tokens, 32 out) through a mesh of a fixed prefill
   and a fixed decode worker, then through a mesh of two flexible workers (one starting as prefill, one as decode);
   median end-to-end latency of each, and the ratio flexible / fixed (same run, same machine).
2. Flip latency, idle: SetWorkerRole on both flexible workers (swap), until the scheduler lists both in their new
   roles; repeated back and forth. Its baseline is the heartbeat interval (lease / 3): a flip is asked for in the
   next heartbeat's answer, so an idle flip should take about one interval.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "e2e"))
sys.path.insert(0, str(ROOT / "bench"))

LEASE_S = 3.0
PROMPT_TOKENS, MAX_TOKENS = 64, 32


def latencies(mesh, prompts: list[list[int]]) -> list[float]:
    """End-to-end seconds of each prompt, sent one at a time (after two warm-up requests)."""
    for prompt in prompts[:2]:
        mesh.generate(prompt, max_tokens=MAX_TOKENS, ignore_eos=True, timeout=300)
    times = []
    for prompt in prompts:
        start = time.perf_counter()
        tokens, _ = mesh.generate(prompt, max_tokens=MAX_TOKENS, ignore_eos=True, timeout=300)
        times.append(time.perf_counter() - start)
        assert len(tokens) == MAX_TOKENS
    return times


def flip_times(mesh, num_flips: int) -> list[float]:
    """Seconds from asking both flexible workers to swap roles to the scheduler listing them swapped."""
    from kvmesh.v1 import scheduler_pb2, scheduler_pb2_grpc

    stub = scheduler_pb2_grpc.SchedulerStub(mesh.channel(mesh.scheduler.address))
    a, b = mesh.prefills[0].address, mesh.decodes[0].address
    roles = {a: scheduler_pb2.WORKER_ROLE_PREFILL, b: scheduler_pb2.WORKER_ROLE_DECODE}
    times = []
    for _ in range(num_flips):
        roles = {a: roles[b], b: roles[a]}
        start = time.perf_counter()
        for address, role in roles.items():
            request = scheduler_pb2.SetWorkerRoleRequest(address=address, role=role, reason="bench")
            assert stub.SetWorkerRole(request, timeout=5).accepted
        while {w.address: w.role for w in stub.ListWorkers(scheduler_pb2.ListWorkersRequest(), timeout=5).workers
               if w.desired_role == 0 and w.address in roles} != roles:
            time.sleep(0.005)
        times.append(time.perf_counter() - start)
        mesh.generate([5] * PROMPT_TOKENS, max_tokens=4, ignore_eos=True, timeout=300)  # served in the new roles
    return times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small", choices=["tiny", "small"])
    parser.add_argument("--requests", type=int, default=20)
    parser.add_argument("--flips", type=int, default=6)
    parser.add_argument("--out", default=str(ROOT / "bench" / "role_flip.json"))
    args = parser.parse_args()
    from machine import machine
    from mesh import start_mesh
    from kvmesh.services.engine.model_init import init_model

    rng = random.Random(0)
    prompts = [[rng.randrange(3, 4000) for _ in range(PROMPT_TOKENS)] for _ in range(args.requests)]
    result = {"machine": machine(), "preset": args.preset, "prompt_tokens": PROMPT_TOKENS, "max_tokens": MAX_TOKENS}
    with tempfile.TemporaryDirectory() as folder:
        model = str(init_model(folder, args.preset, "llama", 0, "float32"))
        for kind in ("fixed", "flexible"):
            mesh = start_mesh(model, lease_s=LEASE_S, flexible=kind == "flexible")
            try:
                result[f"{kind}_e2e_s"] = latencies(mesh, prompts)
                if kind == "flexible":
                    result["flip_s"] = flip_times(mesh, args.flips)
            finally:
                mesh.close()
    fixed, flexible = (statistics.median(result[f"{k}_e2e_s"]) for k in ("fixed", "flexible"))
    flip = statistics.median(result["flip_s"])
    result["summary"] = {"fixed_e2e_median_s": fixed, "flexible_e2e_median_s": flexible,
                         "flexible_over_fixed": flexible / fixed, "flip_median_s": flip,
                         "heartbeat_interval_s": LEASE_S / 3, "flip_over_heartbeat": flip / (LEASE_S / 3)}
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result["summary"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
