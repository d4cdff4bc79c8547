"""One frozen dataclass config per service, built from flags, `KVMESH_*` environment variables and defaults.

A service declares its config as a frozen dataclass whose fields are made with `knob(default, "help")` (the help
text is the field's docstring: it shows in `--help` and in the README's table) and whose `validate()` raises
`ConfigError`. Precedence for each field: the flag `--lease-s`, then `KVMESH_<SERVICE>_LEASE_S`, then
`KVMESH_LEASE_S`, then the default.

    @dataclass(frozen=True)
    class SchedulerConfig(ServerConfig):
        lease_s: float = knob(10.0, "Seconds a worker stays registered without a heartbeat.")

    add_arguments(parser, SchedulerConfig)                 # in the CLI
    config = from_args(SchedulerConfig, "scheduler", args)  # flags > env > defaults, validated
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import ipaddress
import typing
from collections.abc import Mapping
from typing import Any, TypeVar, TextIO

from kvmesh.transports import registered_backends

C = TypeVar("C")

ENV_PREFIX = "KVMESH_"
# The choices of a `transport` knob (workers and the cache offer the same ones): "auto" negotiates, or any
# registered backend (best first).
TRANSPORTS = ("auto", *registered_backends())


class ConfigError(ValueError):
    """A configuration value is missing, malformed or out of range."""


KEYS = tuple[str, ...]  # a repeatable flag (`--api-key A --api-key B`); its variable is comma-separated


def knob(default: Any, help: str, *, choices: tuple | None = None, secret: bool = False) -> Any:  # noqa: A002
    """A config field with its default and its help text (the field's docstring); a secret one is never printed."""
    return dataclasses.field(default=default, metadata={"help": help, "choices": choices, "secret": secret})


def is_loopback(host: str) -> bool:
    """True when host (a name or an address) is only reachable from this machine."""
    name = host.strip("[]")
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False  # any other name may resolve beyond this machine


@dataclasses.dataclass(frozen=True)
class ServerConfig:
    """Settings every gRPC service shares; each service's config subclasses it."""

    host: str = knob("127.0.0.1", "Address to bind; 0.0.0.0 exposes the service beyond this machine.")
    port: int = knob(0, "Port to bind; 0 picks a free one (printed at start).")
    grace_s: float = knob(5.0, "Seconds in-flight RPCs may take to finish after SIGTERM.")
    max_message_bytes: int = knob(64 * 1024 * 1024, "Largest gRPC message sent or received, in bytes.")
    instance_id: str = knob("", "Identity of this process for logs and traces; empty makes a fresh one.")
    metrics_port: int = knob(-1, "Port of the Prometheus /metrics endpoint; -1 turns it off, 0 picks a free one.")
    insecure: bool = knob(False, "Allow binding a non-loopback host without authentication (no --tls-dir for an "
                                 "internal service): only on a network you trust.")
    tls_dir: str = knob("", "Folder made by `kvmesh certs init`: serve mTLS (client certificates from its CA, roles "
                            "checked per RPC) and present this service's certificate on every internal channel.")
    tls_server_name: str = knob("", "With tls_dir: check every peer's certificate against this name (give it to "
                                    "`kvmesh certs init --host`) instead of the host dialled, for peers known by "
                                    "addresses no certificate lists (pod IPs).")
    tls_reload_s: float = knob(5.0, "With tls_dir: seconds between checks of the certificate files; a changed, valid "
                                    "certificate (`kvmesh certs renew`) is presented from then on, without a restart.")

    def validate(self) -> None:
        """Raise ConfigError when a value is out of range. Subclasses extend it (and call super)."""
        check(self.tls_reload_s > 0, "--tls-reload-s must be > 0")
        check(0 <= self.port <= 65535, f"port must be in [0, 65535], got {self.port}")
        check(bool(self.host), "host must not be empty")
        check(self.grace_s >= 0, f"grace_s must be >= 0, got {self.grace_s}")
        check(self.max_message_bytes >= 4 * 1024 * 1024,
              f"max_message_bytes must be >= 4 MiB, got {self.max_message_bytes}")
        self.check_exposure()

    def check_exposure(self) -> None:
        """Closed by default: refuse a non-loopback bind nothing authenticates, unless `insecure` says so."""
        check(is_loopback(self.host) or self.serves_mtls or self.insecure,
              f"refusing to bind {self.host} without TLS: pass --tls-dir DIR (certificates from `kvmesh certs init "
              "DIR`), bind 127.0.0.1, or pass --insecure (KVMESH_INSECURE=1) on a network you trust")

    @property
    def serves_mtls(self) -> bool:
        """Whether the server's own port requires client certificates (internal services with a tls_dir)."""
        return bool(self.tls_dir)

    @property
    def address(self) -> str:
        """host:port as configured (port may be 0 before binding)."""
        return f"{self.host}:{self.port}"


def check(condition: bool, message: str) -> None:
    """Raise ConfigError(message) unless condition holds."""
    if not condition:
        raise ConfigError(message)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _types(cls: type) -> dict[str, type]:
    return typing.get_type_hints(cls)


def _parse(text: str, kind: type, name: str) -> Any:
    """Convert a flag's or variable's text to the field's type."""
    try:
        if kind == KEYS:
            return tuple(item.strip() for item in text.split(",") if item.strip())
        if kind is bool:
            lowered = text.strip().lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off", ""):
                return False
            raise ValueError(text)
        return kind(text)
    except ValueError:
        raise ConfigError(f"{name}: cannot read {text!r} as {kind.__name__}") from None


def _env_names(service: str, name: str) -> tuple[str, ...]:
    generic = f"{ENV_PREFIX}{name.upper()}"
    return (f"{ENV_PREFIX}{service.upper()}_{name.upper()}", generic) if service else (generic,)


def add_arguments(parser: argparse.ArgumentParser, cls: type, service: str = "") -> None:
    """Add one `--field-name` flag per config field; unset flags stay None so env and defaults apply."""
    kinds = _types(cls)
    for f in dataclasses.fields(cls):
        kind = kinds[f.name]
        if kind not in (int, float, str, bool, KEYS):
            raise TypeError(f"{cls.__name__}.{f.name}: config fields are int, float, str, bool or "
                            f"tuple[str, ...], not {kind}")
        envs = " or ".join(_env_names(service, f.name))
        # argparse formats help with %: a literal one ("10 %") must be doubled or --help fails
        help_text = f"{f.metadata.get('help', '')} (env {envs}; default {f.default!r})".replace("%", "%%")
        choices = f.metadata.get("choices")
        if kind is bool:
            parser.add_argument(_flag(f.name), dest=f.name, default=None, action=argparse.BooleanOptionalAction,
                                help=help_text)
        elif kind == KEYS:
            parser.add_argument(_flag(f.name), dest=f.name, default=None, action="append", help=help_text)
        else:
            parser.add_argument(_flag(f.name), dest=f.name, default=None, type=str, choices=choices,
                                help=help_text)


def from_args(cls: type[C], service: str, args: argparse.Namespace | Mapping[str, Any] | None = None,
              env: Mapping[str, str] | None = None) -> C:
    """Build and validate a config: flag > KVMESH_<SERVICE>_<FIELD> > KVMESH_<FIELD> > default."""
    env = os.environ if env is None else env
    given = vars(args) if isinstance(args, argparse.Namespace) else dict(args or {})
    kinds = _types(cls)
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        kind = kinds[f.name]
        names = _env_names(service, f.name)
        raw = given.get(f.name)
        source = _flag(f.name)
        if raw is None:
            source, raw = next(((n, env[n]) for n in names if n in env), (None, None))
        if raw is None:
            continue
        if kind == KEYS:
            values[f.name] = tuple(raw) if isinstance(raw, (list, tuple)) else _parse(str(raw), kind, source)
        else:
            values[f.name] = raw if isinstance(raw, kind) else _parse(str(raw), kind, source)
        choices = f.metadata.get("choices")
        if choices and values[f.name] not in choices:
            raise ConfigError(f"{source}: {values[f.name]!r} is not one of {list(choices)}")
    config = cls(**values)
    config.validate()
    return config


def describe(config: Any) -> str:
    """The config as one JSON line: {"config": "<Class>", "field": value, ...}; secrets show only how many."""
    values = dataclasses.asdict(config)
    for f in dataclasses.fields(config):
        if f.metadata.get("secret") and values[f.name]:
            values[f.name] = f"<{len(values[f.name])} hidden>" if isinstance(values[f.name], tuple) else "<hidden>"
    return json.dumps({"config": type(config).__name__, **values}, sort_keys=False)


def print_config(config: Any, file: TextIO | None = None) -> None:
    """Print the config as one JSON line (done by the server skeleton at start)."""
    print(describe(config), file=file or sys.stdout, flush=True)
