"""API keys: the key file's format, the constant-time check, reload, and the tenant salt they lead to."""

import argparse

import pytest

from kvmesh.services.common import api_keys
from kvmesh.services.common.api_keys import KeyFileError, KeyRing, KeySet, parse_key_file
from kvmesh.services.common.config import ConfigError, add_arguments, describe, from_args
from kvmesh.services.gateway.config import GatewayConfig
from kvmesh.services.kv_identity import tenant_salt

KEY_FILE = """
# keys of the demo
alice-key   team-a
bob-key     team-b   # bob's
   ci-key
"""


def test_key_file_gives_each_key_its_tenant_and_skips_comments_and_blanks():
    assert parse_key_file(KEY_FILE) == {"alice-key": "team-a", "bob-key": "team-b", "ci-key": ""}


def test_key_file_errors_name_the_line():
    with pytest.raises(KeyFileError, match=r"keys:2: expected 'KEY \[TENANT\]'"):
        parse_key_file("ok-key\nk tenant extra\n", "keys")
    with pytest.raises(KeyFileError, match="keys:2: the same key is given to two tenants"):
        parse_key_file("k a\nk b\n", "keys")


def test_a_check_compares_every_key_without_stopping_at_the_match(monkeypatch):
    keys = KeySet.of({f"key-{i}": f"t{i}" for i in range(5)})
    compared = []
    real = api_keys.hmac.compare_digest
    monkeypatch.setattr(api_keys.hmac, "compare_digest", lambda a, b: compared.append(len(b)) or real(a, b))
    assert keys.tenant_of("key-0") == "t0"
    assert compared == [32] * 5  # every key, each as a digest of equal length
    compared.clear()
    assert keys.tenant_of("key-0-but-longer") is None and len(compared) == 5


def test_authorization_needs_the_bearer_scheme_and_a_known_key():
    ring = KeyRing(("secret",))
    assert ring.tenant_of("Bearer secret") == "" and ring.tenant_of("bearer  secret ") == ""
    for value in (None, "", "secret", "Basic secret", "Bearer ", "Bearer secre", "Bearer secret2"):
        assert ring.tenant_of(value) is None, value


def test_reload_takes_new_keys_and_drops_removed_ones_but_keeps_them_on_a_bad_file(tmp_path):
    path = tmp_path / "keys"
    path.write_text("old-key team-a\n")
    ring = KeyRing(("flag-key",), str(path))
    path.write_text("new-key team-a\n")
    assert ring.reload()
    assert ring.tenant_of("Bearer new-key") == "team-a" and ring.tenant_of("Bearer old-key") is None
    assert ring.tenant_of("Bearer flag-key") == ""  # keys from flags stay
    path.write_text("k a\nk b\n")
    assert not ring.reload() and ring.tenant_of("Bearer new-key") == "team-a"


def test_an_empty_or_missing_key_file_is_refused_at_start(tmp_path):
    (tmp_path / "empty").write_text("# nothing yet\n")
    with pytest.raises(KeyFileError, match="holds no key"):
        KeyRing((), str(tmp_path / "empty"))
    with pytest.raises(KeyFileError, match="cannot read"):
        KeyRing((), str(tmp_path / "absent"))


def test_tenant_salt_puts_the_client_salt_inside_the_tenant():
    assert tenant_salt(None, "s") == "s"  # a gateway without keys knows no tenants
    assert tenant_salt("a", "") != tenant_salt("b", "")
    # no client salt reaches another tenant's namespace, nor the namespace of keys without a tenant
    assert tenant_salt("", tenant_salt("a", "")[len(tenant_salt("", "")):]) != tenant_salt("a", "")
    assert tenant_salt("ab", "") != tenant_salt("a", "b") != tenant_salt("a:", "")
    assert tenant_salt("a", "x") == tenant_salt("a", "x")


def _gateway(*argv, env=None):
    parser = argparse.ArgumentParser()
    add_arguments(parser, GatewayConfig, "gateway")
    return from_args(GatewayConfig, "gateway", parser.parse_args(["--model", "/m", *argv]), env=env or {})


def test_api_keys_come_from_repeated_flags_or_a_comma_separated_variable_and_are_never_printed():
    config = _gateway("--api-key", "k1", "--api-key", "k2")
    assert config.api_key == ("k1", "k2") and config.authenticates
    assert _gateway(env={"KVMESH_API_KEY": "k3, k4"}).api_key == ("k3", "k4")
    with pytest.raises(ConfigError, match="non-empty"):
        _gateway("--api-key", "")
    line = describe(config)
    assert "k1" not in line and "k2" not in line and '"api_key": "<2 hidden>"' in line


def test_a_gateway_on_a_public_address_needs_keys_or_insecure():
    with pytest.raises(ConfigError, match="refusing to bind 0.0.0.0 without API keys: give --api-key or "
                                          "--api-key-file"):
        _gateway("--host", "0.0.0.0")
    with pytest.raises(ConfigError, match="without API keys"):
        _gateway("--http-host", "::")
    assert _gateway("--host", "0.0.0.0", "--api-key", "k").host == "0.0.0.0"
    assert _gateway("--host", "0.0.0.0", "--insecure").insecure
    with pytest.raises(ConfigError, match="without API keys"):  # its certificates guard its channels, not its ports
        _gateway("--host", "0.0.0.0", "--tls-dir", "/certs")
    assert _gateway("--host", "localhost", "--http-host", "::1").host == "localhost"


def test_an_emptied_key_file_keeps_the_current_keys_even_beside_flag_keys(tmp_path):
    path = tmp_path / "keys"
    path.write_text("file-key\n")
    ring = KeyRing(("flag-key",), str(path))
    path.write_text("")
    assert not ring.reload() and ring.tenant_of("Bearer file-key") == ""
