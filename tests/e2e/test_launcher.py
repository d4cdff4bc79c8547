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


def test_up_hands_api_keys_to_the_gateway_and_once_sends_one(model_dir, tmp_path):
    keys = tmp_path / "keys"
    keys.write_text("file-key team-a\n")
    grpc_port, cmd = _up(model_dir("llama"), "--api-key", "flag-key", "--api-key-file", str(keys))
    launcher = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        for line in launcher.stdout:
            if "kvmesh up: ready" in line:
                break
        gateway = next(p for p in _children_of(launcher.pid) if "gateway" in open(f"/proc/{p}/cmdline").read())
        assert "flag-key" not in open(f"/proc/{gateway}/cmdline").read()  # keys never on a command line
        assert _grpc_code(grpc_port, None) == "UNAUTHENTICATED"
        assert _grpc_code(grpc_port, "flag-key") == _grpc_code(grpc_port, "file-key") == "OK"
    finally:
        launcher.send_signal(signal.SIGINT)
        launcher.wait(30)
    _, cmd = _up(model_dir("llama"), "--api-key-file", str(keys), "--once", "The capital of France is",
                 "--max-tokens", "3")
    once = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert once.returncode == 0 and "3 generated]" in once.stdout, once.stderr[-2000:]


def _grpc_code(port: int, key: str | None) -> str:
    import grpc

    from kvmesh.v1 import gateway_pb2, gateway_pb2_grpc

    metadata = [("authorization", f"Bearer {key}")] if key else None
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        try:
            gateway_pb2_grpc.GatewayStub(channel).ListModels(gateway_pb2.ListModelsRequest(), timeout=10,
                                                             metadata=metadata)
        except grpc.RpcError as e:
            return e.code().name
    return "OK"


def test_up_tls_runs_the_mesh_over_mtls_with_a_private_folder_it_deletes(model_dir):
    from procs import health_status

    grpc_port, cmd = _up(model_dir("llama"), "--tls")
    launcher = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen = []
    try:
        addresses = {}
        for line in launcher.stdout:
            seen.append(line)
            if "serving on" in line:
                name, address = line.split("kvmesh up:")[1].split("serving on")
                addresses[name.strip()] = address.split(",")[0].strip()
            if "kvmesh up: ready" in line:
                break
        args = [open(f"/proc/{p}/cmdline").read().split("\0") for p in _children_of(launcher.pid)]
        folders = {a[a.index("--tls-dir") + 1] for a in args}
        assert len(args) == 5 and len(folders) == 1, "".join(seen[-30:])  # every child, the same folder
        (folder,) = folders
        assert os.stat(folder).st_mode & 0o777 == 0o700
        assert health_status(addresses["scheduler"]) == "UNAVAILABLE"  # plaintext: no handshake
        assert _grpc_code(grpc_port, None) == "OK"  # the gateway's public port stays as it was
    finally:
        launcher.send_signal(signal.SIGINT)
        launcher.wait(30)
    assert launcher.returncode == 0
    assert not os.path.exists(folder)
    _, cmd = _up(model_dir("llama"), "--tls", "--once", "The capital of France is", "--max-tokens", "3")
    once = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert once.returncode == 0 and "3 generated]" in once.stdout, once.stderr[-2000:]


def test_up_flexible_runs_role_auto_workers_that_answer(model_dir):
    """`kvmesh up --flexible`: the engine workers are `kvmesh worker --role auto` processes (one in each role at
    first), the scheduler plans, and the mesh answers."""
    _, cmd = _up(model_dir("llama"), "--flexible", "--once", "The capital of France is", "--max-tokens", "5")
    launcher = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    argvs = {}
    try:
        while launcher.poll() is None:
            for pid in _children_of(launcher.pid):
                try:
                    with open(f"/proc/{pid}/cmdline", "rb") as f:
                        argvs[pid] = f.read().split(b"\0")
                except OSError:
                    pass
            time.sleep(0.2)
    finally:
        if launcher.poll() is None:
            launcher.kill()
    out = launcher.stdout.read()
    assert launcher.returncode == 0 and "5 generated]" in out
    roles = sorted(argv[argv.index(b"--initial-role") + 1] for argv in argvs.values() if b"--initial-role" in argv)
    assert roles == [b"decode", b"prefill"]
    schedulers = [argv for argv in argvs.values() if b"scheduler" in argv and b"--planner-interval-s" in argv]
    assert len(schedulers) == 1
    assert _wait_gone(list(argvs), 5) == []
