"""The one grpc.aio server skeleton every kvmesh service runs on.

`serve()` owns a service's whole life: prints the config, starts a `MeshServer` on uvloop, lets `setup` add its
servicers, tasks and readiness checks, marks grpc.health.v1 SERVING once every check passed; on SIGTERM/SIGINT marks
it NOT_SERVING, cancels the tasks, runs the stop hooks (e.g. deregister), drains in-flight RPCs for `config.grace_s`
and returns 0. A port in use or a failed readiness check is one line on stderr and exit code 2.

    def setup(server: MeshServer) -> None:
        server.add_service(Service.of(scheduler_pb2, scheduler_pb2_grpc, SchedulerServicer(...)))
        server.add_task(expire_leases_forever)

    sys.exit(serve(config, setup, name="scheduler", role="scheduler"))
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import signal
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from types import ModuleType

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from kvmesh.services.common import (access, auth, config as config_mod, errors, healthcheck, ids, metrics, rpc_tracing,
                                    sdnotify, telemetry, tls, tls_reload)
from kvmesh.services.common.bind import BindError, check_bindable
from kvmesh.services.common.api_keys import KeyRing
from kvmesh.services.common.malformed import MalformedRequestInterceptor
from kvmesh.services.common.rate_limit import TenantLimits
from kvmesh.services.common.channels import ChannelCache

log = logging.getLogger(__name__)

BackgroundTask = Callable[["MeshServer"], Awaitable[None]]
StopHook = Callable[[], Awaitable[None]]
HOOK_TIMEOUT_S = 3.0


class NotReadyError(RuntimeError):
    """A readiness check failed: the service must not say SERVING (e.g. a transport that cannot move KV)."""


@dataclass(frozen=True)
class Service:
    """A servicer and what the server needs to host it: its full name and its generated `add_*_to_server`."""

    name: str
    servicer: object
    add_to_server: Callable[[object, grpc.aio.Server], None]

    @classmethod
    def of(cls, pb2: ModuleType, pb2_grpc: ModuleType, servicer: object, service: str | None = None) -> Service:
        """Describe a servicer from its generated modules; `service` defaults to the file's only service."""
        services = pb2.DESCRIPTOR.services_by_name
        descriptor = services[service] if service else next(iter(services.values()))
        add = getattr(pb2_grpc, f"add_{descriptor.name}Servicer_to_server")
        return cls(descriptor.full_name, servicer, add)


class MeshServer:
    """A grpc.aio server with health, reflection, interceptors, background tasks and a graceful stop."""

    def __init__(self, config: config_mod.ServerConfig, name: str, role: str = "") -> None:
        self.config = config
        self.name = name
        self.role = role or name
        self.instance_id = config.instance_id or ids.instance_id()
        # One identity per process: every channel it opens from now on presents this role's certificate.
        self.tls = tls.load(config.tls_dir, self.role, config.tls_server_name) if config.tls_dir else None
        tls.use(self.tls)
        self.health = health.aio.HealthServicer()
        self.channels = ChannelCache(config.max_message_bytes)
        self.port = 0
        self._services: list[Service] = []
        self._task_factories: list[BackgroundTask] = []
        self._readiness: list[BackgroundTask] = []  # awaited after binding, before SERVING and the tasks
        self._tasks: list[asyncio.Task] = []
        self._stop_hooks: list[StopHook] = []
        self._stopped_hooks: list[StopHook] = []
        self.keys: KeyRing | None = None
        self.limits: TenantLimits | None = None
        self._server: grpc.aio.Server | None = None
        self._stopping = False
        self._stopped = asyncio.Event()
        self.cert_watch = tls_reload.watch(self)  # renewed certificates presented without a restart

    @property
    def address(self) -> str:
        """host:port actually bound (valid after start)."""
        return f"{self.config.host}:{self.port}"

    def add_service(self, service: Service) -> None:
        """Host a servicer (before start)."""
        self._services.append(service)

    def add_readiness(self, check: BackgroundTask) -> None:
        """Await check(server) once bound, before any service says SERVING; NotReadyError stops the start."""
        self._readiness.append(check)

    def add_task(self, task: BackgroundTask) -> None:
        """Run `task(server)` in the background from start until stop, when it is cancelled."""
        self._task_factories.append(task)
        if self._server is not None:
            self._start_task(task)

    def _start_task(self, factory: BackgroundTask) -> None:
        task = asyncio.create_task(factory(self), name=getattr(factory, "__name__", "task"))
        task.add_done_callback(_log_failure)
        self._tasks.append(task)

    def authenticate(self, keys: KeyRing, limits: TenantLimits | None = None) -> None:
        """Require an API key from `keys` on every RPC but the health check, each tenant within `limits` (before
        start); SIGHUP reloads the keys."""
        self.keys, self.limits = keys, limits

    def on_stop(self, hook: StopHook) -> None:
        """Await `hook()` at stop, after the tasks are cancelled and before in-flight RPCs drain."""
        self._stop_hooks.append(hook)

    def on_stopped(self, hook: StopHook) -> None:
        """Await `hook()` once in-flight RPCs have drained (or the grace period ended): release what they used."""
        self._stopped_hooks.append(hook)

    def _options(self) -> list[tuple[str, int]]:
        size = self.config.max_message_bytes
        # SO_REUSEPORT off: a second server on a taken port must fail, not share the port silently.
        return [("grpc.max_send_message_length", size), ("grpc.max_receive_message_length", size),
                ("grpc.so_reuseport", 0), ("grpc.keepalive_permit_without_calls", 1),
                ("grpc.http2.min_ping_interval_without_data_ms", 1000),
                ("grpc.http2.max_ping_strikes", 0),
                # grpc core CANCELs calls past 1,000 not yet picked up: a burst must meet admission control
                # (RESOURCE_EXHAUSTED with a retry hint), not a status that reads like the client gave up
                ("grpc.server.max_pending_requests", 1 << 16), ("grpc.server.max_pending_requests_hard_limit", 1 << 16)]

    async def start(self) -> int:
        """Bind, start serving, mark every service SERVING and start the background tasks; return the port."""
        check_bindable(self.config.host, self.config.port)
        # innermost last: request bytes that do not parse become INVALID_ARGUMENT inside the error mapping
        interceptors = [*rpc_tracing.server_interceptors(), errors.ErrorMappingInterceptor(),
                        MalformedRequestInterceptor()]
        if self.keys is not None:  # first: a caller without a key reaches nothing, not even a span
            interceptors.insert(0, auth.ApiKeyInterceptor(self.keys, self.limits))
        if self.config.serves_mtls:  # first: a certificate of the wrong role reaches nothing
            interceptors.insert(0, access.RoleInterceptor())
        server = grpc.aio.server(interceptors=interceptors, options=self._options())
        for service in self._services:
            service.add_to_server(service.servicer, server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        names = [s.name for s in self._services]
        reflection.enable_server_reflection([*names, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
        try:
            self.port = (server.add_secure_port(self.config.address, self.cert_watch.server_credentials())
                         if self.config.serves_mtls else server.add_insecure_port(self.config.address))
        except RuntimeError as exc:
            raise BindError(f"cannot bind {self.config.address}: {exc}") from None
        if self.port == 0:  # older grpcio reports failure this way
            raise BindError(f"cannot bind {self.config.address}: address in use or not available")
        await server.start()
        self._server = server
        for check in self._readiness:  # NotReadyError: `run` stops the server
            await check(self)
        await self.set_serving(True)
        for factory in self._task_factories:
            self._start_task(factory)
        return self.port

    async def set_serving(self, serving: bool) -> None:
        """Mark the server and every service SERVING, or NOT_SERVING (a worker that cannot serve for now)."""
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ["", *(s.name for s in self._services)]:
            await self.health.set(name, status)

    async def stop(self, grace_s: float | None = None) -> None:
        """NOT_SERVING, cancel tasks, run stop hooks, drain in-flight RPCs within grace_s, close channels."""
        if self._server is None:
            return
        if self._stopping:  # a second caller waits for the first one's stop
            await self._stopped.wait()
            return
        self._stopping = True
        grace = self.config.grace_s if grace_s is None else grace_s
        await self.health.enter_graceful_shutdown()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await _run_hooks(self._stop_hooks)
        await self._server.stop(grace)
        await _run_hooks(self._stopped_hooks)
        await self.channels.close()
        self._stopped.set()

    async def wait_stopped(self) -> None:
        """Return once stop() has finished."""
        await self._stopped.wait()
    async def __aenter__(self) -> MeshServer:
        await self.start()
        return self

    async def __aexit__(self, *exc_info) -> None:
        await self.stop(0)


async def _run_hooks(hooks: list[StopHook]) -> None:
    for hook in hooks:
        try:
            await asyncio.wait_for(hook(), HOOK_TIMEOUT_S)
        except Exception:  # noqa: BLE001 — a failing hook must not block the stop
            log.warning("stop hook %s failed", getattr(hook, "__name__", hook), exc_info=True)


def _log_failure(task: asyncio.Task) -> None:
    """A background task that ends with an error is logged at once, not when the server stops."""
    if not task.cancelled() and task.exception() is not None:
        log.error("background task %s failed", task.get_name(), exc_info=task.exception())


Setup = Callable[[MeshServer], "Awaitable[None] | None"]


async def run(server: MeshServer, setup: Setup) -> int:
    """Set up and start `server`, serve until SIGTERM or SIGINT, stop gracefully; return the exit code."""
    stop = asyncio.Event()  # handlers first: a SIGTERM that arrives while starting still stops cleanly
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        result = setup(server)
        if inspect.isawaitable(result):
            await result
        port = await server.start()
    except (BindError, NotReadyError, config_mod.ConfigError) as exc:  # one line and exit 2, no traceback
        print(f"kvmesh {server.name}: {exc}", file=sys.stderr, flush=True)
        if isinstance(exc, NotReadyError):
            await server.stop(0)
        return 2
    if server.keys is not None:
        loop.add_signal_handler(signal.SIGHUP, server.keys.reload)
    print(f"kvmesh {server.name} listening on {server.config.host}:{port}", flush=True)
    _start_metrics(server)
    await _announce_ready(server)
    await stop.wait()
    sdnotify.stopping()
    log.info("stopping (grace %.1fs)", server.config.grace_s)
    await server.stop()
    return 0


def _start_metrics(server: MeshServer) -> None:
    """Prometheus /metrics on its own port, for services without an HTTP port of their own."""
    if server.config.metrics_port >= 0:
        port = metrics.start_metrics_server(server.config.metrics_port, server.config.host)
        print(f"kvmesh {server.name} metrics on http://{server.config.host}:{port}/metrics", flush=True)


async def _announce_ready(server: MeshServer) -> None:
    """Tell systemd READY=1 once the port answers health checks, then keep its watchdog fed while healthy."""
    target = f"127.0.0.1:{server.port}" if server.config.host in ("0.0.0.0", "::", "[::]") else server.address
    mine = server.tls if server.config.serves_mtls else None  # the gateway's own port is plaintext
    if not await healthcheck.wait_serving(target, timeout=10.0, identity=mine):
        log.warning("health check of %s did not answer SERVING; not announcing readiness", target)
        return
    sdnotify.ready()

    async def watchdog(_server: MeshServer) -> None:
        await sdnotify.watchdog_loop(lambda: healthcheck.check_async(target, timeout=1.0, identity=mine))

    server.add_task(watchdog)


def serve(config: config_mod.ServerConfig, setup: Setup, *, name: str, role: str = "") -> int:
    """Run one service process to completion: print config, serve on uvloop, stop on a signal; return exit code."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config_mod.print_config(config)
    server_role = role or name
    telemetry.setup(name, server_role, config.instance_id or ids.instance_id())
    try:  # a missing certificate is one line and exit 2, as a taken port is
        tls.load(config.tls_dir, server_role) if config.tls_dir else None
    except config_mod.ConfigError as exc:
        print(f"kvmesh {name}: {exc}", file=sys.stderr, flush=True)
        return 2
    try:
        return _run_loop(lambda: run(MeshServer(config, name, server_role), setup))
    finally:
        telemetry.shutdown()


def _run_loop(main: Callable[[], Awaitable[int]]) -> int:
    try:
        import uvloop
    except ImportError:  # pragma: no cover — uvloop is a dependency on every platform we serve from
        return asyncio.run(main())
    return uvloop.run(main())
