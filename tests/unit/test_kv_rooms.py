"""The rooms around a prompt's KV identity, read from the imports: the engine imports no gRPC and nothing of the
services but `kv_identity`; no service imports the cache service's package but the cache service itself (the
cache client lives in `services/clients/`)."""

import ast
from pathlib import Path

SERVICES = Path(__file__).resolve().parents[2] / "services"


def imports_of(folder: Path) -> dict[str, set[str]]:
    """Module file -> every module it imports (at any depth: lazy imports count too)."""
    out = {}
    for path in folder.rglob("*.py"):
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module:
                names.add(node.module)
        out[str(path.relative_to(SERVICES))] = names
    return out


def test_the_engine_imports_no_grpc_and_no_service_but_kv_identity():
    for path, names in imports_of(SERVICES / "engine").items():
        for name in names:
            assert not name.startswith("grpc"), (path, name)
            if name.startswith("kvmesh.services."):
                assert name.startswith(("kvmesh.services.engine", "kvmesh.services.kv_identity")), (path, name)


def test_no_service_imports_the_cache_services_package():
    for path, names in imports_of(SERVICES).items():
        if path.startswith("cache/"):
            continue
        assert not any(n == "kvmesh.services.cache" or n.startswith("kvmesh.services.cache.") for n in names), path


def test_kv_identity_imports_nothing_of_the_services():
    names = imports_of(SERVICES)["kv_identity.py"]
    assert not any(n.startswith(("kvmesh.services", "grpc", "torch")) for n in names), names
