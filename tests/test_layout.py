"""The package layout: what the README's Layout section promises, checked against the tree."""

from __future__ import annotations

import ast
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import tomllib

REPO = Path(__file__).resolve().parents[1]
PKG = REPO / "edge_agent"


def _imports(path: Path):
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            yield node.module


def test_top_level_holds_only_the_bottom_layer():
    """Loose top-level modules are the layer everything may import (config, its schema framework,
    errors, host facts); anything else belongs in a package of its layer (tests/test_imports.py)."""
    modules = sorted(p.name for p in PKG.glob("*.py"))
    assert modules == ["__init__.py", "__main__.py", "config.py", "errors.py", "schema.py", "system.py"], modules


def test_domain_modules_do_not_import_argparse():
    offenders = [str(p.relative_to(REPO)) for p in PKG.rglob("*.py")
                 if "cli" not in p.relative_to(PKG).parts and "argparse" in set(_imports(p))]
    assert offenders == []


def test_pyproject_lists_every_package():
    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    on_disk = {".".join(p.parent.relative_to(REPO).parts) for p in PKG.rglob("__init__.py")}
    assert on_disk | {"edge_agent_host"} == listed
    assert config["package-dir"] == {"edge_agent_host": "tools/host"}
    assert all(name.startswith("edge_agent") for name in listed)


@pytest.mark.slow
def test_wheel_top_level_packages_are_edge_agent_only(tmp_path):
    """The wheel installs ``edge_agent`` and ``edge_agent_host`` (never a generic ``tools``) with its data."""
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps",
                           "-q", "-w", str(tmp_path), str(REPO)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    wheel = next(tmp_path.glob("edge_agent-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith((".dist-info", ".data"))}
    assert tops == {"edge_agent", "edge_agent_host"}
    for data in ("manifest.json", "edge-agent.service", "config.example.toml"):
        assert f"edge_agent/data/{data}" in names
    assert "edge_agent_host/ptq.py" in names


def test_every_module_imports_and_the_cli_builds():
    """A stale import anywhere (a name moved to another module) breaks every command at start."""
    code = ("import importlib, pkgutil, edge_agent\n"
            "for m in pkgutil.walk_packages(edge_agent.__path__, 'edge_agent.'):\n"
            "    if not m.name.endswith('__main__'):\n"
            "        importlib.import_module(m.name)\n"
            "from edge_agent.cli import build_parser\n"
            "build_parser()\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr


def _readme_layout() -> list:
    text = (REPO / "README.md").read_text()
    block = text.split("## Layout", 1)[1].split("```", 2)[1]
    return [line.split()[0] for line in block.splitlines() if line.startswith("  ") and line.split()
            and line.split()[0].endswith("/")]


def test_readme_layout_lists_each_package_once_and_all_of_them():
    listed = _readme_layout()
    assert len(listed) == len(set(listed)), sorted(n for n in listed if listed.count(n) > 1)
    on_disk = {p.parent.name + "/" for p in PKG.glob("*/__init__.py")} | {"data/"}
    assert set(listed) == on_disk, (set(listed) ^ on_disk)


def test_readme_host_commands_exist():
    text = (REPO / "README.md").read_text()
    named = set()
    for line in text.splitlines():
        if "edge-agent host {" in line:
            named |= set(line.split("edge-agent host {", 1)[1].split("}", 1)[0].split(","))
    assert named, "the README names the host commands"
    source = (REPO / "tools" / "host" / "__main__.py").read_text()
    defined = {node.args[0].value for node in ast.walk(ast.parse(source))
               if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "add_parser"
               and node.args and isinstance(node.args[0], ast.Constant)}
    assert named <= defined, named - defined


def test_demo_installs_only_the_device_package_and_its_output_is_ignored():
    script = (REPO / "tools" / "demo.sh").read_text()
    installs = [line for line in script.splitlines() if "pip install" in line]
    assert installs and not any("[dev]" in line or "[host]" in line for line in installs), installs
    ignored = subprocess.run(["git", "check-ignore", "-q", "demo-out/frame_overlay.jpg"], cwd=REPO)
    assert ignored.returncode == 0, "demo-out/ is not ignored by git"
