"""Hosts on one machine, for tests: network namespaces joined by a Linux bridge in the root namespace.

    with NetnsHosts(3) as hosts:           # root only; `skip_reason()` says why not
        a, b, c = hosts.hosts               # each: its own namespace, address and KVMESH_HOST_ID
        ServiceProcess("decode", ..., prefix=a.prefix, host=a.address, env=a.env)
        hosts.set_link(a, up=False)        # a partition: a's veth goes down (its end on the bridge)

The bridge has an address too, so the test process stays in the root namespace and dials every host through it.
Names carry the process id (and the subnet is one no other interface uses), so parallel test sessions on one
machine do not collide, and a later run deletes what a killed run left behind. `close()` (and leaving the block) deletes the namespaces, veths and the bridge even when
the test failed; a namespace's own end of its veth goes away with the namespace.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import shutil
import signal
import subprocess
from dataclasses import dataclass, field

from kvmesh.transports.shm.segment import owner_alive  # whether a pid still runs

SUBNET_PREFIX = "10.77"  # 10.77.N.0/24, N chosen free at start: unlikely to clash with a real network
_counter = itertools.count()
STALE_NAMESPACE = re.compile(r"^kvmesh-(\d+)x\d+-h\d+$")  # kvmesh-<pid>x<n>-h<i>
STALE_BRIDGE = re.compile(r"^\d+: (kvb(\d+)x\d+):")  # kvb<pid>x<n>


def skip_reason() -> str:
    """Why namespaces cannot be built here ("" when they can)."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "network namespaces need root (ip netns add)"
    if shutil.which("ip") is None:
        return "the `ip` command (iproute2) is not installed"
    return ""


def run(*argv: str, check: bool = True) -> subprocess.CompletedProcess:
    """Run one command (ip, tc); raise with its stderr when it fails and check is set."""
    done = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    if check and done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({done.returncode}): {done.stderr.strip()}")
    return done


def _free_subnet() -> str:
    """A 10.77.N prefix no interface of the root namespace uses yet."""
    used = run("ip", "-4", "-o", "addr", "show").stdout
    start = os.getpid() % 250
    for offset in range(250):
        prefix = f"{SUBNET_PREFIX}.{(start + offset) % 250 + 1}"
        if f" {prefix}." not in used:
            return prefix
    raise RuntimeError(f"every {SUBNET_PREFIX}.N/24 subnet is in use")


def _delete_namespace(name: str) -> None:
    for pid in run("ip", "netns", "pids", name, check=False).stdout.split():
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), signal.SIGKILL)  # only processes a test started live in its namespaces
    run("ip", "netns", "del", name, check=False)


def reclaim_stale() -> None:
    """Delete the namespaces and bridges of test runs whose process is gone (a pytest killed before its teardown
    ran): names carry the creating process's id."""
    for name in run("ip", "netns", "list").stdout.split():
        match = STALE_NAMESPACE.match(name)
        if match and not owner_alive(int(match.group(1))):
            _delete_namespace(name)
    for line in run("ip", "-o", "link", "show", "type", "bridge").stdout.splitlines():
        match = STALE_BRIDGE.search(line)
        if match and not owner_alive(int(match.group(2))):
            run("ip", "link", "del", match.group(1), check=False)


@dataclass
class Host:
    """One emulated host: a namespace, its address, and the veth end on the bridge that links it."""

    name: str  # the namespace's name (`ip netns exec NAME ...`)
    address: str  # its IPv4 address on the bridge's subnet
    veth: str  # the root-namespace end of its veth pair (on the bridge)
    host_id: str  # the KVMESH_HOST_ID its services run with

    @property
    def prefix(self) -> list[str]:
        """The argv that runs a command inside this host."""
        return ["ip", "netns", "exec", self.name]

    @property
    def env(self) -> dict[str, str]:
        """Environment for a service on this host: its own host id, and UCX kept to the network (UCX knows the
        namespaces share one kernel and would otherwise move bytes through shared memory or CMA, bypassing the
        link a test shapes or takes down)."""
        return {"KVMESH_HOST_ID": self.host_id, "UCX_TLS": "tcp,self", "UCX_NET_DEVICES": "eth0"}


@dataclass
class NetnsHosts:
    """n namespaces on one bridge; the root namespace reaches each through the bridge's own address."""

    num_hosts: int
    hosts: list[Host] = field(default_factory=list)
    bridge: str = ""
    bridge_address: str = ""
    _tag: str = ""

    def __post_init__(self) -> None:
        self._tag = f"{os.getpid()}x{next(_counter)}"
        self.bridge = f"kvb{self._tag}"[:15]

    def open(self) -> NetnsHosts:
        """Build the bridge and the namespaces (tearing down whatever was built if a step fails)."""
        reclaim_stale()
        try:
            subnet = _free_subnet()
            self.bridge_address = f"{subnet}.1"
            run("ip", "link", "add", self.bridge, "type", "bridge")
            run("ip", "addr", "add", f"{self.bridge_address}/24", "dev", self.bridge)
            run("ip", "link", "set", self.bridge, "up")
            for i in range(self.num_hosts):
                self._add_host(i, f"{subnet}.{10 + i}")
        except BaseException:
            self.close()
            raise
        return self

    def _add_host(self, i: int, address: str) -> None:
        host = Host(name=f"kvmesh-{self._tag}-h{i}", address=address, veth=f"kv{self._tag}h{i}"[:15],
                    host_id=f"netns-{self._tag}-h{i}")
        peer = f"kv{self._tag}n{i}"[:15]
        run("ip", "netns", "add", host.name)
        self.hosts.append(host)  # from here on close() removes it, even if a later step fails
        run("ip", "link", "add", host.veth, "type", "veth", "peer", "name", peer)
        run("ip", "link", "set", peer, "netns", host.name)
        run("ip", "link", "set", host.veth, "master", self.bridge)
        run("ip", "link", "set", host.veth, "up")
        inside = host.prefix
        run(*inside, "ip", "link", "set", "lo", "up")
        run(*inside, "ip", "link", "set", peer, "name", "eth0")
        run(*inside, "ip", "addr", "add", f"{address}/24", "dev", "eth0")
        run(*inside, "ip", "link", "set", "eth0", "up")

    def set_link(self, host: Host, up: bool) -> None:
        """Take host's link to the bridge down (a partition: nothing reaches it, it reaches nothing) or up."""
        run("ip", "link", "set", host.veth, "up" if up else "down")

    def shape(self, host: Host, *qdisc: str) -> None:
        """Shape the traffic leaving host: `shape(a, "tbf", "rate", "100mbit", "burst", "64kb", "latency", "50ms")`
        runs `tc qdisc replace dev eth0 root tbf ...` inside it (netem too where the kernel has sch_netem)."""
        run(*host.prefix, "tc", "qdisc", "replace", "dev", "eth0", "root", *qdisc)

    def close(self) -> None:
        """Delete every namespace (killing what still runs in it), veth and the bridge; quiet about what is gone."""
        for host in self.hosts:
            run("ip", "link", "del", host.veth, check=False)
            _delete_namespace(host.name)
        self.hosts.clear()
        if self.bridge:
            run("ip", "link", "del", self.bridge, check=False)

    def __enter__(self) -> NetnsHosts:
        return self.open()

    def __exit__(self, *_exc) -> None:
        self.close()
