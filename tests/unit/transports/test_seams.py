"""The transport seam, read from the source: no import circle inside transports, no import of the services, no
backend named outside its own package and the registry, no module using another module's underscore members."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import kvmesh.transports as transports

ROOT = Path(transports.__file__).parent
BACKEND_PACKAGES = {"grpc", "shm", "ucx"}


def _modules() -> dict[str, ast.Module]:
    out = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(("kvmesh.transports", *parts))
        out[name.removesuffix(".__init__")] = ast.parse(path.read_text(), str(path))
    return out


def _imports(name: str, tree: ast.Module, known: set[str]) -> set[str]:
    """Every module `name` imports, anywhere in it (lazy imports inside functions count too)."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in known)
    return found


def test_transports_import_no_service_and_have_no_import_circle():
    modules = _modules()
    graph = {name: {m for m in _imports(name, tree, set(modules)) if m in modules and m != name}
             for name, tree in modules.items()}
    for name, tree in modules.items():
        assert not any(m.startswith("kvmesh.services") for m in _imports(name, tree, set())), name
    seen, done = [], set()

    def visit(node):
        if node in seen:
            raise AssertionError("import circle: " + " -> ".join(seen[seen.index(node):] + [node]))
        if node in done:
            return
        seen.append(node)
        for dep in sorted(graph[node]):
            visit(dep)
        seen.pop()
        done.add(node)

    for node in sorted(graph):
        visit(node)


def test_no_backend_is_named_outside_its_package_and_the_registry():
    names = re.compile(r"""["'](%s)["']""" % "|".join(BACKEND_PACKAGES))
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT)
        if rel.parts[0] in BACKEND_PACKAGES or rel == Path("__init__.py"):
            continue
        assert not names.search(path.read_text()), f"{rel} names a backend"


def _own_private_names(tree: ast.Module) -> set[str]:
    """Underscore names a module defines itself: functions, class attributes, `self._x = ...` attributes."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            names.add(node.attr)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
    return {n for n in names if n.startswith("_")}


def test_no_module_uses_another_modules_underscore_members():
    for path in ROOT.rglob("*.py"):
        tree = ast.parse(path.read_text())
        own = _own_private_names(tree)
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
                assert node.attr in own, f"{path.relative_to(ROOT)}:{node.lineno} uses another's .{node.attr}"
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("kvmesh"):
                private = [a.name for a in node.names if a.name.startswith("_")]
                assert not private, f"{path.relative_to(ROOT)} imports {private} from {node.module}"


def test_every_transports_file_is_short():
    for path in ROOT.rglob("*.py"):
        assert len(path.read_text().splitlines()) <= 300, path
    assert len((ROOT / "receiver.py").read_text().splitlines()) < 250
