"""The house's rules, read from the source: imports run top-down with no circle, rooms stay apart, files and
functions stay small. See `shared/DESIGN.md` ("Parts", "Where the next capabilities live") and `shared/STYLE.md`.

The import graph is drawn with `ast` from every module of `kvmesh.services` and `kvmesh.transports`, lazy imports
inside functions included (they are edges all the same); only `if TYPE_CHECKING:` blocks are left out, since they
never run. An edge goes to the module named: `from pkg import mod` is an edge to `pkg.mod` when `mod` is a module.
"""

from __future__ import annotations

import ast
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
ROOTS = {"kvmesh.services": REPO / "services", "kvmesh.transports": REPO / "transports"}
SERVICES = ("gateway", "scheduler", "prefill", "decode", "cache")
BACKENDS = ("grpc", "shm", "ucx")
MAX_FILE_LINES = 300
MAX_FUNCTION_LINES = 60


@dataclass
class Module:
    name: str
    path: Path
    tree: ast.Module
    imports: set[str] = field(default_factory=set)  # every import named, kvmesh or not


def _module_name(root_pkg: str, root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join([root_pkg, *parts])


def _runtime_nodes(tree: ast.AST):
    """Every node but those under `if TYPE_CHECKING:`."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            stack.extend(node.orelse)
            continue
        yield node
        stack.extend(ast.iter_child_nodes(node))


def _imports_of(module: Module, known: set[str]) -> set[str]:
    is_package = module.path.name == "__init__.py"
    base = module.name if is_package else module.name.rsplit(".", 1)[0]
    names: set[str] = set()
    for node in _runtime_nodes(module.tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = base.rsplit(".", node.level - 1)[0] if node.level > 1 else base
                target = anchor + (f".{node.module}" if node.module else "")
            else:
                target = node.module or ""
            submodules = {f"{target}.{alias.name}" for alias in node.names} & known
            names.update(submodules or {target})
    return names


def _load() -> dict[str, Module]:
    modules = {}
    for root_pkg, root in ROOTS.items():
        for path in sorted(root.rglob("*.py")):
            name = _module_name(root_pkg, root, path)
            modules[name] = Module(name, path, ast.parse(path.read_text(), str(path)))
    known = set(modules)
    for module in modules.values():
        module.imports = _imports_of(module, known)
    return modules


MODULES = _load()


def _edges() -> dict[str, set[str]]:
    return {name: {t for t in m.imports if t in MODULES and t != name} for name, m in MODULES.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index, low, on_stack, stack, found, counter = {}, {}, set(), [], [], [0]
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter[0]; counter[0] += 1
        stack.append(root); on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter[0]; counter[0] += 1
                    stack.append(child); on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop(); on_stack.discard(member); component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def _room(name: str) -> str:
    """`kvmesh.services.decode.worker` -> `services.decode`; `kvmesh.transports.shm.segment` -> `transports`."""
    parts = name.split(".")
    if parts[1] == "transports":
        return "transports"
    return "services." + parts[2] if len(parts) > 2 else "services"


def _violations(rule) -> list[str]:
    return sorted(f"{name} -> {target}" for name, targets in _edges().items() for target in targets
                  if rule(name, target))


def test_no_import_circle():
    assert _cycles(_edges()) == []


def test_transports_import_nothing_of_services():
    assert _violations(lambda a, b: _room(a) == "transports" and b.startswith("kvmesh.services")) == []


#: The planner simulates the mesh with the scheduler's real router and policies (pure modules of plain data);
#: it is a tool, not a service, and nothing imports it but the CLI.
PLANNER_USES = {"kvmesh.services.scheduler.router", "kvmesh.services.scheduler.policies",
                "kvmesh.services.scheduler.registry", "kvmesh.services.scheduler.models",
                "kvmesh.services.scheduler.predict"}  # the simulator routes with the scheduler's own models


#: the flexible worker (`--role auto`) is the prefill and the decode service mounted over one engine: it composes
#: their mount() set-up, and nothing else of theirs; no service imports it
FLEXIBLE_USES = {"kvmesh.services.prefill.main", "kvmesh.services.decode.main", "kvmesh.services.decode.config"}


def test_no_service_imports_another_service():
    def crosses(a: str, b: str) -> bool:
        ra, rb = _room(a), _room(b)
        if ra == "services.plan" and b in PLANNER_USES:
            return False
        if ra == "services.flexible" and b in FLEXIBLE_USES:
            return False
        if rb == "services.flexible":
            return ra not in ("services.flexible", "services.cli")
        return ra != rb and rb.split(".")[-1] in SERVICES
    assert _violations(crosses) == []


def test_engine_imports_no_grpc_and_no_service_layer():
    engine = [m for m in MODULES.values() if _room(m.name) == "services.engine"]
    assert engine, "the engine moved: update this test"
    grpc = sorted(f"{m.name} -> {i}" for m in engine for i in m.imports if i.split(".")[0] == "grpc")
    assert grpc == []
    allowed = {"services.engine", "services.kv_identity", "services.ports"}
    assert _violations(lambda a, b: _room(a) == "services.engine" and _room(b) not in allowed) == []


def test_layers_run_top_down():
    """common serves every service, so it imports no engine, worker kit or service; the worker kit builds on
    common, the engine, kv_identity, cost_model and transports, and only the engine workers use it; kv_identity and
    cost_model (the step-cost closed forms the planner and the scheduler share) stand alone."""
    below_common = {"services.common", "services.kv_identity", "transports"}
    assert _violations(lambda a, b: _room(a) == "services.common" and _room(b) not in below_common) == []
    worker_kit_uses = {"services.worker", "services.common", "services.engine", "services.kv_identity",
                       "services.cost_model", "transports"}
    assert _violations(lambda a, b: _room(a) == "services.worker" and _room(b) not in worker_kit_uses) == []
    assert _violations(lambda a, b: _room(b) == "services.worker" and _room(a) not in
                       ("services.worker", "services.prefill", "services.decode", "services.flexible")) == []
    assert _violations(lambda a, b: _room(a) == "services.kv_identity" and _room(b) != "services.kv_identity") == []
    assert _violations(lambda a, b: _room(a) == "services.cost_model" and _room(b) != "services.cost_model") == []


def test_only_the_cli_imports_the_trace_command():
    """`kvmesh trace` is a command; span names live with telemetry, so no runtime module needs it."""
    assert _violations(lambda a, b: _room(b) == "services.trace" and _room(a) != "services.trace"
                       and a != "kvmesh.services.cli") == []


#: The scheduler's planner loop runs the same simulator on its recent traffic (issue 19): its own modules, no other.
SCHEDULER_PLANNER = {"kvmesh.services.scheduler.planner", "kvmesh.services.scheduler.planner_loop",
                     "kvmesh.services.scheduler.planner_setup"}


def test_only_the_cli_and_the_scheduler_planner_import_the_planner():
    assert _violations(lambda a, b: _room(b) == "services.plan" and _room(a) != "services.plan"
                       and a != "kvmesh.services.cli" and a not in SCHEDULER_PLANNER) == []


def _defined_private_names(tree: ast.AST) -> set[str]:
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            names.add(node.attr)
        elif isinstance(node, ast.arg):
            names.add(node.arg)
    return {n for n in names if n.startswith("_") and not n.startswith("__")}


def test_no_module_uses_another_modules_private_members():
    """An underscore member of kvmesh read off another object (`peer._y`, not `self._y`) or imported
    (`from m import _y`) must be one this module defines itself: a seam between modules is public and documented.
    A subclass filling in its base's private hooks (`self._write_runs`) is the public-wraps-private pattern."""
    defined = {name: _defined_private_names(m.tree) for name, m in MODULES.items()}
    everywhere = set().union(*defined.values())
    found = []
    for module in MODULES.values():
        own = defined[module.name]
        for node in ast.walk(module.tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("kvmesh"):
                found += [f"{module.name}: from {node.module} import {a.name}" for a in node.names
                          if a.name.startswith("_") and not a.name.startswith("__")]
            elif (isinstance(node, ast.Attribute) and node.attr in everywhere and node.attr not in own
                  and not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"))):
                found.append(f"{module.name}:{node.lineno}: {ast.unparse(node)}")
    assert found == []


def test_backend_names_stay_in_their_packages():
    """A backend's name is written only in its own package, the registry and the preference list
    (`transports/__init__.py`): generic code asks a backend what it can do instead of testing its name."""
    allowed_files = {REPO / "transports" / "__init__.py"}
    found = []
    for module in MODULES.values():
        if module.path in allowed_files:
            continue
        parts = module.path.relative_to(REPO).parts
        own = parts[1] if parts[0] == "transports" and len(parts) > 2 else None
        for node in ast.walk(module.tree):
            if isinstance(node, ast.Constant) and node.value in BACKENDS and node.value != own:
                if _is_otlp_protocol(module, node) or _is_client_api(module, node):
                    continue
                found.append(f"{module.path.relative_to(REPO)}:{node.lineno}: {node.value!r}")
    assert found == []


def _is_otlp_protocol(module: Module, node: ast.Constant) -> bool:
    """OpenTelemetry's exporter protocol is also called "grpc"; that one is not a KV backend."""
    line = module.path.read_text().splitlines()[node.lineno - 1]
    return node.value == "grpc" and ("OTLP" in line.upper() or "protocol" in line)


def _is_client_api(module: Module, node: ast.Constant) -> bool:
    """`kvmesh bench serve --api grpc` names the gateway's client API, not a KV backend: one constant, in the bench
    client, defines that name."""
    line = module.path.read_text().splitlines()[node.lineno - 1]
    return module.name == "kvmesh.services.bench.client" and line.startswith("API_GRPC = ")


def _source_files():
    for root in (REPO / "services", REPO / "transports", REPO / "bench", REPO / "protos"):
        for path in sorted(root.rglob("*.py")):
            if not re.search(r"_pb2(_grpc)?\.py$", path.name):  # generated by grpcio-tools
                yield path


def test_no_file_over_the_line_budget():
    long = {str(p.relative_to(REPO)): n for p in _source_files()
            if (n := len(p.read_text().splitlines())) > MAX_FILE_LINES}
    assert long == {}


def test_the_receiver_stays_small():
    """The generic receiver keeps to its job (records, leases and verification live beside it)."""
    assert len((REPO / "transports" / "receiver.py").read_text().splitlines()) < 250


def test_no_function_over_the_line_budget():
    long = []
    for path in _source_files():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name} ({length} lines)")
    assert long == []


def test_pyproject_lists_every_package():
    """`pip install .` (not editable) ships only the packages listed; a missing one fails only on deployment."""
    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    present = {m.name for m in MODULES.values() if m.path.name == "__init__.py"}
    assert present - listed == set()


def test_the_graph_reader_sees_a_circle():
    """The rules above could fail: a circle put into the graph is found."""
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}
    assert _cycles(graph) == [["a", "b", "c"]]
