"""A mesh spread over emulated hosts (netns.py): each service placed on a namespace of its own choosing, with that
host's address and KVMESH_HOST_ID; the gateway in the root namespace on 127.0.0.1, reaching the others through the
bridge. Services bound to a non-loopback address need `--insecure` (closed by default), so each gets it."""

from __future__ import annotations

import time

from mesh import START_TIMEOUT_S, Mesh, free_port
from netns import Host
from procs import Procs
from kvmesh.v1 import scheduler_pb2


def _on(host: Host) -> dict:
    """Procs.start/launch keywords that run a service on host."""
    return {"prefix": host.prefix, "host": host.address}


def _env(host: Host, env: dict | None) -> dict:
    return {**(env or {}), **host.env}


def start_netns_mesh(model: str, *, control: Host, prefills: list[Host], decodes: list[Host],
                     transport: str = "auto", chaos: str = "", lease_s: float = 3.0,
                     worker_args: tuple[str, ...] = (), env: dict | None = None) -> Mesh:
    """Scheduler and cache on control, one prefill worker per host in prefills, one decode worker per host in
    decodes (a host may appear twice: two workers on one host), the gateway in the root namespace."""
    procs = Procs()
    try:
        scheduler = procs.start("scheduler", "--insecure", "--lease-s", str(lease_s), env=_env(control, env),
                                **_on(control))
        common = ["--insecure", "--scheduler", scheduler.address]
        cache = procs.start("cache", *common, env=_env(control, env), **_on(control))
        worker = [*common, "--model", model, "--transport", transport, "--kv-cache-bytes", str(64 * 2**20),
                  "--handoff-lease-s", "5", *(["--transport-chaos", chaos] if chaos else []), *worker_args]
        prefill_procs = [procs.launch("prefill", *worker, env=_env(h, env), **_on(h)) for h in prefills]
        decode_procs = [procs.launch("decode", *worker, env=_env(h, env), **_on(h)) for h in decodes]
        for proc in prefill_procs + decode_procs:
            proc.wait_serving(START_TIMEOUT_S)
        http_port = free_port()
        gateway = procs.start("gateway", "--scheduler", scheduler.address, "--model", model, "--http-port",
                              str(http_port), env=env, timeout_s=START_TIMEOUT_S)
        mesh = Mesh(procs, scheduler, cache, prefill_procs, decode_procs, gateway, http_port)
        _wait_registered(mesh, len(prefills), len(decodes))
        return mesh
    except BaseException:
        procs.kill_all()
        raise


def _wait_registered(mesh: Mesh, num_prefill: int, num_decode: int) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # registration is asynchronous to SERVING
        if (len(mesh.workers(scheduler_pb2.WORKER_ROLE_PREFILL)) == num_prefill
                and len(mesh.workers(scheduler_pb2.WORKER_ROLE_DECODE)) == num_decode):
            return
        time.sleep(0.05)
    raise RuntimeError("workers did not register with the scheduler within 10 s")

