"""Closed by default, as deployed: every deploy file's environment, read the way each service reads it, gives a
config that starts (internal services with mTLS certificates from a secret, the gateway with an API key file from
a secret), and without those settings the same environment is refused."""

from importlib import import_module
from pathlib import Path

import pytest
import yaml

from kvmesh.services.common.config import ConfigError, from_args

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
ROLES = ("gateway", "scheduler", "cache", "prefill", "decode")
CONFIGS = {"gateway": "GatewayConfig", "scheduler": "SchedulerConfig", "cache": "CacheConfig",
           "prefill": "PrefillConfig", "decode": "DecodeConfig"}


def config_of(role: str, env: dict[str, str]):
    cls = getattr(import_module(f"kvmesh.services.{role}.config"), CONFIGS[role])
    return from_args(cls, role, {}, env={k: str(v) for k, v in env.items()})


def compose_env(role: str) -> dict:
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text())["services"][role]["environment"]


def systemd_env(role: str) -> dict:
    env = {}
    unit = (DEPLOY / "systemd" / f"kvmesh-{role}@.service").read_text().splitlines()
    for line in unit:
        if line.startswith("Environment="):
            env.update(item.split("=", 1) for item in line.removeprefix("Environment=").split())
    for line in (DEPLOY / "systemd" / "env" / f"{role}-0.env").read_text().splitlines():
        if line and not line.startswith("#"):
            env.update([line.split("=", 1)])
    return env


def k8s_env(role: str) -> dict:
    docs = [d for path in (DEPLOY / "k8s").glob("*.yaml") for d in yaml.safe_load_all(path.read_text()) if d]
    env = dict(next(d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "kvmesh-env")["data"])
    deployment = next(d for d in docs if d["kind"] in ("Deployment", "StatefulSet")  # the schedulers: a StatefulSet
                      and d["metadata"]["name"] == f"kvmesh-{role}")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    env.update({e["name"]: e["value"] for e in container.get("env", []) if "value" in e})
    return env


@pytest.mark.parametrize("read_env", [compose_env, systemd_env, k8s_env])
@pytest.mark.parametrize("role", ROLES)
def test_deployed_environment_starts_closed_by_default(read_env, role):
    env = read_env(role)
    config = config_of(role, env)
    if role == "gateway":
        assert config.api_key_file and not config.insecure  # keys from a file (a mounted secret), never open
    else:
        assert config.serves_mtls and not config.insecure  # binds beyond loopback only with mTLS
    assert config.tls_dir  # every service's channels into the mesh present a certificate
    exposed = {k: v for k, v in env.items() if k not in ("KVMESH_INSECURE", "KVMESH_API_KEY_FILE", "KVMESH_TLS_DIR")}
    exposed["KVMESH_HOST"] = "0.0.0.0"
    with pytest.raises(ConfigError, match="refusing to bind"):
        config_of(role, exposed)


def test_the_gateway_key_file_is_mounted_from_a_secret():
    gateway = yaml.safe_load((DEPLOY / "compose.yaml").read_text())["services"]["gateway"]
    assert "kvmesh-api-keys" in gateway["secrets"]
    assert gateway["environment"]["KVMESH_API_KEY_FILE"] == "/run/secrets/kvmesh-api-keys"
    docs = list(yaml.safe_load_all((DEPLOY / "k8s" / "gateway.yaml").read_text()))
    pod = docs[0]["spec"]["template"]["spec"]
    secret = next(v for v in pod["volumes"] if v["name"] == "api-keys")["secret"]["secretName"]
    mount = next(m for m in pod["containers"][0]["volumeMounts"] if m["name"] == "api-keys")
    assert secret == "kvmesh-api-keys" and mount["readOnly"]
    assert k8s_env("gateway")["KVMESH_API_KEY_FILE"].startswith(mount["mountPath"] + "/")


def test_install_sh_writes_one_random_key_for_a_gateway_and_never_overwrites_it(tmp_path):
    import subprocess

    from kvmesh.services.common.api_keys import read_key_file

    def install(*instances):
        subprocess.run(["sh", str(DEPLOY / "systemd" / "install.sh"), "--root", str(tmp_path), "--no-venv",
                        *instances], check=True, capture_output=True, timeout=30)

    keys = tmp_path / "etc/kvmesh/api-keys"
    install("decode@0")
    assert not keys.exists()
    install("gateway@0")
    (key, tenant), = read_key_file(str(keys)).items()
    assert len(key) >= 32 and tenant == "default" and keys.stat().st_mode & 0o777 == 0o640
    install("gateway@0")
    assert read_key_file(str(keys)) == {key: tenant}
    other = tmp_path / "again"
    subprocess.run(["sh", str(DEPLOY / "systemd" / "install.sh"), "--root", str(other), "--no-venv", "gateway@0"],
                   check=True, capture_output=True, timeout=30)
    assert read_key_file(str(other / "etc/kvmesh/api-keys")) != {key: tenant}
