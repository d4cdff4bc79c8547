"""`kvmesh gateway`: the client-facing edge — the Gateway gRPC service and the OpenAI-compatible HTTP API,
served from one process and one event loop."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import socket

import grpc

from kvmesh.services.clients.scheduler import FailureReporter
from kvmesh.services.common import config as config_mod
from kvmesh.services.common.api_keys import KeyFileError, KeyRing
from kvmesh.services.common.rate_limit import TenantLimits
from kvmesh.services.common.server import BindError, MeshServer, Service, serve
from kvmesh.services.gateway.config import GatewayConfig
from kvmesh.services.gateway.core import Gateway, ModelCard
from kvmesh.services.gateway.openai_api import OpenAIFrontend, build_app
from kvmesh.services.gateway.servicer import GatewayServicer
from kvmesh.services.gateway.structured import GrammarCheck
from kvmesh.services.gateway.tokens import AsyncTokenizer
from kvmesh.v1 import gateway_pb2, gateway_pb2_grpc, scheduler_pb2

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The gateway's flags: one per GatewayConfig field."""
    config_mod.add_arguments(parser, GatewayConfig, "gateway")


def bind_http(host: str, port: int) -> socket.socket:
    """The HTTP listening socket, bound here so a taken port is one clear error, not uvicorn's exit."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise BindError(f"cannot bind HTTP {host}:{port}: {exc.strerror.lower()}") from None
    sock.listen(1024)
    sock.setblocking(False)
    return sock


def _health(gateway: Gateway):
    async def check() -> tuple[bool, str]:
        try:
            reply = await gateway.schedulers.call("ListWorkers", scheduler_pb2.ListWorkersRequest(), timeout=2.0)
        except grpc.aio.AioRpcError as e:
            where = ", ".join(gateway.schedulers.addresses)
            return False, f"no scheduler answered ({where}): {e.code().name}"
        roles = {w.role for w in reply.workers}
        missing = [n for r, n in ((scheduler_pb2.WORKER_ROLE_DECODE, "decode"),
                                  (scheduler_pb2.WORKER_ROLE_PREFILL, "prefill")) if r not in roles]
        return (not missing), ("no live " + " or ".join(missing) + " worker" if missing else "ready")
    return check


def _metrics_renderer():
    try:
        from kvmesh.services.common.metrics import render_latest
    except ImportError:
        return None
    return render_latest


def setup(config: GatewayConfig, server: MeshServer, keys: KeyRing | None = None) -> None:
    """Host the Gateway service and the HTTP API on server's loop; on stop, drain both (`drain_on_stop`); with
    keys, both APIs require one."""
    from transformers import AutoTokenizer

    limits = TenantLimits(config.rate_limit_rpm, config.rate_limit_burst) if config.rate_limit_rpm else None
    if keys is not None:
        server.authenticate(keys, limits)
    tokenizer = AsyncTokenizer(AutoTokenizer.from_pretrained(config.model))
    server.on_stopped(tokenizer.close)
    card = ModelCard.from_path(config.model, config.served_model_name or None)
    reporter = FailureReporter(server.channels, config.scheduler, reporter=config.instance_id or "gateway")
    server.on_stopped(reporter.close)
    grammar_check = GrammarCheck(config.model, card.vocab_size, config.structured_compile_timeout_s)
    server.on_stopped(grammar_check.close)
    gateway = Gateway(card, config.scheduler, server.channels, config.route_timeout_s, config.request_timeout_s,
                      reporter, config.retry_limit, config.migration_limit, config.stall_check_s, grammar_check)
    server.add_service(Service.of(gateway_pb2, gateway_pb2_grpc, GatewayServicer(gateway, tokenizer)))
    server.add_task(drain_on_stop(gateway, config.grace_s))
    if config.http_port < 0:
        return
    sock = bind_http(config.http_host, config.http_port)
    app = build_app(OpenAIFrontend(gateway, tokenizer, _metrics_renderer()), _health(gateway), config.max_body_bytes,
                    keys, config.metrics_auth, limits)
    server.add_task(serve_http(app, sock, config))


def drain_on_stop(gateway: Gateway, grace_s: float):
    """A background task that, when the server stops (it is cancelled), drains the gateway: new requests are
    refused, those in flight get grace_s to finish, and any left then end with an explicit UNAVAILABLE."""
    async def wait_then_drain(_server: MeshServer) -> None:
        try:
            await asyncio.get_running_loop().create_future()  # until the server stops
        except asyncio.CancelledError:
            ended = await gateway.drain.drain(grace_s)
            if ended:
                log.warning("ended %d request(s) still running after the %g s grace period", ended, grace_s)
            raise
    return wait_then_drain


def http_server(app, config: GatewayConfig):
    """uvicorn's server, minus its own signal handling: the mesh server's SIGTERM handler drains both APIs."""
    import uvicorn

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self):  # uvicorn's would take SIGTERM from the mesh server's handler
            yield

    # uvicorn's own wait is a backstop: the drain ends every stream within the grace period
    return Server(uvicorn.Config(app, log_level="warning", lifespan="off",
                                 timeout_graceful_shutdown=config.grace_s + 3))


def serve_http(app, sock: socket.socket, config: GatewayConfig):
    """A background task serving the HTTP API; when cancelled (the server stops) it stops accepting and waits,
    while the drain runs, for the open responses to end instead of cutting them."""
    http = http_server(app, config)

    async def serve(_server: MeshServer) -> None:
        print(f"kvmesh gateway HTTP on http://{config.http_host}:{sock.getsockname()[1]}", flush=True)
        serving = asyncio.ensure_future(http.serve(sockets=[sock]))
        try:
            await asyncio.shield(serving)
        except asyncio.CancelledError:
            http.should_exit = True
            await serving
            raise
    return serve


def run(args: argparse.Namespace) -> int:
    """Entry point of `kvmesh gateway`."""
    config = config_mod.from_args(GatewayConfig, "gateway", args)
    try:
        keys = KeyRing(config.api_key, config.api_key_file) if config.authenticates else None
    except KeyFileError as exc:
        raise config_mod.ConfigError(str(exc)) from None
    return serve(config, lambda server: setup(config, server, keys), name="gateway")
