"""Configs come from flags, then KVMESH_* variables, then defaults, and are validated."""

import argparse
import json
from dataclasses import FrozenInstanceError, dataclass

import pytest

from kvmesh.services.common.config import (ConfigError, ServerConfig, add_arguments, check, describe, from_args,
                                          knob)


@dataclass(frozen=True)
class DemoConfig(ServerConfig):
    """A config like a service's."""

    lease_s: float = knob(10.0, "Seconds of a lease.")
    verbose: bool = knob(False, "Say more.")
    policy: str = knob("a", "Which policy.", choices=("a", "b"))

    def validate(self) -> None:
        super().validate()
        check(self.lease_s > 0, f"lease_s must be > 0, got {self.lease_s}")


def parse(*argv):
    parser = argparse.ArgumentParser()
    add_arguments(parser, DemoConfig)
    return parser.parse_args(list(argv))


def test_defaults_apply_when_nothing_is_given():
    config = from_args(DemoConfig, "demo", parse(), env={})
    assert (config.host, config.port, config.lease_s, config.verbose) == ("127.0.0.1", 0, 10.0, False)


def test_flag_beats_service_env_beats_generic_env():
    env = {"KVMESH_LEASE_S": "3", "KVMESH_DEMO_LEASE_S": "4", "KVMESH_VERBOSE": "yes"}
    assert from_args(DemoConfig, "demo", parse(), env=env).lease_s == 4.0
    assert from_args(DemoConfig, "demo", parse("--lease-s", "5"), env=env).lease_s == 5.0
    assert from_args(DemoConfig, "other", parse(), env=env).lease_s == 3.0
    assert from_args(DemoConfig, "demo", parse(), env=env).verbose is True
    assert from_args(DemoConfig, "demo", parse("--no-verbose"), env=env).verbose is False


def test_bad_values_raise_config_error_naming_the_source():
    with pytest.raises(ConfigError, match="KVMESH_PORT"):
        from_args(DemoConfig, "demo", parse(), env={"KVMESH_PORT": "eighty"})
    with pytest.raises(ConfigError, match="lease_s must be > 0"):
        from_args(DemoConfig, "demo", parse("--lease-s", "0"), env={})
    with pytest.raises(ConfigError, match="port must be in"):
        from_args(DemoConfig, "demo", {"port": 70000}, env={})
    with pytest.raises(ConfigError, match="not one of"):
        from_args(DemoConfig, "demo", parse(), env={"KVMESH_POLICY": "c"})


def test_config_is_frozen_and_described_as_one_json_line():
    config = from_args(DemoConfig, "demo", parse("--port", "1234"), env={})
    with pytest.raises(FrozenInstanceError):
        config.port = 1  # type: ignore[misc]
    line = describe(config)
    assert "\n" not in line
    assert json.loads(line) == {"config": "DemoConfig", "host": "127.0.0.1", "port": 1234, "grace_s": 5.0,
                                "max_message_bytes": 64 * 1024 * 1024, "instance_id": "", "metrics_port": -1, "insecure": False, "tls_dir": "",
                                "tls_server_name": "", "tls_reload_s": 5.0, "lease_s": 10.0,
                                "verbose": False, "policy": "a"}


def test_every_field_has_help_text_in_the_flags():
    parser = argparse.ArgumentParser()
    add_arguments(parser, DemoConfig, "demo")
    text = " ".join(parser.format_help().split())
    assert "Seconds of a lease." in text
    assert "KVMESH_DEMO_LEASE_S or KVMESH_LEASE_S" in text


def test_unsupported_field_types_are_refused():
    @dataclass(frozen=True)
    class Odd(ServerConfig):
        ratios: tuple = knob((), "Not a scalar.")

    with pytest.raises(TypeError, match="ratios"):
        add_arguments(argparse.ArgumentParser(), Odd)


def test_an_internal_service_on_a_public_address_refuses_unless_tls_or_insecure():
    with pytest.raises(ConfigError, match="refusing to bind 0.0.0.0 without TLS: pass --tls-dir DIR.*--insecure"):
        from_args(DemoConfig, "demo", parse("--host", "0.0.0.0"), env={})
    with pytest.raises(ConfigError, match="refusing to bind node-3"):
        from_args(DemoConfig, "demo", parse("--host", "node-3"), env={})
    assert from_args(DemoConfig, "demo", parse("--host", "0.0.0.0"), env={"KVMESH_INSECURE": "1"}).insecure
    assert from_args(DemoConfig, "demo", parse("--host", "0.0.0.0"), env={"KVMESH_TLS_DIR": "/certs"}).serves_mtls
    assert from_args(DemoConfig, "demo", parse("--host", "127.0.0.2"), env={}).host == "127.0.0.2"


def test_help_shows_a_literal_percent_in_a_knobs_help():
    from kvmesh.services.scheduler.config import SchedulerConfig

    parser = argparse.ArgumentParser()
    add_arguments(parser, SchedulerConfig, "scheduler")  # --planner-threshold's help says "(0.1: 10 %)"
    assert "(0.1: 10 %)" in parser.format_help()
