"""The layer table, enforced: imports inside vdd_ros only point downwards, and no module graph cycles.

Every module of the package is parsed with ``ast`` (imports at any depth, so function-level
imports count too); each ``vdd_ros.*`` import becomes an edge of the module graph. The checker
is a plain function over that graph, so the synthetic graphs below prove it can fail.

| layer | may import (inside vdd_ros) | third-party never |
| files.py, validation.py, paths.py | nothing | |
| spec.py | validation | |
| data/ | spec, validation, files | |
| tasks/ | spec, data, validation, files | |
| runtime/ | spec, validation, files | torch |
| learn/ | spec, data, tasks, runtime, validation, files | |
| ros/ | spec, runtime, tasks, validation, files, paths (shipped model files) | torch |
| cli/ | everything | |
"""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parents[1] / "vdd_ros"
FOUNDATIONS = ("files", "validation", "paths")

ALLOWED = {
    "files": set(),
    "validation": set(),
    "paths": set(),
    "spec": {"validation"},
    "data": {"spec", "validation", "files"},
    "tasks": {"spec", "data", "validation", "files"},
    "runtime": {"spec", "validation", "files"},
    "learn": {"spec", "data", "tasks", "runtime", "validation", "files"},
    "ros": {"spec", "runtime", "tasks", "validation", "files", "paths"},
    "cli": {"files", "validation", "paths", "spec", "data", "tasks", "runtime", "learn", "ros"},
    "package": set(),  # vdd_ros/__init__.py
}
FORBIDDEN_THIRD_PARTY = {"runtime": {"torch"}, "ros": {"torch"}}


def layer_of(module: str) -> str:
    """``vdd_ros.learn.vdd`` -> ``learn``; ``vdd_ros.spec`` -> ``spec``; ``vdd_ros`` -> ``package``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "package"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path, module: str) -> set[str]:
    """Every module ``path`` imports (absolute names; relative imports resolved against ``module``)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            found.add(base)
            # ``from vdd_ros.data import dataset`` imports the module vdd_ros.data.dataset
            found.update(f"{base}.{alias.name}" for alias in node.names if alias.name != "*")
    return found


def package_graph() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """(edges between vdd_ros modules, third-party top-level packages per module)."""
    paths = {module_name(p): p for p in sorted(PACKAGE_DIR.rglob("*.py"))}
    edges, third_party = {}, {}
    for module, path in paths.items():
        imported = imports_of(path, module)
        edges[module] = {name for name in imported if name in paths and name != module}
        third_party[module] = {name.split(".")[0] for name in imported if name and not name.startswith("vdd_ros")}
    return edges, third_party


def find_cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index, low, stack, on_stack, result = {}, {}, [], set(), []
    counter = [0]

    def visit(node):
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for target in sorted(edges.get(node, ())):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                result.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return result


def violations(edges: dict[str, set[str]], third_party: dict[str, set[str]]) -> list[str]:
    """One line per broken rule: an upward or sideways import, a forbidden package, a cycle."""
    problems = []
    for module in sorted(edges):
        layer = layer_of(module)
        if layer not in ALLOWED:
            problems.append(f"{module}: layer '{layer}' is not in the layer table")
            continue
        for target in sorted(edges[module]):
            target_layer = layer_of(target)
            if target_layer == "package" or target_layer == layer:
                continue  # within a layer (cycles are checked below) or the package's own __init__
            if target_layer not in ALLOWED[layer]:
                problems.append(f"{module} imports {target}: layer '{layer}' may not import '{target_layer}' "
                                f"(allowed: {sorted(ALLOWED[layer]) or 'nothing'})")
        for name in sorted(third_party.get(module, set()) & FORBIDDEN_THIRD_PARTY.get(layer, set())):
            problems.append(f"{module} imports {name}: layer '{layer}' must not import {name}")
    for cycle in find_cycles(edges):
        problems.append(f"import cycle between {cycle}")
    return problems


def test_the_package_keeps_the_layer_table():
    edges, third_party = package_graph()
    assert "vdd_ros.spec" in edges and "vdd_ros.learn.vdd" in edges, sorted(edges)
    problems = violations(edges, third_party)
    assert problems == [], "\n".join(problems)


def test_function_level_and_relative_imports_are_seen(tmp_path):
    source = tmp_path / "mod.py"
    source.write_text("import numpy\n\ndef f():\n    from vdd_ros.tasks.registry import task_module\n"
                      "    from . import sibling\n    from ..spec import ModelSpec\n")
    found = imports_of(source, "vdd_ros.data.mod")
    assert {"numpy", "vdd_ros.tasks.registry", "vdd_ros.data.sibling", "vdd_ros.spec"} <= found


def test_the_checker_fails_on_upward_imports_torch_and_cycles():
    edges = {
        "vdd_ros.spec": {"vdd_ros.validation"},
        "vdd_ros.validation": set(),
        "vdd_ros.data.dataset": {"vdd_ros.tasks.registry", "vdd_ros.spec"},  # upwards
        "vdd_ros.tasks.registry": {"vdd_ros.data.dataset"},  # together: a cycle
        "vdd_ros.runtime.policy": {"vdd_ros.learn.export"},  # upwards
        "vdd_ros.learn.export": {"vdd_ros.runtime.policy"},
        "vdd_ros.learn.vdd": {"vdd_ros.learn.em"},  # a cycle within one layer
        "vdd_ros.learn.em": {"vdd_ros.learn.vdd"},
        "vdd_ros.ros.policy_node": {"vdd_ros.runtime.policy"},
    }
    third_party = {"vdd_ros.ros.policy_node": {"rclpy", "torch"}, "vdd_ros.learn.vdd": {"torch"}}
    problems = violations(edges, third_party)
    text = "\n".join(problems)
    assert "vdd_ros.data.dataset imports vdd_ros.tasks.registry: layer 'data' may not import 'tasks'" in text
    assert "vdd_ros.runtime.policy imports vdd_ros.learn.export" in text
    assert "vdd_ros.ros.policy_node imports torch" in text
    assert "vdd_ros.learn.vdd imports torch" not in text
    assert "import cycle between ['vdd_ros.data.dataset', 'vdd_ros.tasks.registry']" in text
    assert "import cycle between ['vdd_ros.learn.em', 'vdd_ros.learn.vdd']" in text
    assert "import cycle between ['vdd_ros.learn.export', 'vdd_ros.runtime.policy']" in text
    assert len(problems) == 6, problems
    clean = {"vdd_ros.spec": {"vdd_ros.validation"}, "vdd_ros.validation": set()}
    assert violations(clean, {}) == []
