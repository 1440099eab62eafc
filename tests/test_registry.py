"""Runtime and source registries: a new backend is one file, and config + CLI accept it.

The plugins below are installed the way a user's package would be: a one-file module plus a
``*.dist-info`` with ``entry_points.txt`` on the import path, exercised in fresh subprocesses so the
registries are discovered from scratch.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Dict, List

import pytest

from edge_agent.config import ConfigError, load_config
from edge_agent.inference import runtimes
from edge_agent.sources import BaseSource, available_kinds, backend_for, is_live, register
from tests.data import BIRD, DM05, LABELS

RUNTIME_PLUGIN = '''
"""A vendor build of LiteRT, installed under its own name."""
from edge_agent.inference.runtimes import package_backend

BACKEND = package_backend("vendor-litert", 90, "ai_edge_litert")
'''

SOURCE_PLUGIN = '''
"""A camera that draws a ramp: live, so the pipeline drops frames to keep up."""
import numpy as np

from edge_agent.sources.base import BaseSource


class RampCamera(BaseSource):
    kind = "rampcam"
    live = True

    def open(self):
        self._n = 0

    def close(self):
        pass

    def _read(self, timeout):
        self._n += 1
        ramp = np.arange(self.settings.width, dtype=np.uint8)
        return np.ascontiguousarray(np.broadcast_to(ramp[None, :, None] + self._n,
                                                    (self.settings.height, self.settings.width, 3)))


BACKEND = RampCamera
'''

FORGETFUL_PLUGIN = '''
from edge_agent.sources.base import BaseSource


class ForgetfulCamera(BaseSource):
    kind = "forgetful"

    def open(self):
        pass
'''


@pytest.fixture
def plugins(tmp_path: Path) -> Path:
    """An import path holding three one-file plugins and the metadata pip would have written."""
    root = tmp_path / "site"
    root.mkdir()
    (root / "vendor_litert.py").write_text(RUNTIME_PLUGIN)
    (root / "rampcam.py").write_text(SOURCE_PLUGIN)
    (root / "forgetful.py").write_text(FORGETFUL_PLUGIN)
    dist = root / "edge_agent_test_plugins-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: edge-agent-test-plugins\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(textwrap.dedent("""\
        [edge_agent.runtimes]
        vendor-litert = vendor_litert

        [edge_agent.sources]
        rampcam = rampcam
        forgetful = forgetful:ForgetfulCamera
        """))
    return root


def run(args: List[str], pythonpath: str = "", cwd: Path = Path(".")) -> subprocess.CompletedProcess:
    env: Dict[str, str] = {k: v for k, v in os.environ.items() if not k.startswith("EDGE_AGENT_")}
    env["PYTHONPATH"] = pythonpath
    return subprocess.run([sys.executable, *args], env=env, cwd=str(cwd), capture_output=True,
                          text=True, timeout=120)


def cli(args: List[str], pythonpath: str = "", cwd: Path = Path(".")) -> subprocess.CompletedProcess:
    return run(["-m", "edge_agent", *args], pythonpath, cwd)


def test_plugins_are_accepted_by_config_validation(plugins):
    code = textwrap.dedent("""
        from edge_agent.config import load_config
        cfg = load_config(None, ["model.runtime=vendor-litert", "source.kind=rampcam"], env={})
        print(cfg.model.runtime, cfg.source.kind)
    """)
    done = run(["-c", code], str(plugins))
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["vendor-litert", "rampcam"]


def test_plugins_are_accepted_by_the_cli(plugins, tmp_path):
    check = cli(["config", "check", "--set", "model.runtime=vendor-litert", "--set", "source.kind=rampcam",
                 "--set", f"model.path={DM05}", "--no-model"], str(plugins))
    assert check.returncode == 0, check.stderr
    assert "source rampcam" in check.stdout
    for command in ("segment", "bench", "inspect"):
        usage = cli([command, "--help"], str(plugins))
        assert usage.returncode == 0 and "{auto,litert,tflite-runtime,tensorflow,vendor-litert}" in usage.stdout

    # the plugin runtime really runs the model, and says so
    seg = cli(["segment", str(BIRD), "--model", str(DM05), "--labels", str(LABELS), "--runtime", "vendor-litert",
               "--out", str(tmp_path / "out")], str(plugins))
    assert seg.returncode == 0, seg.stderr
    assert "bird" in seg.stdout and "| vendor-litert " in seg.stdout
    bench = cli(["bench", "--model", str(DM05), "--runtime", "vendor-litert", "--runs", "2", "--json"],
                str(plugins))
    assert bench.returncode == 0, bench.stderr
    assert '"runtime": "vendor-litert' in bench.stdout


def test_without_the_plugins_the_names_are_refused_in_one_line(plugins):
    check = cli(["config", "check", "--set", "source.kind=rampcam", "--set", f"model.path={DM05}", "--no-model"])
    assert check.returncode == 2
    assert check.stderr.strip() == ("edge-agent: config error: source.kind: expected one of 'folder', "
                                    "'opencv', 'picamera2', 'synthetic', got 'rampcam' (from --set)")
    seg = cli(["segment", str(BIRD), "--model", str(DM05), "--runtime", "vendor-litert"])
    assert seg.returncode == 2 and "invalid choice: 'vendor-litert'" in seg.stderr


def test_a_plugin_source_opens_and_reports_live(plugins):
    code = textwrap.dedent("""
        from edge_agent import sources
        settings = {"kind": "rampcam", "width": 8, "height": 4}
        src = sources.open_source(settings)
        frame = src.read(1.0)
        src.close()
        print(sources.is_live(settings), src.live, frame.image.shape, frame.image[0, :3, 0].tolist())
    """)
    done = run(["-c", code], str(plugins))
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "True True (4, 8, 3) [1, 2, 3]"


def test_a_source_plugin_without_live_is_refused_and_named(plugins):
    """A broken plugin does not stop the others; asking for it says why it is missing."""
    check = cli(["config", "check", "--set", "source.kind=forgetful"], str(plugins))
    assert check.returncode == 2
    assert ("plugin forgetful = forgetful:ForgetfulCamera (edge_agent.sources) not loaded: TypeError: "
            "source backend forgetful.ForgetfulCamera: declare live = True") in check.stderr
    assert "source.kind: expected one of 'folder', 'opencv', 'picamera2', 'rampcam', 'synthetic'" in check.stderr
    code = "from edge_agent.sources import backend_for\nbackend_for('forgetful')"
    done = run(["-c", code], str(plugins))
    assert "unknown source kind 'forgetful'" in done.stderr
    assert "plugin 'forgetful' failed to load: TypeError: source backend forgetful.ForgetfulCamera" in done.stderr


# -- in-process: the built-in registries ------------------------------------------------------


def test_builtin_backends_are_discovered_and_declare_live():
    assert available_kinds() == ("folder", "opencv", "picamera2", "synthetic")
    assert {k: backend_for(k).live for k in available_kinds()} == {
        "folder": False, "opencv": True, "picamera2": True, "synthetic": False}
    assert is_live({"kind": "opencv", "uri": "/dev/video0"}) and is_live({"kind": "opencv", "uri": "rtsp://cam/s"})
    assert not is_live({"kind": "opencv", "uri": "clip.mp4"})  # a file is replayed losslessly
    assert runtimes.choices()[:3] == ["auto", "litert", "tflite-runtime"]


def test_register_refuses_an_undeclared_live_a_bad_kind_and_a_taken_kind():
    class NoLive(BaseSource):
        kind = "nolive"

    class BadKind(BaseSource):
        kind = "Bad Kind"
        live = False

    class Impostor(BaseSource):
        kind = "opencv"
        live = False

    with pytest.raises(TypeError, match=r"NoLive: declare live = True \(camera or stream"):
        register(NoLive)
    with pytest.raises(TypeError, match="declare kind = '<name>'"):
        register(BadKind)
    with pytest.raises(ValueError, match="kind 'opencv' is already taken by edge_agent.sources.opencv.OpenCVSource"):
        register(Impostor)
    assert available_kinds() == ("folder", "opencv", "picamera2", "synthetic")
    with pytest.raises(ValueError, match="'auto' is already taken"):
        runtimes.register(runtimes.package_backend("auto", 1, "ai_edge_litert"))
    with pytest.raises(ValueError, match="'tflite' is already taken"):
        runtimes.register(runtimes.package_backend("mine", 1, "ai_edge_litert", aliases=("tflite",)))
    with pytest.raises(TypeError, match="is not a RuntimeBackend"):
        runtimes.register(object())  # type: ignore[arg-type]


def test_config_checks_registry_names_only_when_given():
    """Loading a config that names no runtime or source never touches the registries' choices."""
    with pytest.raises(ConfigError, match=r"model.runtime: expected one of 'auto', 'litert', 'tflite-runtime', "
                                          r"'tensorflow', got 'tpu'"):
        load_config(None, ["model.runtime=tpu"], env={})
    done = run(["-c", "import sys, edge_agent.config as c; c.load_config(None, env={}); "
                      "print(sorted(m for m in sys.modules if m.startswith(('edge_agent.sources', "
                      "'edge_agent.inference', 'cv2', 'numpy'))))"])
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
