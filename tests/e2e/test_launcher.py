"""`kvmesh up`: the whole mesh from one command, and nothing left behind when it stops or dies."""

import os
import signal
import subprocess
import sys
import time

from mesh import free_port


def _up(model, *extra):
    grpc_port, http_port = free_port(), free_port()
    cmd = [sys.executable, "-m", "kvmesh.services.cli", "up", "--model", str(model), "--grpc-port", str(grpc_port),
           "--http-port", str(http_port), "--threads-per-worker", "1", *extra]
    return grpc_port, cmd


def _children_of(parent: int) -> list[int]:
    """Pids of the live processes whose parent is `parent`."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == parent and fields[0] != "Z":
                pids.append(int(entry))
    return pids


def _alive(pids: list[int]) -> list[int]:
    alive = []
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] != "Z":
                    alive.append(pid)
        except OSError:
            pass
    return alive


def _wait_gone(pids: list[int], timeout_s: float) -> list[int]:
    deadline = time.monotonic() + timeout_s
    while _alive(pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    return _alive(pids)


def test_up_once_answers_and_stops_everything(model_dir):
    _, cmd = _up(model_dir("llama"), "--once", "The capital of France is", "--max-tokens", "5")
    launcher = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    children = set()
    try:
        while launcher.poll() is None:
            children.update(_children_of(launcher.pid))
            time.sleep(0.2)
    finally:  # a hung launcher must not outlive the test (its children die with it: PR_SET_PDEATHSIG)
        if launcher.poll() is None:
            launcher.kill()
    out = launcher.stdout.read()
    assert launcher.returncode == 0
    assert "5 generated]" in out
    assert len(children) == 5  # scheduler, cache, prefill, decode, gateway
    assert _wait_gone(list(children), 5) == []


def test_sigint_stops_the_mesh_and_sigkill_leaves_no_orphans(model_dir):
    for how in (signal.SIGINT, signal.SIGKILL):
        port, cmd = _up(model_dir("llama"))
        launcher = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        children = []
        try:
            for line in launcher.stdout:
                if "kvmesh up: ready" in line:
                    break
            assert launcher.poll() is None
            children = _children_of(launcher.pid)
            assert len(children) == 5
            launcher.send_signal(how)
            launcher.wait(30)
            if how == signal.SIGINT:
                assert launcher.returncode == 0
            assert _wait_gone(children, 10) == []
        finally:  # a failed assertion must not leave a mesh running
            launcher.kill()
            for pid in _alive(children):
                os.kill(pid, signal.SIGKILL)
