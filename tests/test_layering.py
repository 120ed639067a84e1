"""The package's import structure (django_lb_shm/__init__.py's layering): top-level imports of
the package point down the declared layers only, form no cycle, and shared_state imports
nothing of the package but errors.  Read from the source (ast): nothing is imported."""
from __future__ import annotations

import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "django_lb_shm"
PACKAGES = {"", "backend", "management", "management.commands", "client", "wire", "shm", "databases",
            "supervisor", "coordinator", "ops", "settings"}   # (__init__ modules)


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def is_module(name: str) -> bool:
    path = PACKAGE.joinpath(*name.split("."))
    return path.with_suffix(".py").exists() or (path / "__init__.py").exists()


def _targets(node: ast.ImportFrom, importer: str, is_package: bool) -> set[str]:
    if node.level == 0:
        if not (node.module or "").startswith("django_lb_shm"):
            return set()
        base = (node.module or "").split(".")[1:]
    else:
        base = importer.split(".") if importer else []
        if not is_package:
            base = base[:-1]
        base = base[: len(base) - (node.level - 1)] + (node.module.split(".") if node.module else [])
    out = set()
    for alias in node.names:
        candidate = ".".join(base + [alias.name])
        out.add(candidate if is_module(candidate) else ".".join(base))
    return out


def _is_type_checking(node: ast.stmt) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def top_level_imports() -> dict[str, set[str]]:
    """module -> the package modules it imports when it is imported (not in functions, not TYPE_CHECKING)."""
    graph = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        name = module_name(path)
        deps: set[str] = set()
        stack = list(ast.parse(path.read_text()).body)
        while stack:
            node = stack.pop()
            if isinstance(node, ast.ImportFrom):
                deps |= _targets(node, name, path.name == "__init__.py")
            elif isinstance(node, ast.Import):
                deps |= {".".join(a.name.split(".")[1:]) for a in node.names if a.name.startswith("django_lb_shm.")}
            elif isinstance(node, (ast.If, ast.Try)) and not _is_type_checking(node):
                stack += node.body + node.orelse + getattr(node, "finalbody", []) \
                    + [s for h in getattr(node, "handlers", []) for s in h.body]
        deps.discard(name)
        graph[name] = deps
    return graph


def declared_layers() -> dict[str, int]:
    doc = ast.get_docstring(ast.parse((PACKAGE / "__init__.py").read_text())) or ""
    layers, current = {}, None
    for line in doc.splitlines():
        match = re.match(r"\s+L(\d+)\s+(.*)$", line)
        if match:
            current = int(match.group(1))
            names = match.group(2)
        elif current is not None and line.startswith("        ") and line.strip():
            names = line
        else:
            current = None if not line.strip() else current
            continue
        for name in names.split():
            layers[name] = current
    return layers


def find_cycle(graph: dict[str, set[str]]) -> list[str]:
    state: dict[str, int] = {}   # 1: on the path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str]:
        state[node] = 1
        path.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                return path[path.index(dep):] + [dep]
            if dep not in state:
                found = visit(dep)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return []

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return []


def test_no_cycle_among_top_level_imports():
    cycle = find_cycle(top_level_imports())
    assert not cycle, ("import cycle among top-level imports: " + " -> ".join(cycle)
                       + "; import the upper module inside the function that needs it, or move the shared "
                       "name down (django_lb_shm/__init__.py lists the layers)")


def test_shared_memory_imports_only_errors():
    assert top_level_imports()["shm.state"] <= {"errors"}, \
        "django_lb_shm/shm/state.py may import only errors.py of the package"
    assert all_imports()["shm.state"] <= {"errors"}, "shm/state.py imports more than errors inside functions"


# Folder -> the package's folders and top-level modules it may import (at the top or inside a
# function): the boxes of the README's architecture picture, and the arrows between them.
# A top-level module (no folder) is named by itself; "." is a folder's own modules.
MAY_IMPORT = {
    "shm": {"errors"},
    "wire": {".", "errors"},
    "settings": {".", "errors", "wire", "shm", "balancing"},
    "databases": {".", "errors", "shm", "settings", "routers", "periodic"},
    "client": {".", "errors", "wire", "shm", "settings", "databases", "balancing", "transactions", "__about__"},
    "coordinator": {".", "errors", "wire", "shm", "settings", "databases", "balancing", "routers", "apps", "periodic",
                    "ops.logging_setup", "__about__"},
    "supervisor": {".", "errors", "wire", "shm", "settings", "databases", "coordinator.process",
                   "ops.logging_setup", "__about__"},
}


def all_imports() -> dict[str, set[str]]:
    """module -> every package module it imports, wherever the import is (functions included)."""
    graph = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        name = module_name(path)
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                deps |= _targets(node, name, path.name == "__init__.py")
            elif isinstance(node, ast.Import):
                deps |= {".".join(a.name.split(".")[1:]) for a in node.names if a.name.startswith("django_lb_shm.")}
        deps.discard(name)
        graph[name] = deps
    return graph


def _allowed(importer: str, target: str) -> bool:
    folder = importer.split(".")[0]
    rules = MAY_IMPORT[folder]
    if target.split(".")[0] == folder:
        return "." in rules
    return any(target == rule or target.startswith(rule + ".") for rule in rules if rule != ".")


def test_each_folder_imports_only_the_boxes_below_it():
    crossing = [f"{m} imports {d}" for m, deps in sorted(all_imports().items())
                if m.split(".")[0] in MAY_IMPORT and "." in m
                for d in sorted(deps) if d and not _allowed(m, d)]
    assert not crossing, ("imports across the architecture's boxes (tests/test_layering.py MAY_IMPORT): "
                          + "; ".join(crossing))


def test_the_folder_rule_sees_a_crossing():
    assert not _allowed("client.session", "coordinator.journal")
    assert not _allowed("coordinator.router", "client.connection")
    assert not _allowed("shm.state", "wire.protocol")
    assert _allowed("coordinator.router", "coordinator.sequencer") and _allowed("client.reads", "shm.state")


# A request's way down through the coordinator, in order.  A module imports only modules after
# it (functions included): what a lower one must tell an upper one (an applied write, a copy
# caught up) it tells through a callback the upper one handed it, never through an import.
WRITE_PATH = ("coordinator.router", "coordinator.transaction", "coordinator.write_guard", "coordinator.sequencer",
              "coordinator.group_commit", "coordinator.db_thread", "coordinator.read_pool", "coordinator.journal")


def test_the_write_path_flows_one_way():
    graph = all_imports()
    back = [f"{m} imports {d}" for i, m in enumerate(WRITE_PATH)
            for d in sorted(graph[m]) if d in WRITE_PATH[:i]]
    assert not back, "imports back up the write path (tests/test_layering.py WRITE_PATH): " + "; ".join(back)


def test_every_module_is_placed_in_a_layer():
    layers = declared_layers()
    modules = set(top_level_imports()) - PACKAGES
    assert not modules - set(layers), (f"modules missing from the layering in django_lb_shm/__init__.py: "
                                       f"{sorted(modules - set(layers))}")
    assert not set(layers) - modules, f"the layering names modules that do not exist: {sorted(set(layers) - modules)}"


def test_top_level_imports_point_down_the_layers():
    layers = declared_layers()
    upward = [f"{m} (L{layers[m]}) imports {d} (L{layers[d]})"
              for m, deps in sorted(top_level_imports().items()) if m in layers
              for d in sorted(deps) if d in layers and layers[d] >= layers[m]]
    assert not upward, ("top-level imports that do not point to a lower layer (django_lb_shm/__init__.py): "
                        + "; ".join(upward))


def test_the_checker_sees_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) == []
