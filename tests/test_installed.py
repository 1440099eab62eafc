"""CI stage "installed": the wheel, installed outside the checkout, used the way a user uses it.

The wheel is built once from a copy of the checkout; each supported Python (3.11 as Debian
bookworm / Raspberry Pi OS bookworm, 3.13 as trixie) gets one clean venv in a temporary
directory. Every command runs with its cwd there, without PYTHONPATH and without ``../shared``
on any path or in the environment: the model files come from a temporary mirror directory and
the images from a temporary folder (copies made here, never in the repository).

Then ``service install --root STAGING`` for real (venv + wheel + config + unit), the staged
agent's own command line with only its generated config and what systemd and the user would
set, a real mosquitto receiving its masks, and ``service uninstall --purge`` leaving no file.

Run: ``SUITES=installed bash tools/test.sh`` (or ``pytest -m installed tests/test_installed.py``).
"""

from __future__ import annotations

import glob
import hashlib
import os
import shutil
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence

import numpy as np
import pytest

from edge_agent.output.encode import decode_mask_png
from edge_agent.config import sanitise_device_id
from edge_agent.models import catalog
from tests.broker import Recorder
from tests.data import BIRD, DM05, DM10, IMAGES, REPO, SHARED
from tests.helpers import can_unshare_mounts

pytestmark = [pytest.mark.installed, pytest.mark.slow]

CLI_MODEL = "deeplabv3_mnv2_dm05_pascal_quant"  # the small one for the CLI commands
PYTHONS = ("3.11", "3.13")
# Directories a real root always has: all that may remain of a staging root after a purge.
SYSTEM_DIRS = {"etc", "etc/systemd", "etc/systemd/system", "opt", "var", "var/lib"}


def find_python(version: str) -> str:
    """The interpreter for ``version``: $EDGE_AGENT_TEST_PYTHON<MAJ><MIN>, Debian's, pyenv's, PATH's."""
    override = os.environ.get("EDGE_AGENT_TEST_PYTHON" + version.replace(".", ""))
    pyenv = os.environ.get("PYENV_ROOT") or os.path.expanduser("~/.pyenv")
    candidates = ([override] if override else []) + [
        f"/usr/bin/python{version}",
        *sorted(glob.glob(f"{pyenv}/versions/{version}.*/bin/python3"), reverse=True),
        shutil.which(f"python{version}") or "",
    ]
    for candidate in filter(None, candidates):
        if os.access(candidate, os.X_OK):
            return candidate
    pytest.fail(f"Python {version} not found (looked for /usr/bin/python{version}, "
                f"{pyenv}/versions/{version}.*/bin/python3, python{version} on PATH): install it "
                f"(pyenv install {version}) or set EDGE_AGENT_TEST_PYTHON{version.replace('.', '')}",
                pytrace=False)


def user_env(home: Path, **extra: str) -> Dict[str, str]:
    """This machine's environment as a user's shell has it, minus what the test process added
    (any variable naming the checkout, e.g. LD_LIBRARY_PATH set by importing cv2) and any active
    venv; models go to a private XDG cache, pip keeps its shared cache."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "XDG_CACHE_HOME")
           and not k.startswith(("EDGE_AGENT_", "PYTEST_"))
           and str(REPO) not in v and str(SHARED.parent) not in v}
    env["PIP_CACHE_DIR"] = os.environ.get("PIP_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "pip")
    env.update(XDG_CACHE_HOME=str(home / "cache"), PIP_NO_INPUT="1",
               PIP_DISABLE_PIP_VERSION_CHECK="1", **extra)
    return env


def run(cmd: Sequence[str], cwd: Path, env: Dict[str, str], timeout: float = 600,
        ok: bool = True) -> subprocess.CompletedProcess:
    """Run as a user outside the checkout: refuses a cwd, argument or variable naming the
    checkout or ../shared, so the stage cannot pass by reaching back into the repository."""
    for text in [str(cwd), *cmd, *env.values()]:
        assert str(SHARED.parent) not in text and str(REPO) not in text, f"checkout path leaked: {text}"
    proc = subprocess.run(list(map(str, cmd)), cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)
    if ok:
        assert proc.returncode == 0, (f"{' '.join(map(str, cmd))} exited {proc.returncode}\n"
                                      f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}")
    return proc


@dataclass
class Installed:
    """One clean venv with the wheel installed, and the user's surroundings."""

    version: str
    python: str
    venv: Path
    home: Path  # cwd of every command, and the parent of the private XDG cache
    env: Dict[str, str]
    wheel: Path
    mirror: Path
    images: Path

    def cli(self, *args: str, **kwargs) -> subprocess.CompletedProcess:
        return run([str(self.venv / "bin" / "edge-agent"), *args], self.home, self.env, **kwargs)


@pytest.fixture(scope="module")
def outside(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("installed")
    assert REPO not in base.parents and SHARED not in base.parents
    return base


@pytest.fixture(scope="module")
def wheel(outside: Path) -> Path:
    """``pip wheel --no-deps`` of a copy of the checkout (the build writes build/ and egg-info
    into its source tree: the copy keeps the checkout untouched)."""
    src = outside / "src"
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            cwd=REPO, capture_output=True)
    if listed.returncode == 0:
        for rel in filter(None, listed.stdout.decode().split("\0")):
            if (REPO / rel).is_file():
                (src / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(REPO / rel, src / rel)
    else:  # not a git checkout (a source tarball)
        shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(
            ".git", ".venv*", "build", "dist", "*.egg-info", "__pycache__", "out", ".pytest_cache"))
    dist = outside / "dist"
    env = user_env(outside)
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(dist),
                           str(src)], cwd=outside, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    wheels = list(dist.glob("edge_agent-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


@pytest.fixture(scope="module")
def mirror(outside: Path) -> Path:
    """A local model mirror: the manifest's file names, copies of the real test models."""
    path = outside / "mirror"
    path.mkdir()
    for model in (DM05, DM10):
        shutil.copy2(model, path / model.name)
    return path


@pytest.fixture(scope="module")
def images(outside: Path) -> Path:
    path = outside / "images"
    path.mkdir()
    for image in (BIRD, IMAGES / "cat.bmp"):
        shutil.copy2(image, path / image.name)
    return path


@pytest.fixture(scope="module", params=PYTHONS, ids=[f"py{v}" for v in PYTHONS])
def installed(request, outside: Path, wheel: Path, mirror: Path, images: Path) -> Iterator[Installed]:
    version = request.param
    python = find_python(version)
    home = outside / f"user-py{version}"
    home.mkdir()
    env = user_env(home)
    reported = run([python, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"], home, env)
    assert reported.stdout.strip() == version, f"{python} is Python {reported.stdout.strip()}"
    venv = home / "venv"
    run([python, "-m", "venv", str(venv)], home, env)
    run([str(venv / "bin" / "pip"), "install", "-q", str(wheel)], home, env)
    yield Installed(version, python, venv, home, env, wheel, mirror, images)


def classes_of(summary: str) -> str:
    """'bird.bmp 513x513: background 81.3%, bird 17.1% | timings | runtime' -> the classes part."""
    head, _, rest = summary.partition(": ")
    return head + ": " + rest.split(" | ")[0]


def test_cli_from_the_wheel_gives_the_checkouts_results(installed: Installed, tmp_path: Path) -> None:
    where = run([str(installed.venv / "bin" / "python"), "-c",
                 "import edge_agent, sys; print(edge_agent.__file__); print(sys.prefix)"],
                installed.home, installed.env).stdout.split()
    assert Path(where[0]).is_relative_to(installed.venv), f"edge_agent imported from {where[0]}"

    listed = installed.cli("models", "list").stdout
    manifest = catalog.load_manifest()
    for name in manifest.models:
        assert name in listed, listed

    fetched = installed.cli("models", "fetch", CLI_MODEL, "--mirror", str(installed.mirror))
    assert "sha256 ok" in fetched.stdout and "(100%)" in fetched.stdout + fetched.stderr, fetched
    stored = installed.home / "cache" / "edge-agent" / "models" / DM05.name
    assert catalog.sha256_file(stored) == manifest.get(CLI_MODEL).sha256

    image = installed.images / BIRD.name
    wheel_out, checkout_out = installed.home / "out", tmp_path / "checkout-out"
    from_wheel = installed.cli("segment", str(image), "-m", CLI_MODEL, "--out", str(wheel_out))
    # the same command from the checkout's venv (editable install), same models dir
    checkout_cli = Path(sys.executable).with_name("edge-agent")
    from_checkout = subprocess.run(
        [str(checkout_cli), "segment", str(image), "-m", CLI_MODEL, "--out", str(checkout_out)],
        cwd=REPO, env=installed.env, capture_output=True, text=True, timeout=300)
    assert from_checkout.returncode == 0, from_checkout.stderr
    line_w, line_c = from_wheel.stdout.strip(), from_checkout.stdout.strip()
    assert classes_of(line_w) == classes_of(line_c), (line_w, line_c)
    assert "bird" in classes_of(line_w) and "INFO: Created TensorFlow Lite" not in from_wheel.stderr
    # masks are palette PNGs of the class ids: compare the ids
    mask_w = decode_mask_png((wheel_out / "bird_segmentation_mask.png").read_bytes())
    mask_c = decode_mask_png((checkout_out / "bird_segmentation_mask.png").read_bytes())
    assert mask_w.shape == mask_c.shape
    assert np.mean(mask_w == mask_c) > 0.999

    inspected = installed.cli("inspect", CLI_MODEL).stdout
    assert "[1, 513, 513, 3]" in inspected and manifest.get(CLI_MODEL).sha256 in inspected


def files_left(root: Path) -> List[str]:
    """Everything under ``root`` except the empty system directories a real root always has."""
    left = []
    for dirpath, dirnames, filenames in os.walk(root):
        rel = Path(dirpath).relative_to(root)
        for name in filenames:
            left.append(str(rel / name))
        for name in dirnames:
            path = Path(dirpath, name)
            if path.is_symlink() or str(rel / name) not in SYSTEM_DIRS:
                left.append(str(rel / name) + "/")
    return sorted(left)


@pytest.mark.broker
def test_service_from_the_wheel_fetches_its_model_and_publishes_masks(
        installed: Installed, mosquitto, tmp_path: Path) -> None:
    staging = installed.home / "staging"
    result = installed.cli("service", "install", "--root", str(staging), "--package",
                           str(installed.wheel), "--python", installed.python, timeout=900)
    assert "Done." in result.stdout, result.stdout
    agent = staging / "opt/edge-agent/venv/bin/edge-agent"
    config = staging / "etc/edge-agent/config.toml"
    default = catalog.load_manifest().default
    assert default and f'name = "{default}"' in config.read_text()
    assert (staging / "etc/systemd/system/multi-user.target.wants/edge-agent.service").is_symlink()
    staged_version = run([str(agent.with_name("python")), "-c",
                          "import sys; print('%d.%d' % sys.version_info[:2])"],
                         installed.home, installed.env).stdout.strip()
    assert staged_version == installed.version

    # what systemd gives the unit (StateDirectory=, WorkingDirectory=, Environment=) plus the
    # user's settings: the mirror (no internet here), the test broker's port, a folder as camera
    state = staging / "var/lib/edge-agent"
    state.mkdir(parents=True)
    broker = mosquitto()
    env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
           "HOME": str(state), "LANG": "C.UTF-8", "PYTHONUNBUFFERED": "1",
           "STATE_DIRECTORY": str(state),
           "EDGE_AGENT_MODEL_MIRROR": str(installed.mirror),
           "EDGE_AGENT_MQTT_PORT": str(broker.port),
           "EDGE_AGENT_SOURCE_URI": str(installed.images)}
    device = sanitise_device_id(socket.gethostname())
    recorder = Recorder(broker.host, broker.port, topics=f"edge-agent/{device}/#")
    log_path = tmp_path / "agent.log"
    # The staged tree is a packaging root: its scripts name /opt/edge-agent/venv. Run it there, in a
    # private mount namespace where the staged /opt/edge-agent is bind-mounted at its final path.
    final = "/opt/edge-agent"
    if can_unshare_mounts():
        cmd = ["unshare", "-m", "--propagation", "private", "sh", "-ec",
               f'mount -t tmpfs tmpfs /opt; mkdir -p {final}; mount --bind "$0" {final}; exec "$@"',
               str(staging / final.lstrip("/")), f"{final}/venv/bin/edge-agent", "run", "--config", str(config)]
    else:  # no mount namespaces here: the staged python runs the script (its #! names the final path)
        cmd = [str(agent.with_name("python")), str(agent), "run", "--config", str(config)]
    assert agent.read_text().startswith(f"#!{final}/venv/bin/python"), agent.read_text()[:200]
    for text in [*cmd, *env.values()]:
        assert str(REPO) not in text and str(SHARED.parent) not in text
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=state, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        try:
            masks = recorder.wait_for(f"edge-agent/{device}/mask", timeout=120)
        except AssertionError as err:
            raise AssertionError(f"{err}\nagent log:\n{log_path.read_text()[-3000:]}") from None
        mask = decode_mask_png(masks[0].payload)
        assert mask.ndim == 2 and mask.max() <= 20 and mask.max() > 0
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            code: Optional[int] = proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = proc.wait(10)
        recorder.close()
    log_text = log_path.read_text()
    assert code == 0, log_text[-3000:]
    entry = catalog.load_manifest().get(default)
    fetched = state / "catalog" / entry.file
    assert fetched.is_file() and hashlib.sha256(fetched.read_bytes()).hexdigest() == entry.sha256
    assert f"{default}: " in log_text and "(100%)" in log_text, log_text[-3000:]

    removed = installed.cli("service", "uninstall", "--root", str(staging), "--purge")
    assert "remove" in removed.stdout
    assert files_left(staging) == [], f"left behind in {staging}: {files_left(staging)}"
