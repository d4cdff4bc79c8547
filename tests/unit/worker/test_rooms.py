"""The rooms of the services, drawn from their imports (every import, lazy ones inside functions included).

`services/common` holds what every service needs and imports no service; `services/worker` is the engine-worker
kit, imported by the prefill and decode workers alone; the engine imports neither gRPC nor `services/common`; a
service package imports no other service's package.
"""

import ast
from pathlib import Path

import pytest

SERVICES = Path(__file__).resolve().parents[3] / "services"
SERVICE_PACKAGES = ("gateway", "scheduler", "prefill", "decode", "cache")
# Imports of the cache service's package that the cache client's move to `services/clients` removes.
PENDING = {"kvmesh.services.cache.client", "kvmesh.services.cache.keys"}


def imports(package: str) -> dict[str, set[str]]:
    """{module path: the kvmesh and grpc modules it imports} for every module of services/<package>."""
    found = {}
    for path in sorted((SERVICES / package).rglob("*.py")):
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.update([node.module] + [f"{node.module}.{alias.name}" for alias in node.names])
        found[str(path.relative_to(SERVICES))] = {n for n in names if n.startswith(("kvmesh", "grpc"))}
    return found


def offending(package: str, allowed: tuple[str, ...]) -> dict[str, set[str]]:
    """Imports of kvmesh.services.* by services/<package> outside its own package and `allowed` packages."""
    own = (f"kvmesh.services.{package}", *(f"kvmesh.services.{a}" for a in allowed))
    bad = {}
    for module, names in imports(package).items():
        wrong = {n for n in names if n.startswith("kvmesh.services.") and not n.startswith(own)
                 and n.rsplit(".", 1)[0] not in PENDING and n not in PENDING}
        if wrong:
            bad[module] = wrong
    return bad


def test_common_imports_no_service_no_worker_kit_and_no_engine():
    assert offending("common", ()) == {}


def test_the_worker_kit_builds_on_common_and_the_engine_only():
    assert offending("worker", ("common", "engine")) == {}


@pytest.mark.parametrize("package", SERVICE_PACKAGES)
def test_a_service_imports_no_other_service(package):
    shared = ("common", "engine", "kv_identity", "clients")
    kit = ("worker",) if package in ("prefill", "decode") else ()
    assert offending(package, shared + kit) == {}


def test_the_engine_imports_neither_grpc_nor_common():
    bad = {m: {n for n in names if n.startswith(("grpc", "kvmesh.services.common"))}
           for m, names in imports("engine").items()}
    assert {m: names for m, names in bad.items() if names} == {}
