"""The layers point one way: sources -> inference -> output -> comms -> remote/daemon -> fleet/console
-> cli (provision: `service install`, beside fleet), with the config, its schema, errors and host facts below everything and the host tools on
top. Every import statement counts, including those inside functions (a late import is still a
dependency); a registry's backends are found by name (``edge_agent.registry_choices``,
``discover_backends``), which is how plugins are loaded, not an import of a layer above.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path
from typing import Dict, List, Set, Tuple

REPO = Path(__file__).resolve().parents[1]
PKG = REPO / "edge_agent"

# Lowest first. A module may import its own layer's modules and those of the layers below.
LAYERS: List[Tuple[str, ...]] = [
    ("edge_agent", "edge_agent.errors", "edge_agent.schema", "edge_agent.config", "edge_agent.system"),
    ("edge_agent.sources",),
    ("edge_agent.inference", "edge_agent.models"),
    ("edge_agent.output",),
    ("edge_agent.comms",),
    ("edge_agent.remote",),
    ("edge_agent.daemon",),
    ("edge_agent.fleet", "edge_agent.console", "edge_agent.provision"),
    ("edge_agent.cli", "edge_agent.__main__"),
]


def layer_of(module: str) -> int:
    best, level = -1, -1
    for i, names in enumerate(LAYERS):
        for name in names:
            if (module == name or module.startswith(name + ".")) and len(name) > best:
                best, level = len(name), i
    assert level >= 0, f"{module} is in no layer: add its package to LAYERS"
    return level


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports() -> Dict[str, Set[Tuple[str, int]]]:
    """module -> {(imported edge_agent module, line)} for every import statement anywhere in it."""
    found: Dict[str, Set[Tuple[str, int]]] = defaultdict(set)
    for path in PKG.rglob("*.py"):
        name = module_name(path)
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                if node.level:  # relative: resolve against the package
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                if target.startswith("edge_agent"):
                    for alias in node.names:  # `from edge_agent.x import y`: y may be a module
                        sub = f"{target}.{alias.name}"
                        is_module = (REPO / Path(*sub.split("."))).with_suffix(".py").exists() or \
                            (REPO / Path(*sub.split("."))).is_dir()
                        found[name].add((sub if is_module else target, node.lineno))
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.startswith("edge_agent"):
                        found[name].add((alias.name, node.lineno))
    return found


def test_no_module_imports_a_layer_above_it():
    upward = []
    for module, targets in sorted(imports().items()):
        for target, line in sorted(targets):
            if layer_of(target) > layer_of(module):
                upward.append(f"{module}:{line} imports {target} (layer {layer_of(target)} > {layer_of(module)})")
    assert upward == [], "\n".join(upward)


def test_packages_have_no_import_cycles():
    graph: Dict[str, Set[str]] = defaultdict(set)

    def package(module: str) -> str:
        parts = module.split(".")
        return ".".join(parts[:2]) if len(parts) > 1 else parts[0]

    for module, targets in imports().items():
        for target, _ in targets:
            if package(target) != package(module) and package(target) != "edge_agent":
                graph[package(module)].add(package(target))
    seen: Dict[str, int] = {}
    cycles: List[str] = []

    def visit(node: str, path: List[str]) -> None:
        seen[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if seen.get(nxt) == 1:
                cycles.append(" -> ".join(path[path.index(nxt):] + [nxt]) if nxt in path else f"{node} -> {nxt}")
            elif nxt not in seen:
                visit(nxt, path + [nxt])
        seen[node] = 2

    for start in sorted(graph):
        if start not in seen:
            visit(start, [start])
    assert cycles == [], cycles


def test_the_device_never_imports_the_host_tools():
    offenders = [f"{m}:{line}" for m, targets in imports().items() for t, line in targets
                 if t.startswith(("edge_agent_host", "tools"))]
    assert offenders == []


def test_a_module_above_is_caught(tmp_path, monkeypatch):
    """The check itself: an upward late import in a lower layer is reported with its line."""
    assert layer_of("edge_agent.inference.segmenter") < layer_of("edge_agent.daemon.pipeline")
    assert layer_of("edge_agent.system") == 0 and layer_of("edge_agent.cli.run") == len(LAYERS) - 1
    source = "def f():\n    from edge_agent.daemon import agent\n"
    tree = ast.parse(source)
    late = [n for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    assert late and late[0].lineno == 2  # ast.walk reaches imports inside functions
