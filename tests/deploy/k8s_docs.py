"""Plain helpers of the deploy/k8s tests: the manifests as documents, each role's workload and what it runs."""

import argparse
import re
from importlib import import_module
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
ADAPTER_VALUES = K8S / "prometheus-adapter" / "values.yaml"
KUSTOMIZATION = K8S / "kustomization.yaml"
ROLES = {"scheduler": 50050, "cache": 50060, "prefill": 50070, "decode": 50080, "gateway": 50051}
WORKLOADS = ("Deployment", "StatefulSet")


def documents() -> list[tuple[str, dict]]:
    """Every Kubernetes object of deploy/k8s/*.yaml (the kustomization is kustomize's file, not an object)."""
    return [(path.name, doc) for path in sorted(K8S.glob("*.yaml")) if path != KUSTOMIZATION
            for doc in yaml.safe_load_all(path.read_text()) if doc]


def objects(kind: str) -> list[dict]:
    return [d for _, d in documents() if d["kind"] == kind]


def workload(role: str) -> dict:
    """The Deployment or StatefulSet that runs `role`."""
    return next(d for _, d in documents() if d["kind"] in WORKLOADS and d["metadata"]["name"] == f"kvmesh-{role}")


def container(role: str) -> dict:
    (only,) = workload(role)["spec"]["template"]["spec"]["containers"]
    return only


def shared_env() -> dict[str, str]:
    """The ConfigMap every kvmesh pod loads its variables from."""
    return next(d for d in objects("ConfigMap") if d["metadata"]["name"] == "kvmesh-env")["data"]


def own_env(role: str) -> dict[str, str | None]:
    """The variables a role's container sets itself (None: from a field of the pod)."""
    return {e["name"]: e.get("value") for e in container(role).get("env", [])}


def env_of(role: str) -> dict[str, str | None]:
    """What the role's process sees: the ConfigMap's variables, then its own."""
    return {**shared_env(), **own_env(role)}


def role_parser(role: str) -> argparse.ArgumentParser:
    """The role's own flags, added by its service module exactly as `kvmesh <role>` adds them."""
    parser = argparse.ArgumentParser(prog=f"kvmesh {role}")
    import_module(f"kvmesh.services.{role}.main").add_arguments(parser)
    return parser


def variables_read_directly() -> set[str]:
    """KVMESH_* names the code reads itself (not through a config knob): every such string literal in the source."""
    pattern = re.compile(r"[\"'](KVMESH_[A-Z0-9_]+)[\"']")
    return {name for folder in ("services", "transports") for path in (ROOT / folder).rglob("*.py")
            for name in pattern.findall(path.read_text())}


def unknown_variables(role: str, names, direct: set[str]) -> list[str]:
    """The KVMESH_* names among `names` that `kvmesh <role>` never reads: a misspelt one would be ignored."""
    fields = {a.dest.upper() for a in role_parser(role)._actions if a.dest != "help"}
    known = {f"KVMESH_{f}" for f in fields} | {f"KVMESH_{role.upper()}_{f}" for f in fields} | direct
    return sorted(n for n in names if n.startswith("KVMESH_") and n not in known)
