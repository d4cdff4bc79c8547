"""No single point of failure in routing: with two schedulers, every worker registers and heartbeats with both
(its KV events reaching each), and the gateway moves on to the other when one is killed or frozen — no request
fails, and greedy output stays the same."""

from __future__ import annotations

import os
import signal
import threading
import time

from mesh import start_mesh
from kvmesh.v1 import scheduler_pb2, scheduler_pb2_grpc

PROMPT = list(range(3, 75))  # four full blocks of 16, and a tail


def _route(mesh, scheduler, prompt) -> scheduler_pb2.RouteResponse:
    stub = scheduler_pb2_grpc.SchedulerStub(mesh.channel(scheduler.address))
    return stub.Route(scheduler_pb2.RouteRequest(request_id=f"probe-{time.monotonic_ns()}", prompt_token_ids=prompt),
                      timeout=5)


def _until(condition, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_workers_register_with_every_scheduler_and_each_learns_their_kv(model_dir):
    mesh = start_mesh(str(model_dir("llama")), schedulers=2)
    try:
        first, second = mesh.scheduler, mesh.more_schedulers[0]
        for s in (first, second):
            assert {w.address for w in mesh.workers(scheduler_pb2.WORKER_ROLE_DECODE, s)} == \
                {d.address for d in mesh.decodes}
        mesh.generate(PROMPT, max_tokens=4)
        # the decode worker's prefix cache now holds the prompt's blocks; both schedulers hear it on heartbeats
        assert _until(lambda: all(_route(mesh, s, PROMPT).num_decode_cached_tokens >= 64 for s in (first, second)),
                      15), [_route(mesh, s, PROMPT).num_decode_cached_tokens for s in (first, second)]
    finally:
        mesh.close()


def test_killing_one_of_two_schedulers_fails_no_request(model_dir):
    mesh = start_mesh(str(model_dir("llama")), schedulers=2)
    try:
        reference, _ = mesh.generate(PROMPT, max_tokens=6)
        results, errors, stop = [], [], threading.Event()

        def client():
            while not stop.is_set():
                try:
                    results.append(mesh.generate(PROMPT, max_tokens=6)[0])
                except Exception as e:  # noqa: BLE001 — every failure is the test's finding
                    errors.append(repr(e))

        threads = [threading.Thread(target=client) for _ in range(2)]
        for t in threads:
            t.start()
        assert _until(lambda: len(results) >= 2, 60)
        mesh.scheduler.kill()  # SIGKILL: the gateway's next Route to it is refused
        before = len(results)
        assert _until(lambda: len(results) >= before + 6 or errors, 120)
        stop.set()
        for t in threads:
            t.join(60)
        assert errors == []
        assert all(r == reference for r in results)
    finally:
        mesh.close()


def test_a_frozen_scheduler_is_passed_over(model_dir):
    mesh = start_mesh(str(model_dir("llama")), schedulers=2)
    frozen = mesh.scheduler.proc.pid
    try:
        reference, _ = mesh.generate(PROMPT, max_tokens=6)
        os.kill(frozen, signal.SIGSTOP)  # alive and listening, but answers nothing: only a deadline tells
        for _ in range(3):
            assert mesh.generate(PROMPT, max_tokens=6, timeout=60)[0] == reference
        assert "did not answer Route (DEADLINE_EXCEEDED)" in mesh.gateway.stderr
    finally:
        os.kill(frozen, signal.SIGCONT)
        mesh.close()
