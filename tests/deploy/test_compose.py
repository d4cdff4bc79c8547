"""deploy/compose.yaml: the real `docker-compose config` accepts it and rejects a misspelt key; its shape."""

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

COMPOSE = Path(__file__).resolve().parents[2] / "deploy" / "compose.yaml"
ROLES = {"scheduler": 50050, "cache": 50060, "prefill": 50070, "decode": 50080, "gateway": 50051}


def _compose_command() -> list[str]:
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    if shutil.which("docker") and subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        return ["docker", "compose"]
    pytest.skip("neither docker-compose nor the docker compose plugin is installed "
                "(CI: apt-get install -y docker-compose)")


def _config(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run(_compose_command() + ["-f", str(path), "config"], capture_output=True, text=True,
                          timeout=60, cwd=path.parent)


@pytest.fixture(scope="module")
def services() -> dict:
    return yaml.safe_load(COMPOSE.read_text())["services"]


def test_compose_config_accepts_the_file():
    result = _config(COMPOSE)
    assert result.returncode == 0, result.stderr
    rendered = yaml.safe_load(result.stdout)["services"]
    assert set(rendered) >= set(ROLES) | {"jaeger", "ipc"}
    assert rendered["prefill"]["environment"]["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://jaeger:4317"


def test_compose_config_rejects_a_misspelt_key(tmp_path):
    bad = tmp_path / "compose.yaml"
    bad.write_text(COMPOSE.read_text().replace("    healthcheck:", "    healtcheck:", 1))
    result = _config(bad)
    assert result.returncode != 0
    assert "healtcheck" in result.stderr


def test_every_role_has_a_grpc_health_check_and_otel_pointing_at_jaeger(services):
    for role, port in ROLES.items():
        service = services[role]
        # over mTLS with the service's own certificate; the gateway's public port is plaintext
        identity = ["--tls-dir", ""] if role == "gateway" else ["--role", role]
        assert service["healthcheck"]["test"] == [
            "CMD", "python", "-m", "kvmesh.services.common.healthcheck", f"127.0.0.1:{port}", *identity], role
        assert service["environment"]["KVMESH_PORT"] == str(port), role
        assert service["environment"]["OTEL_TRACES_EXPORTER"] == "otlp", role
        assert service["environment"]["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://jaeger:4317", role


def test_every_kvmesh_service_restarts_on_failure_as_kvmesh_up_does(services):
    from kvmesh.services.supervisor import RestartConfig

    for role in [*ROLES, "ipc"]:
        assert services[role]["restart"] == "on-failure" == RestartConfig().restart, role


def test_only_gateway_and_jaeger_publish_ports(services):
    assert services["gateway"]["ports"] == ["50051:50051", "8000:8000"]
    assert services["jaeger"]["ports"] == ["16686:16686"]
    published = {name for name, s in services.items() if s.get("ports")}
    assert published == {"gateway", "jaeger"}, "prefill and decode must scale: no fixed host ports"


def test_workers_share_one_ipc_namespace_and_host_id(services):
    assert services["ipc"]["ipc"] == "shareable" and services["ipc"]["shm_size"]
    for role in ("prefill", "decode", "cache"):
        assert services[role]["ipc"] == "service:ipc", role
        assert services[role]["environment"]["KVMESH_HOST_ID"] == "compose-shared-ipc", role


def test_cache_ssd_tier_is_a_named_volume(services):
    document = yaml.safe_load(COMPOSE.read_text())
    ssd_dir = services["cache"]["environment"]["KVMESH_CACHE_SSD_DIR"]
    assert f"cache-ssd:{ssd_dir}" in services["cache"]["volumes"]
    assert "cache-ssd" in document["volumes"]


def test_each_service_gets_only_the_ca_and_its_own_certificate_and_key_as_secrets(services):
    for role in ROLES:
        targets = sorted(s["target"] for s in services[role]["secrets"] if isinstance(s, dict))
        assert targets == sorted(f"/run/secrets/kvmesh-tls/{name}" for name in ("ca.pem", f"{role}.pem", f"{role}.key"))
        assert services[role]["environment"]["KVMESH_TLS_DIR"] == "/run/secrets/kvmesh-tls"
        assert "KVMESH_INSECURE" not in services[role]["environment"]
