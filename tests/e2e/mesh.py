"""A whole kvmesh mesh as real processes on 127.0.0.1, and the references its output is checked against."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import grpc
import pytest

from procs import Procs, ServiceProcess
from kvmesh.services import children
from kvmesh.services.common import certs, tls
from kvmesh.v1 import (common_pb2, decode_pb2, decode_pb2_grpc, gateway_pb2, gateway_pb2_grpc, prefill_pb2_grpc,
                       scheduler_pb2, scheduler_pb2_grpc)

START_TIMEOUT_S = 120.0


def per_transport(variants=((),), name=lambda variant: "") -> list:
    """pytest params: (transport, *variant) for each variant on grpc, shm and ucx, skipped (saying why) where a
    backend cannot run here; ids "<transport>" plus name(variant)."""
    from kvmesh.transports import available_backends

    params = []
    for transport in ("grpc", "shm", "ucx"):
        marks = [] if transport in available_backends() else [pytest.mark.skip(reason=f"{transport} unavailable")]
        params += [pytest.param((transport, *variant), id=transport + name(variant), marks=marks)
                   for variant in variants]
    return params


def free_port() -> int:
    """A port for a service to bind later: below the ephemeral range, where no outgoing connection takes it first."""
    return children.free_port()


@dataclass
class Mesh:
    """Addresses and processes of one running mesh."""

    procs: Procs
    scheduler: ServiceProcess
    cache: ServiceProcess
    prefills: list[ServiceProcess]
    decodes: list[ServiceProcess]
    gateway: ServiceProcess
    http_port: int
    channels: dict = field(default_factory=dict)
    more_schedulers: list[ServiceProcess] = field(default_factory=list)  # start_mesh(schedulers=N): the others
    #: With mTLS: the certs folder, and the admin certificate tests present to the internal services.
    tls_dir: str = ""
    #: With API keys at the gateway (start_mesh(api_key=...)): the key `generate` presents.
    api_key: str = ""
    #: Every worker is a flexible one (start_mesh(flexible=True)): both its services are checked for leaks.
    flexible: bool = False

    def channel(self, address: str) -> grpc.Channel:
        if address not in self.channels:
            admin = tls.load(self.tls_dir, "admin") if self.tls_dir and address != self.gateway.address else None
            self.channels[address] = tls.open_channel(address, aio=False, identity=admin)
        return self.channels[address]

    @property
    def http_base(self) -> str:
        return f"http://127.0.0.1:{self.http_port}/v1"

    def gateway_stub(self) -> gateway_pb2_grpc.GatewayStub:
        return gateway_pb2_grpc.GatewayStub(self.channel(self.gateway.address))

    def generate(self, prompt_ids: list[int], max_tokens: int = 16, timeout: float = 60, **sampling):
        """Greedy (unless told otherwise) generation through the gateway's gRPC API: (token ids, responses)."""
        params = common_pb2.SamplingParams(temperature=0.0, max_tokens=max_tokens, **sampling)
        request = gateway_pb2.GenerateRequest(prompt_token_ids=prompt_ids, sampling=params)
        metadata = (("authorization", f"Bearer {self.api_key}"),) if self.api_key else None
        responses = list(self.gateway_stub().Generate(request, timeout=timeout, metadata=metadata))
        return [t for r in responses for t in r.token_ids], responses

    def worker_stats(self, proc: ServiceProcess, role: str) -> decode_pb2.WorkerStats:
        stub_cls = decode_pb2_grpc.DecodeStub if role == "decode" else prefill_pb2_grpc.PrefillStub
        return stub_cls(self.channel(proc.address)).Stats(decode_pb2.WorkerStatsRequest(), timeout=5)

    def all_blocks_free(self) -> bool:
        """True when every worker's pool is entirely free and no handoff or transfer is alive."""
        for procs, role in ((self.decodes, "decode"), (self.prefills, "prefill")):
            for proc in procs:
                for side in ("decode", "prefill") if self.flexible else (role,):  # a flexible worker has both
                    s = self.worker_stats(proc, side)
                    if s.num_free_blocks != s.num_total_blocks or s.num_handoffs or s.num_transfers:
                        return False
        return True

    def wait_blocks_free(self, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.all_blocks_free():
                return True
            time.sleep(0.05)
        return self.all_blocks_free()

    def workers(self, role: int, scheduler: ServiceProcess | None = None) -> list[scheduler_pb2.WorkerInfo]:
        stub = scheduler_pb2_grpc.SchedulerStub(self.channel((scheduler or self.scheduler).address))
        return list(stub.ListWorkers(scheduler_pb2.ListWorkersRequest(role=role), timeout=5).workers)

    def close(self) -> None:
        for channel in self.channels.values():
            channel.close()
        self.procs.kill_all()


def start_mesh(model: str, *, prefill: int = 1, decode: int = 1, transport: str = "auto", chaos: str = "",
               lease_s: float = 3.0, worker_args: tuple[str, ...] = (), env: dict | None = None,
               cache_args: tuple[str, ...] = (), decode_prefix_caching: bool = True, colocated: bool = False,
               gateway_args: tuple[str, ...] = (), schedulers: int = 1, tls_dir: str = "",
               policy: str | None = None, api_key: str = "", flexible: bool = False,
               prefill_args: tuple[str, ...] = (), decode_args: tuple[str, ...] = (),
               scheduler_args: tuple[str, ...] = ()) -> Mesh:
    """Start scheduler, cache, workers and gateway; return once every one is SERVING and registered.

    colocated=True starts `decode` colocated workers (each prefills its own prompts) and no prefill worker;
    schedulers=N starts N schedulers, and every other service is given all their addresses.
    flexible=True starts every worker as `kvmesh worker --role auto`, `prefill` of them registered as prefill
    workers at first and `decode` as decode workers (Mesh.prefills and .decodes list them by that first role).

    decode_prefix_caching=False turns the decode workers' own prefix cache off: tests of the cache service repeat
    prompts, which the decode worker would otherwise serve from its own pool.

    tls_dir (a `kvmesh certs init` folder, see `make_certs`) turns mTLS on between every service; api_key makes the
    gateway require that key (`Mesh.generate` presents it).
    prefill_args / decode_args: flags for one role only, after worker_args (e.g. a different --block-size).
    scheduler_args: flags of every scheduler (e.g. the planner's).
    policy: the scheduler's routing policy (its default when None). Tests of the cache service's fetch path use
    kv_aware, which always fetches a cached prefix: slo_aware recomputes one a tiny model computes faster.
    """
    if tls_dir:
        env = {**(env or {}), "KVMESH_TLS_DIR": tls_dir}
    if not decode_prefix_caching:
        env = {**(env or {}), "KVMESH_DECODE_PREFIX_CACHING": "0"}
    procs = Procs()
    try:
        scheduler, *others = [procs.start("scheduler", "--lease-s", str(lease_s),
                                          *(["--policy", policy] if policy else []), *scheduler_args, env=env)
                              for _ in range(schedulers)]
        common = ["--scheduler", ",".join(s.address for s in [scheduler, *others])]
        cache = procs.start("cache", *common, *cache_args, env=env)
        worker = [*common, "--model", model, "--transport", transport, "--kv-cache-bytes", str(64 * 2**20),
                  "--handoff-lease-s", "5", *worker_args]
        if chaos:
            worker += ["--transport-chaos", chaos]
        if colocated:
            prefill = 0
        if flexible:
            auto = ("--role", "auto", "--initial-role")
            prefills = [procs.launch("worker", *worker, *auto, "prefill", *prefill_args, env=env)
                        for _ in range(prefill)]
            decodes = [procs.launch("worker", *worker, *auto, "decode", *decode_args, env=env)
                       for _ in range(decode)]
        else:
            prefills = [procs.launch("prefill", *worker, *prefill_args, env=env) for _ in range(prefill)]
            decodes = [procs.launch("decode", *worker, *decode_args, *(["--colocated"] if colocated else []), env=env)
                       for _ in range(decode)]
        for proc in prefills + decodes:
            proc.wait_serving(START_TIMEOUT_S)
        http_port = free_port()
        gateway_env = {**(env or {}), "KVMESH_API_KEY": api_key} if api_key else env
        gateway = procs.start("gateway", *common, "--model", model, "--http-port", str(http_port), *gateway_args,
                              env=gateway_env, timeout_s=START_TIMEOUT_S)
        mesh = Mesh(procs, scheduler, cache, prefills, decodes, gateway, http_port, more_schedulers=others,
                    tls_dir=tls_dir, api_key=api_key, flexible=flexible)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # registration is asynchronous to SERVING
            if all(len(mesh.workers(scheduler_pb2.WORKER_ROLE_PREFILL, s)) == prefill
                   and len(mesh.workers(scheduler_pb2.WORKER_ROLE_DECODE, s)) == decode for s in [scheduler, *others]):
                return mesh
            time.sleep(0.05)
        raise RuntimeError("workers did not register with the scheduler within 10 s")
    except BaseException:
        procs.kill_all()
        raise


def make_certs(folder) -> str:
    """A CA and every role's certificate in folder (for start_mesh's tls_dir)."""
    return str(certs.init_dir(folder, force=True))


def wait_for_trace(path, request_id: str, complete, timeout_s: float = 10.0):
    """The trace (from the JSON-lines span file at path) whose root carries request_id, once `complete(trace)` holds
    and every span but the root has its parent in it: a service exports a span when it ends, so a client span may
    reach the file after the spans under it."""
    from kvmesh.services.common import conventions as names
    from kvmesh.services.trace.spans import group_traces, read_jsonl

    deadline = time.monotonic() + timeout_s
    while True:
        spans = read_jsonl(path) if path.exists() else []
        roots = [s for s in spans if s.name == names.REQUEST_SPAN
                 and s.attributes.get(names.ATTR_REQUEST_ID) == request_id]
        if roots:
            trace = group_traces(s for s in spans if s.trace_id == roots[0].trace_id)[roots[0].trace_id]
            ids = {s.span_id for s in trace.spans}
            if complete(trace) and all(s.parent_id in ids for s in trace.spans if s.name != names.REQUEST_SPAN):
                return trace
        if time.monotonic() > deadline:
            seen = sorted({(s.service, s.name) for s in spans if roots and s.trace_id == roots[0].trace_id})
            raise AssertionError(f"no complete trace for {request_id} within {timeout_s}s; saw {seen}")
        time.sleep(0.1)
