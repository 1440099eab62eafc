"""`edge-agent host ...` where the host tools cannot run (the device install: no TensorFlow).

Every host command says in one line what to install and exits 2, never a traceback; `--help`
still shows the commands, under the name the user typed (`edge-agent host`), plus the same hint.
Runs the real CLI in this (device) venv; where TensorFlow is installed there is nothing to test.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
HINT = "pip install 'edge-agent[host]'"

pytestmark = pytest.mark.skipif(importlib.util.find_spec("tensorflow") is not None,
                                reason="TensorFlow is installed: the host tools run here")


def edge_agent(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edge_agent", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("args", [
    ["rebuild", "coral.tflite", "-o", "out/m.keras"],
    ["ptq", "out/m.keras", "-o", "out/m.tflite"],
    ["qat", "out/m.keras", "-o", "out/m.tflite", "--voc", "voc"],
    ["evaluate", "a.tflite", "b.tflite", "--voc", "voc"],
    ["edgetpu-check", "m.tflite"],
    ["build", "-o", "out/m.keras"],
    ["convert-frozen", "g.pb", "-o", "m.tflite", "--input-array", "a", "--output-arrays", "b",
     "--input-size", "513"],
    ["rebuild"],  # missing arguments: what to install comes first
    [],
], ids=lambda args: " ".join(args[:1]) or "no-command")
def test_every_host_command_says_what_to_install_in_one_line(args):
    proc = edge_agent("host", *args)
    assert proc.returncode == 2, proc.stderr
    out = proc.stdout + proc.stderr
    assert "Traceback" not in out
    lines = out.strip().splitlines()
    assert len(lines) == 1, out
    assert HINT in lines[0] and "TensorFlow" in lines[0], lines[0]


@pytest.mark.parametrize("args", [["--help"], ["rebuild", "--help"], ["-h"]])
def test_help_still_works_and_names_edge_agent_host(args):
    proc = edge_agent("host", *args)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: edge-agent host"), proc.stdout
    assert "python -m tools.host" not in proc.stdout
    assert f"Not installed here: {HINT}" in proc.stdout
    assert "Traceback" not in proc.stdout + proc.stderr
