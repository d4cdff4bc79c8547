"""The emulated hosts themselves (netns.py): they skip with a reason where they cannot be built, and they leave
nothing behind — not when a test fails, not when a run was killed before its teardown."""

import subprocess
import sys

import pytest

from netns import Host, NetnsHosts, reclaim_stale, run, skip_reason

needs_netns = pytest.mark.skipif(bool(skip_reason()), reason=skip_reason() or "netns available")


def namespaces() -> set[str]:
    return set(run("ip", "netns", "list").stdout.split())


def interfaces() -> str:
    return run("ip", "-o", "link", "show").stdout


def connects(prefix: list[str], server: Host) -> bool:
    """Whether a TCP connection from inside prefix reaches a listener on server's address."""
    listen = (f"import socket; s = socket.create_server(('{server.address}', 7077)); print('up', flush=True); "
              "s.settimeout(10); s.accept()")
    listener = subprocess.Popen([*server.prefix, sys.executable, "-c", listen], stdout=subprocess.PIPE, text=True)
    try:
        assert listener.stdout.readline().strip() == "up"
        dial = f"import socket; socket.create_connection(('{server.address}', 7077), timeout=3)"
        return run(*prefix, sys.executable, "-c", dial, check=False).returncode == 0
    finally:
        listener.kill()
        listener.wait()


def test_without_root_or_iproute2_the_namespace_tests_skip_and_say_why(monkeypatch):
    monkeypatch.setattr("os.geteuid", lambda: 1000)
    assert "need root" in skip_reason()
    monkeypatch.setattr("os.geteuid", lambda: 0)
    monkeypatch.setattr("shutil.which", lambda _name: None)
    assert "`ip` command" in skip_reason()


@needs_netns
def test_hosts_reach_each_other_and_are_torn_down_even_when_the_test_fails():
    built = NetnsHosts(2)
    with pytest.raises(RuntimeError, match="boom"), built:
        a, b = built.hosts
        names, veths = [a.name, b.name], [a.veth, b.veth]
        assert set(names) <= namespaces() and a.address != b.address and a.host_id != b.host_id
        assert all(f" {name}@" in interfaces() for name in veths) and f" {built.bridge}:" in interfaces()
        assert connects([], b) and connects(a.prefix, b)  # the root namespace and host a reach host b
        built.set_link(a, up=False)
        assert not connects(a.prefix, b)  # a partition
        raise RuntimeError("boom")
    assert not set(names) & namespaces()
    assert not any(f" {name}" in interfaces() for name in [*veths, built.bridge])


@needs_netns
def test_a_killed_runs_namespaces_and_bridge_are_reclaimed():
    gone = subprocess.Popen(["true"])
    gone.wait()  # a process id no longer alive: the "killed run"
    run("ip", "netns", "add", f"kvmesh-{gone.pid}x0-h0")
    run("ip", "link", "add", f"kvb{gone.pid}x0", "type", "bridge")
    reclaim_stale()
    assert f"kvmesh-{gone.pid}x0-h0" not in namespaces()
    assert f" kvb{gone.pid}x0:" not in interfaces()
