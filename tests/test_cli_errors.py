"""User mistakes on the command line: one line naming the fix, exit 2, never a traceback; and no
result silently written over another."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.data import DM05, IMAGES, MODELS

BIRD = IMAGES / "bird.bmp"


def cli(*args: str, env_extra=None, cwd=None) -> subprocess.CompletedProcess:
    env = dict(os.environ, **(env_extra or {}))
    return subprocess.run([sys.executable, "-m", "edge_agent", *args], capture_output=True, text=True,
                          timeout=120, env=env, cwd=cwd)


def one_line_error(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    return lines[-1]


def test_out_that_is_a_file_or_cannot_be_made(tmp_path):
    existing = tmp_path / "result"
    existing.write_text("keep me")
    line = one_line_error(cli("segment", str(BIRD), "-m", str(DM05), "--out", str(existing)))
    assert "exists and is not a directory" in line and existing.read_text() == "keep me"
    line = one_line_error(cli("segment", str(BIRD), "-m", str(DM05), "--out", "/proc/edge-agent-x"))
    assert "--out /proc/edge-agent-x: cannot create the directory" in line


def test_a_directory_as_image_names_the_fix():
    line = one_line_error(cli("segment", str(IMAGES), "-m", str(DM05)))
    assert "is a directory" in line and "*.jpg" in line


def test_threads_must_be_positive():
    line = one_line_error(cli("segment", str(BIRD), "-m", str(DM05), "--threads", "-3"))
    assert "--threads: expected an integer >= 1, got -3" in line


def test_models_alone_names_its_commands():
    line = one_line_error(cli("models"))
    assert "{list,fetch}" in line and "models_cmd" not in line


def test_two_images_with_one_name_get_two_results(tmp_path):
    for d in ("d1", "d2"):
        (tmp_path / d).mkdir()
        shutil.copy(BIRD, tmp_path / d / "x.bmp")
    out = tmp_path / "out"
    proc = cli("segment", str(tmp_path / "d1" / "x.bmp"), str(tmp_path / "d2" / "x.bmp"), "-m", str(DM05),
               "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in out.iterdir()) == ["d1_x_mask.png", "d1_x_overlay.png",
                                                    "d2_x_mask.png", "d2_x_overlay.png"]
    assert [line.split()[0] for line in proc.stdout.splitlines()] == ["d1_x.bmp", "d2_x.bmp"]


def test_the_same_image_twice_is_one_result_and_deeper_clashes_stay_apart(tmp_path):
    proc = cli("segment", str(BIRD), str(BIRD), "-m", str(DM05), "--out", str(tmp_path / "once"))
    assert proc.returncode == 0 and len(proc.stdout.splitlines()) == 1, proc
    for d in ("a/b", "c/b"):
        (tmp_path / d).mkdir(parents=True)
        shutil.copy(BIRD, tmp_path / d / "x.bmp")
    out = tmp_path / "out"
    proc = cli("segment", str(tmp_path / "a/b/x.bmp"), str(tmp_path / "c/b/x.bmp"), "-m", str(DM05),
               "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in out.iterdir()) == ["a_b_x_mask.png", "a_b_x_overlay.png",
                                                    "c_b_x_mask.png", "c_b_x_overlay.png"]


def test_inspect_by_name_knows_the_classes_as_segment_does(tmp_path):
    env = {"EDGE_AGENT_MODELS_DIR": str(tmp_path / "models")}
    name = "deeplabv3_mnv2_dm05_pascal_quant"
    fetched = cli("models", "fetch", name, "--mirror", str(MODELS), env_extra=env)
    assert fetched.returncode == 0, fetched.stderr
    report = cli("inspect", name, env_extra=env)
    assert report.returncode == 0, report.stderr
    classes = next(line for line in report.stdout.splitlines() if line.startswith("classes"))
    assert "21: background, aeroplane" in classes and "unknown" not in classes
    seg = cli("segment", str(BIRD), "-m", name, "--out", str(tmp_path / "out"), env_extra=env)
    assert "bird" in seg.stdout


@pytest.mark.parametrize("command", ["rebuild", "edgetpu-check", "ptq"])
def test_host_tools_usage_names_edge_agent_host(command):
    """(Where TensorFlow is missing this is the one-line install hint; the host venv prints usage.)"""
    proc = cli("host", command, "--help")
    text = proc.stdout + proc.stderr
    assert "Traceback" not in text
    assert "python -m tools.host" not in text
