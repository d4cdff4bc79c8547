"""deploy/k8s: every manifest validates against Kubernetes' schemas (strict, offline) and has probes and scraping."""

import pytest
from k8s_docs import ROLES, documents, workload

kubernetes_validate = pytest.importorskip(
    "kubernetes_validate", reason="kubernetes-validate is not installed (it is in the `test` extra)")

KUBERNETES_VERSION = "1.30.0"


@pytest.mark.parametrize("name, doc", documents(), ids=lambda v: v if isinstance(v, str) else v["kind"])
def test_manifest_validates_strictly(name, doc):
    kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def test_a_misspelt_field_is_rejected():
    doc = workload("decode")
    doc["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {"grcp": {"port": 50080}}
    with pytest.raises(kubernetes_validate.ValidationError, match="grcp"):
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


@pytest.mark.parametrize("role", ROLES)
def test_role_has_health_probes_scrape_annotations_and_a_service(role):
    deployment = workload(role)
    pod = deployment["spec"]["template"]
    (container,) = pod["spec"]["containers"]
    port = ROLES[role]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        if role == "gateway":  # its public port is plaintext: Kubernetes' own gRPC probe
            assert container[probe]["grpc"] == {"port": port}, probe
        else:  # grpc.health.v1 over mTLS with the pod's certificate
            assert container[probe]["exec"]["command"] == [
                "python", "-m", "kvmesh.services.common.healthcheck", f"127.0.0.1:{port}", "--role", role], probe
    assert pod["metadata"]["annotations"]["prometheus.io/scrape"] == "true"
    metrics_port = int(pod["metadata"]["annotations"]["prometheus.io/port"])
    assert metrics_port in {p["containerPort"] for p in container["ports"]}
    assert container["args"] == [role]
    services = [d for _, d in documents() if d["kind"] == "Service" and d["metadata"]["name"] == f"kvmesh-{role}"]
    assert services and services[0]["spec"]["selector"] == pod["metadata"]["labels"]


def test_cache_ssd_tier_is_a_persistent_volume_claim():
    pod = workload("cache")["spec"]["template"]["spec"]
    claims = {v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v}
    pvcs = {d["metadata"]["name"] for _, d in documents() if d["kind"] == "PersistentVolumeClaim"}
    assert "kvmesh-cache-ssd" in claims and "kvmesh-cache-ssd" in pvcs
    assert workload("cache")["spec"]["strategy"]["type"] == "Recreate"


@pytest.mark.parametrize("role", ROLES)
def test_each_pod_mounts_only_its_roles_tls_secret_and_never_binds_insecure(role):
    pod = workload(role)["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    secret = next(v for v in pod["volumes"] if v["name"] == "tls")["secret"]["secretName"]
    mount = next(m for m in container["volumeMounts"] if m["name"] == "tls")
    assert secret == f"kvmesh-tls-{role}" and mount["readOnly"] and mount["mountPath"] == "/etc/kvmesh/tls"
    config = next(d for _, d in documents() if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "kvmesh-env")
    assert config["data"]["KVMESH_TLS_DIR"] == "/etc/kvmesh/tls"
    assert "KVMESH_INSECURE" not in {e["name"] for e in container.get("env", [])}
