"""deploy/k8s at scale, checked offline against the code it runs: real flags and variables, metrics that exist,
probes on the ports served, Secrets that are defined, autoscaling, disruption budgets and spread."""

import re
import shutil
import subprocess

import pytest
import yaml
from k8s_docs import (ADAPTER_VALUES, K8S, KUSTOMIZATION, ROLES, container, documents, env_of, objects,
                      own_env, shared_env, unknown_variables, variables_read_directly, workload)

from kvmesh.services.cli import build_parser
from kvmesh.services.common import certs, metrics
from kvmesh.services.common.registration import scheduler_addresses

LABELS = ("app.kubernetes.io/name", "app.kubernetes.io/component")


def _pod_labels(role: str) -> dict:
    return workload(role)["spec"]["template"]["metadata"]["labels"]


@pytest.mark.parametrize("role", ROLES)
def test_args_are_real_flags_and_every_variable_is_one_the_role_reads(role):
    args = build_parser().parse_args(container(role)["args"])  # exits (SystemExit) on a flag kvmesh lacks
    assert args.command == role
    assert unknown_variables(role, own_env(role), variables_read_directly()) == []


def test_every_shared_variable_is_read_by_some_role():
    direct = variables_read_directly()
    unread = set(shared_env())
    for role in ROLES:
        unread &= set(unknown_variables(role, shared_env(), direct))
    assert unread == set()


def test_a_misspelt_variable_is_caught():
    direct = variables_read_directly()
    assert "KVMESH_HOST_ID" in direct and "KVMESH_TLS_DIR" in direct
    assert unknown_variables("decode", ["KVMESH_PORT", "KVMESH_DECODE_MAX_NUM_SEQS", "KVMESH_HOST_ID"], direct) == []
    assert unknown_variables("decode", ["KVMESH_MAX_NUM_SEQ", "KVMESH_PORT"], direct) == ["KVMESH_MAX_NUM_SEQ"]
    assert unknown_variables("scheduler", ["KVMESH_HANDOFF_LEASE_S"], direct) == ["KVMESH_HANDOFF_LEASE_S"]


def _probe_ports(probe: dict) -> list[int]:
    if "grpc" in probe:
        return [probe["grpc"]["port"]]
    if "httpGet" in probe:
        return [probe["httpGet"]["port"]]
    return [int(m) for word in probe["exec"]["command"] for m in re.findall(r"^127\.0\.0\.1:(\d+)$", word)]


@pytest.mark.parametrize("role", ROLES)
def test_every_probe_asks_the_port_the_service_binds(role):
    c = container(role)
    bound = int(env_of(role)["KVMESH_PORT"])
    assert bound == ROLES[role] and bound in {p["containerPort"] for p in c["ports"]}
    for name in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert _probe_ports(c[name]) == [bound], name


def _secrets_generated() -> dict[str, set[str]]:
    """Secret name -> the keys kustomize gives it (a file's name, or the key before `=`)."""
    gens = yaml.safe_load(KUSTOMIZATION.read_text())["secretGenerator"]
    return {g["name"]: {f.split("=")[0] if "=" in f else f.rsplit("/", 1)[-1] for f in g["files"]} for g in gens}


@pytest.mark.parametrize("role", ROLES)
def test_every_secret_a_pod_mounts_is_defined_with_the_files_the_service_reads(role):
    generated = _secrets_generated()
    pod = workload(role)["spec"]["template"]["spec"]
    mounted = {v["name"]: v["secret"]["secretName"] for v in pod["volumes"] if "secret" in v}
    assert mounted and set(mounted.values()) <= set(generated)
    tls = generated[mounted["tls"]]
    assert tls == {certs.CA_FILE, certs.cert_file("", role).name, certs.key_file("", role).name}
    if role == "gateway":  # KVMESH_API_KEY_FILE is a key of the api-keys Secret under its mount
        mount = next(m for m in container(role)["volumeMounts"] if m["name"] == "api-keys")["mountPath"]
        folder, _, key = env_of(role)["KVMESH_API_KEY_FILE"].rpartition("/")
        assert folder == mount and key in generated[mounted["api-keys"]]


def _adapter_rules() -> dict[str, dict]:
    return {r["name"]["as"]: r for r in yaml.safe_load(ADAPTER_VALUES.read_text())["rules"]["custom"]}


def _exported_series() -> set[str]:
    names = set()
    for family in metrics.REGISTRY.collect():
        suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count")}.get(family.type, ("",))
        names |= {family.name + s for s in suffixes}
    return names


@pytest.mark.parametrize("role", ["prefill", "decode"])
def test_each_worker_kind_scales_on_its_own_metrics_that_kvmesh_exports(role):
    (hpa,) = [h for h in objects("HorizontalPodAutoscaler") if h["spec"]["scaleTargetRef"]["name"] == f"kvmesh-{role}"]
    assert hpa["spec"]["scaleTargetRef"]["kind"] == workload(role)["kind"] == "Deployment"
    assert "replicas" not in workload(role)["spec"]  # the HPA owns the count; an apply would reset it
    assert hpa["spec"]["minReplicas"] >= 2 and hpa["spec"]["maxReplicas"] > hpa["spec"]["minReplicas"]
    rules, exported = _adapter_rules(), _exported_series()
    names = [m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"]]
    assert names and all(m["type"] == "Pods" for m in hpa["spec"]["metrics"])
    for name in names:
        rule = rules[name]  # a KeyError: the HPA names a metric no adapter rule serves
        series = set(re.findall(r"kvmesh:[a-z_]+", rule["seriesQuery"] + rule["metricsQuery"]))
        assert series and series <= exported, series - exported


def test_worker_gauges_the_hpas_read_are_set_from_a_load_report():
    from kvmesh.v1 import scheduler_pb2

    metrics.observe_load(scheduler_pb2.WorkerLoad(num_waiting=3, num_running=2, num_free_blocks=10,
                                                  num_total_blocks=40))
    value = metrics.REGISTRY.get_sample_value
    assert value("kvmesh:num_requests_waiting") == 3 and value("kvmesh:num_requests_running") == 2
    assert value("kvmesh:kv_blocks_used") / (value("kvmesh:kv_blocks_used") + value("kvmesh:kv_blocks_free")) == 0.75


def test_two_schedulers_each_named_in_kvmesh_scheduler():
    sts = workload("scheduler")
    assert sts["kind"] == "StatefulSet" and sts["spec"]["replicas"] == 2
    (svc,) = [s for s in objects("Service") if s["metadata"]["name"] == sts["spec"]["serviceName"]]
    assert svc["spec"]["clusterIP"] == "None" and svc["spec"]["selector"] == _pod_labels("scheduler")
    want = [f"kvmesh-scheduler-{i}.{svc['metadata']['name']}:{ROLES['scheduler']}" for i in range(2)]
    for role in ROLES:
        if role != "scheduler":
            assert scheduler_addresses(env_of(role)["KVMESH_SCHEDULER"]) == want, role


@pytest.mark.parametrize("role", ["scheduler", "prefill", "decode", "gateway"])
def test_replicated_roles_have_a_disruption_budget_and_spread(role):
    labels = _pod_labels(role)
    budgets = [b for b in objects("PodDisruptionBudget") if b["spec"]["selector"]["matchLabels"] == labels]
    assert len(budgets) == 1
    spec = workload(role)["spec"]
    assert budgets[0]["spec"].get("maxUnavailable") == 1 or (
        budgets[0]["spec"]["minAvailable"] < spec["replicas"])  # a budget that still lets a drain through
    spread = spec["template"]["spec"]["topologySpreadConstraints"]
    assert {c["topologyKey"] for c in spread} == {"kubernetes.io/hostname", "topology.kubernetes.io/zone"}
    assert all(c["labelSelector"]["matchLabels"] == labels for c in spread)


@pytest.mark.parametrize("role", ROLES)
def test_every_container_has_requests_and_limits(role):
    resources = container(role)["resources"]
    assert set(resources["requests"]) == set(resources["limits"]) == {"cpu", "memory"}


def test_kustomize_renders_the_whole_layout_with_its_secrets(tmp_path):
    kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate is not installed")
    if not shutil.which("kubectl"):
        pytest.skip("kubectl is not installed (its built-in kustomize renders deploy/k8s offline)")
    root = shutil.copytree(K8S, tmp_path / "k8s", ignore=shutil.ignore_patterns("secrets"))
    certs.init_dir(root / "secrets" / "tls")
    (root / "secrets" / "api-keys").write_text("a-key\n")
    out = subprocess.run(["kubectl", "kustomize", str(root)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    rendered = [d for d in yaml.safe_load_all(out.stdout) if d]
    secrets = {d["metadata"]["name"]: set(d["data"]) for d in rendered if d["kind"] == "Secret"}
    assert secrets == _secrets_generated()
    assert "ca.key" not in set().union(*secrets.values())  # the CA's key never reaches a pod
    for doc in rendered:
        kubernetes_validate.validate(doc, "1.30.0", strict=True)
    assert len(rendered) == len(documents()) + len(secrets)  # every manifest, and nothing else but the Secrets
