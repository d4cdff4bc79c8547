"""`kvmesh up` supervises: a worker SIGKILLed under it is restarted on its address and re-registers, its shared
memory is reclaimed at once, every other service keeps its process, and only a signal to the launcher stops the
mesh (leaving no process and no segment behind)."""

import os
import re
import signal
import subprocess
import sys
import threading
import time

import grpc
from kvmesh.transports.shm import list_segments
from kvmesh.v1 import (
    common_pb2,
    gateway_pb2,
    gateway_pb2_grpc,
    scheduler_pb2,
    scheduler_pb2_grpc,
)
from mesh import free_port

SERVING = re.compile(r"kvmesh up: (\S+)\s+serving on ([^\s,]+)")
START_TIMEOUT_S = 240.0


class Launcher:
    """A `kvmesh up` process whose stdout and stderr are collected line by line."""

    def __init__(self, model, *extra: str) -> None:
        self.grpc_port = free_port()
        cmd = [sys.executable, "-m", "kvmesh.services.cli", "up", "--model", str(model), "--grpc-port",
               str(self.grpc_port), "--http-port", str(free_port()), "--threads-per-worker", "1", *extra]
        self.process = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.out: list[str] = []
        self.err: list[str] = []
        for stream, lines in ((self.process.stdout, self.out), (self.process.stderr, self.err)):
            threading.Thread(target=lambda s=stream, l=lines: l.extend(s), daemon=True).start()

    def wait_for(self, lines: list[str], needle: str, timeout_s: float) -> str:
        """The first line holding needle, waiting for it; AssertionError with the output on timeout."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            found = next((line for line in list(lines) if needle in line), None)
            if found:
                return found
            assert self.process.poll() is None, f"kvmesh up exited: {''.join(self.err)[-3000:]}"
            time.sleep(0.1)
        raise AssertionError(f"no {needle!r} after {timeout_s} s; stderr: {''.join(self.err)[-3000:]}")

    def addresses(self) -> dict[str, str]:
        """Child name -> address, as printed when each one first served."""
        return {m.group(1): m.group(2) for m in map(SERVING.match, list(self.out)) if m}


def _children_by_port(parent: int) -> dict[str, int]:
    """Port (from `--port P` in its command line) -> pid, for every live child of parent."""
    found = {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{entry}/cmdline") as f:
                argv = f.read().split("\0")
        except OSError:
            continue
        if int(fields[1]) == parent and fields[0] != "Z" and "--port" in argv:
            found[argv[argv.index("--port") + 1]] = int(entry)
    return found


def _segments_of(pid: int) -> list[str]:
    return [s for s in list_segments() if s.startswith(f"kvmesh-{pid}-")]


def _wait(condition, timeout_s: float, interval_s: float = 0.1):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval_s)
    return condition()


def _generate(address: str, max_tokens: int = 8) -> list[int]:
    request = gateway_pb2.GenerateRequest(prompt="The capital of France is", sampling=common_pb2.SamplingParams(
        temperature=0.0, max_tokens=max_tokens, ignore_eos=True))
    with grpc.insecure_channel(address) as channel:
        return [t for r in gateway_pb2_grpc.GatewayStub(channel).Generate(request, timeout=30) for t in r.token_ids]


def _generate_eventually(address: str, timeout_s: float) -> tuple[list[int], list[str]]:
    """Tokens of the first request that succeeds within timeout_s, and the errors of those that failed before it
    (routing away from a dead worker is not the launcher's job: a few may fail while the scheduler learns)."""
    errors, deadline = [], time.monotonic() + timeout_s
    while True:
        try:
            return _generate(address), errors
        except grpc.RpcError as exc:
            errors.append(exc.code().name)
            assert time.monotonic() < deadline, f"no request succeeded in {timeout_s} s: {errors}"
            time.sleep(0.5)


def _decode_instances(scheduler: str) -> dict[str, str]:
    """Address -> instance id of every decode worker the scheduler has registered."""
    with grpc.insecure_channel(scheduler) as channel:
        reply = scheduler_pb2_grpc.SchedulerStub(channel).ListWorkers(
            scheduler_pb2.ListWorkersRequest(role=scheduler_pb2.WORKER_ROLE_DECODE), timeout=5)
    return {w.address: w.instance_id for w in reply.workers}


def test_a_sigkilled_decode_worker_is_restarted_and_the_rest_keep_serving(model_dir):
    up = Launcher(model_dir("llama"), "--prefill", "1", "--decode", "2", "--lease-s", "2")
    pids: dict[str, int] = {}
    try:
        up.wait_for(up.out, "kvmesh up: ready", START_TIMEOUT_S)
        addresses = up.addresses()
        gateway, victim = addresses["gateway"], addresses["decode-1"]
        pids = _children_by_port(up.process.pid)
        assert len(pids) == 6  # scheduler, cache, prefill, 2 decode, gateway
        reference = _generate(gateway)
        instances = _wait(lambda: (found := _decode_instances(addresses["scheduler"])).get(victim) and found, 30)
        old_pid = pids[victim.rsplit(":", 1)[1]]
        segments = _segments_of(old_pid)
        assert segments, f"decode-1 holds no shared-memory pool: {list_segments()}"

        os.kill(old_pid, signal.SIGKILL)
        died = up.wait_for(up.err, f"decode-1 (pid {old_pid}) killed by SIGKILL", 30)
        assert "reclaimed" in died and segments[0] in died
        assert _wait(lambda: not _segments_of(old_pid), 10), f"left behind: {_segments_of(old_pid)}"

        tokens, errors = _generate_eventually(gateway, 60)
        assert tokens == reference, errors
        up.wait_for(up.err, "decode-1 serving again", 120)
        now = _children_by_port(up.process.pid)
        assert now[victim.rsplit(":", 1)[1]] != old_pid
        assert {p: pid for p, pid in now.items() if pid != now[victim.rsplit(":", 1)[1]]} == \
            {p: pid for p, pid in pids.items() if pid != old_pid}  # nobody else was restarted
        assert _wait(lambda: _decode_instances(addresses["scheduler"]).get(victim, instances[victim])
                     != instances[victim], 30), "the restarted worker did not register again"
        for _ in range(3):
            assert _generate(gateway) == reference
        assert up.process.poll() is None
        pids = now

        up.process.send_signal(signal.SIGTERM)
        assert up.process.wait(60) == 0
        assert _wait(lambda: not any(os.path.exists(f"/proc/{pid}") and _zombie_free(pid) for pid in pids.values()),
                     15)
        assert [s for pid in [*pids.values(), old_pid] for s in _segments_of(pid)] == []
    finally:  # a failed assertion must not leave a mesh running
        _kill_all(up, pids)


def _kill_all(up: Launcher, pids: dict[str, int]) -> None:
    """Teardown: a failed assertion must not leave the launcher or any of its children running."""
    up.process.kill()
    for pid in pids.values():
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _zombie_free(pid: int) -> bool:
    """Whether pid is a live (not zombie) process."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_a_crash_looping_child_is_given_up_on_and_the_launcher_keeps_running(model_dir, tmp_path):
    up = Launcher(model_dir("llama"), "--restart-limit", "1", "--restart-delay-s", "0.2")
    pids: dict[str, int] = {}
    try:
        up.wait_for(up.out, "kvmesh up: ready", START_TIMEOUT_S)
        pids = _children_by_port(up.process.pid)
        cache_port = up.addresses()["cache"].rsplit(":", 1)[1]
        os.kill(pids[cache_port], signal.SIGKILL)
        up.wait_for(up.err, "cache restarted", 30)
        restarted = _wait(lambda: _children_by_port(up.process.pid).get(cache_port), 10)
        os.kill(restarted, signal.SIGKILL)
        up.wait_for(up.err, "gave up", 30)
        time.sleep(1.0)
        assert up.process.poll() is None  # the rest keep serving
        assert cache_port not in _children_by_port(up.process.pid)
        assert _generate(up.addresses()["gateway"])  # a cache that is gone is a miss, never an error
        up.process.send_signal(signal.SIGTERM)
        assert up.process.wait(60) == 0
    finally:
        _kill_all(up, pids)


def test_with_two_schedulers_a_sigkilled_one_costs_no_request(model_dir):
    up = Launcher(model_dir("llama"), "--schedulers", "2", "--lease-s", "2")
    pids: dict[str, int] = {}
    try:
        up.wait_for(up.out, "kvmesh up: ready", START_TIMEOUT_S)
        addresses = up.addresses()
        assert {"scheduler", "scheduler-1"} <= set(addresses), addresses
        pids = _children_by_port(up.process.pid)
        assert len(pids) == 6  # 2 schedulers, cache, prefill, decode, gateway
        reference = _generate(addresses["gateway"])
        victim = pids[addresses["scheduler"].rsplit(":", 1)[1]]
        os.kill(victim, signal.SIGKILL)
        up.wait_for(up.err, f"scheduler (pid {victim}) killed by SIGKILL", 30)
        for _ in range(3):  # at once, while it is down or restarting: the other one routes
            assert _generate(addresses["gateway"]) == reference
        up.wait_for(up.err, "scheduler serving again", 120)
        assert _generate(addresses["gateway"]) == reference
        pids = _children_by_port(up.process.pid)
        up.process.send_signal(signal.SIGTERM)
        assert up.process.wait(60) == 0
    finally:
        _kill_all(up, pids)


def test_sighup_restarts_every_worker_in_turn_and_no_request_is_lost(model_dir):
    up = Launcher(model_dir("llama"), "--prefill", "2", "--decode", "2", "--lease-s", "2")
    pids: dict[str, int] = {}
    try:
        up.wait_for(up.out, "kvmesh up: ready", START_TIMEOUT_S)
        gateway = up.addresses()["gateway"]
        pids = _children_by_port(up.process.pid)
        reference = _generate(gateway, max_tokens=48)
        results, errors, stop = [], [], threading.Event()

        def client():
            while not stop.is_set():
                try:
                    results.append(_generate(gateway, max_tokens=48))
                except grpc.RpcError as e:
                    errors.append(f"{e.code().name}: {e.details()}")

        threads = [threading.Thread(target=client) for _ in range(3)]
        for t in threads:
            t.start()
        up.process.send_signal(signal.SIGHUP)
        up.wait_for(up.err, "rolling restart done", 240)
        stop.set()
        for t in threads:
            t.join(120)
        assert errors == [] and results and all(r == reference for r in results), errors[:3]
        now = _children_by_port(up.process.pid)
        log = "".join(up.err)
        assert all(f"rolling restart: stopping {n}" in log for n in ("prefill-0", "prefill-1", "decode-0", "decode-1"))
        assert sum(now[p] != pids[p] for p in pids) == 4, (pids, now)  # every worker, and only the workers
        assert up.process.poll() is None
        pids = now
        up.process.send_signal(signal.SIGTERM)
        assert up.process.wait(60) == 0
    finally:
        _kill_all(up, pids)
