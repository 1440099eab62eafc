"""The systemd unit (systemd-analyze verify + security) and `edge-agent service install`.

The unit is checked with the real systemd-analyze; the installer runs for real into a staging
root (venv, config, unit, `systemctl --root enable`) and as a dry run against this host's
layout (which must print, never perform, useradd/systemctl).
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path
from typing import Dict, List

import pytest

from edge_agent.provision import service
from tests.data import DM05, FLOAT_257

REPO = Path(__file__).resolve().parents[1]
UNIT = REPO / "edge_agent" / "data" / "edge-agent.service"
MAX_EXPOSURE = 3.0

needs_analyze = pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                                   reason="systemd-analyze is not installed")


def unit_settings(text: str) -> Dict[str, List[str]]:
    """Key -> all values (units repeat keys such as DeviceAllow=)."""
    out: Dict[str, List[str]] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line[0] in "#;[" or "=" not in line:
            continue
        key, value = line.split("=", 1)
        out.setdefault(key.strip(), []).append(value.strip())
    return out


def verifiable_copy(tmp_path: Path, text: str) -> Path:
    """The unit with ExecStart pointing at an executable that exists (verify checks it)."""
    exe = tmp_path / "bin" / "edge-agent"
    exe.parent.mkdir(parents=True, exist_ok=True)
    exe.write_text("#!/bin/sh\nexit 0\n")
    exe.chmod(0o755)
    path = tmp_path / "edge-agent.service"
    path.write_text(text.replace("/opt/edge-agent/venv/bin/edge-agent", str(exe)))
    return path


def test_unit_declares_the_service_contract():
    s = unit_settings(UNIT.read_text())
    assert s["Type"] == ["notify"] and s["NotifyAccess"] == ["main"]
    assert s["ExecStart"] == [
        "/opt/edge-agent/venv/bin/edge-agent run --config /etc/edge-agent/config.toml"]
    # the shell's builtin kill: /bin/kill is not on every system (tests/test_systemd_real.py)
    assert s["ExecReload"] == ['/bin/sh -c "kill -HUP ${MAINPID}"']
    assert s["WatchdogSec"] == ["30"] and s["Restart"] == ["on-failure"]
    assert s["User"] == ["edge-agent"] and s["SupplementaryGroups"] == ["video"]
    assert s["StateDirectory"] == ["edge-agent"] and s["ConfigurationDirectory"] == ["edge-agent"]
    # Optional credential: a relative source is looked up in /etc/credstore etc. and skipped
    # when absent; an absolute path would fail the start (243/CREDENTIALS) without the file.
    cred_id, cred_source = s["LoadCredential"][0].split(":", 1)
    assert cred_id == "mqtt_password" and not cred_source.startswith("/")
    assert s["DevicePolicy"] == ["closed"] and "PrivateDevices" not in s
    assert {"char-video4linux rw", "char-media rw", "char-dma_heap rw", "char-apex rw",
            "char-usb_device rw"} <= set(s["DeviceAllow"])
    for key in ("NoNewPrivileges", "ProtectHome", "PrivateTmp", "MemoryDenyWriteExecute"):
        assert s[key] == ["yes"], key
    assert s["ProtectSystem"] == ["strict"] and s["UMask"] == ["0077"]


@needs_analyze
def test_systemd_analyze_verify_passes(tmp_path):
    unit = verifiable_copy(tmp_path, UNIT.read_text())
    proc = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True,
                          text=True, timeout=60)
    complaints = [l for l in (proc.stdout + proc.stderr).splitlines() if "edge-agent" in l]
    assert proc.returncode == 0 and not complaints, proc.stdout + proc.stderr


@needs_analyze
def test_systemd_analyze_security_exposure(tmp_path):
    unit = verifiable_copy(tmp_path, UNIT.read_text())
    proc = subprocess.run(["systemd-analyze", "security", "--offline=yes", str(unit)],
                          capture_output=True, text=True, timeout=60)
    line = next((l for l in proc.stdout.splitlines() if "Overall exposure level" in l), "")
    print(f"\nsystemd-analyze security: {line.strip()}")
    match = re.search(r"Overall exposure level for edge-agent\.service: ([0-9.]+)", line)
    assert match, proc.stdout + proc.stderr
    assert float(match.group(1)) <= MAX_EXPOSURE


PROBE = r"""
import ctypes, mmap, sys
libc = ctypes.CDLL(None, use_errno=True)
if libc.prctl(65, 1, 0, 0, 0) != 0:  # PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN (Linux >= 6.3)
    print("NO-MDWE"); sys.exit(0)
try:
    mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    print("W+X mapping was allowed: MDWE not in force"); sys.exit(3)
except OSError:
    pass
ctypes.CFUNCTYPE(None, ctypes.c_char_p)(lambda s: None)(b"x")  # as load_delegate() does
import numpy as np, cv2, paho.mqtt.client
from edge_agent.inference.segmenter import Segmenter
for path in sys.argv[1:]:
    seg = Segmenter(path)
    out = seg.segment(np.zeros((120, 160, 3), np.uint8))
    assert out.mask.shape == (120, 160)
print("OK")
"""


def test_runtime_works_under_memory_deny_write_execute():
    """Backs MemoryDenyWriteExecute=yes in the unit: the same W^X rule enforced by the kernel
    (prctl PR_SET_MDWE) while LiteRT + XNNPACK run the quantized and the float model."""
    proc = subprocess.run([sys.executable, "-c", PROBE, str(DM05), str(FLOAT_257)],
                          capture_output=True, text=True, timeout=120, cwd=REPO)
    if proc.stdout.strip() == "NO-MDWE":
        pytest.skip("kernel without PR_SET_MDWE (Linux < 6.3)")
    assert proc.returncode == 0 and proc.stdout.strip().endswith("OK"), proc.stdout + proc.stderr


@pytest.mark.skipif(shutil.which("strace") is None, reason="strace is not installed")
def test_no_mprotect_exec_which_systemd_seccomp_mdwe_would_refuse(tmp_path):
    """systemd 252 implements MemoryDenyWriteExecute= with seccomp, which also refuses any
    mprotect(PROT_EXEC) (the kernel's MDWE only refuses gaining exec). Trace the same workload
    and require none. The one W+X mmap libffi tries for a ctypes callback is refused by both
    and libffi falls back to a double mapping (the MDWE test above proves the fallback works)."""
    trace = tmp_path / "trace.txt"
    probe = PROBE.replace("if libc.prctl(65, 1, 0, 0, 0) != 0:", "if False:").replace(
        "    mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)\n"
        "    print(\"W+X mapping was allowed: MDWE not in force\"); sys.exit(3)\n", "    pass\n")
    proc = subprocess.run(["strace", "-f", "-qq", "-e", "trace=mprotect,pkey_mprotect", "-o",
                           str(trace), sys.executable, "-c", probe, str(DM05), str(FLOAT_257)],
                          capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("OK"), proc.stdout + proc.stderr
    calls = trace.read_text().splitlines()
    assert calls, "strace recorded nothing"
    assert [c for c in calls if "PROT_EXEC" in c] == []


# --------------------------------------------------------------------------- service install


def run_service(*argv: str) -> subprocess.CompletedProcess:
    """The installer as install.sh runs it: `python -m edge_agent.cli.service ...` from the repo."""
    return subprocess.run([sys.executable, "-m", "edge_agent.cli.service", *argv],
                          capture_output=True, text=True, timeout=120, cwd=REPO)


def test_install_dry_run_into_root_changes_nothing(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    proc = subprocess.run(["sh", str(REPO / "systemd" / "install.sh"), "--root", str(root),
                           "--dry-run"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "create system user edge-agent" in out and "skipped: --root" in out
    assert f"would create venv {root}/opt/edge-agent/venv" in out
    assert "-m pip install --upgrade" in out
    assert f"would write {root}/etc/edge-agent/config.toml" in out
    assert f"would install {root}/etc/systemd/system/edge-agent.service" in out
    assert f"$ systemctl --root={root} enable edge-agent.service" in out
    assert list(root.iterdir()) == [], "a dry run must not create anything"


def test_install_dry_run_on_this_host_prints_the_privileged_commands():
    proc = run_service("install", "--dry-run", "--prefix", "/opt/ea-dry")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    if not service.user_exists("edge-agent"):
        assert "$ useradd --system --user-group" in out and " edge-agent\n" in out
    assert "/opt/ea-dry/venv" in out
    assert "$ systemctl daemon-reload" in out and "$ systemctl enable --now edge-agent.service" in out
    assert not Path("/opt/ea-dry").exists()


def test_system_site_packages_venv_keeps_the_system_numpy(tmp_path):
    """apt's picamera2 is built against apt's numpy: a --system-site-packages venv pins it."""
    import numpy

    base = ["install", "--dry-run", "--root", str(tmp_path), "--python", sys.executable,
            "--package", "edge-agent"]
    shared = run_service(*base, "--system-site-packages")
    assert shared.returncode == 0, shared.stderr
    assert f"-m pip install --upgrade edge-agent numpy=={numpy.__version__}\n" in shared.stdout
    isolated = run_service(*base, "--no-system-site-packages")
    assert "-m pip install --upgrade edge-agent\n" in isolated.stdout


def test_install_into_staging_root_is_real_and_idempotent(tmp_path):
    root = tmp_path / "root"
    example = tmp_path / "example.toml"
    example.write_text('[source]\nkind = "synthetic"\n')
    args = ["install", "--root", str(root), "--prefix", "/opt/ea", "--no-package",
            "--python", sys.executable, "--config-example", str(example)]
    first = run_service(*args)
    assert first.returncode == 0, first.stdout + first.stderr
    print(first.stdout)

    venv_python = root / "opt/ea/venv/bin/python"
    assert venv_python.exists()
    ver = subprocess.run([str(venv_python), "-c", "import sys; print(sys.prefix)"],
                         capture_output=True, text=True, timeout=30)
    assert ver.stdout.strip() == str(root / "opt/ea/venv")

    config = root / "etc/edge-agent/config.toml"
    assert config.read_text() == example.read_text()
    assert stat.S_IMODE(config.stat().st_mode) == 0o640
    assert stat.S_IMODE(config.parent.stat().st_mode) == 0o750

    unit = root / "etc/systemd/system/edge-agent.service"
    text = unit.read_text()
    assert "ExecStart=/opt/ea/venv/bin/edge-agent run --config /etc/edge-agent/config.toml" in text
    settings = [l for l in text.splitlines() if l and not l.startswith("#")]
    assert not [l for l in settings if "/opt/edge-agent/" in l], "every path follows --prefix"
    wants = root / "etc/systemd/system/multi-user.target.wants/edge-agent.service"
    if shutil.which("systemctl"):
        assert wants.is_symlink() and os.readlink(wants) == "/etc/systemd/system/edge-agent.service"

    # Idempotent: a second run changes nothing and keeps an edited config.
    config.write_text('[source]\nkind = "opencv"\n')
    second = run_service(*args)
    assert second.returncode == 0, second.stderr
    assert "Nothing to change: already installed." in second.stdout
    assert "* " not in second.stdout.replace("* would", "")  # no action lines
    assert config.read_text() == '[source]\nkind = "opencv"\n'

    # Uninstall keeps config (no --purge), removes unit, symlink and venv.
    gone = run_service("uninstall", "--root", str(root), "--prefix", "/opt/ea")
    assert gone.returncode == 0, gone.stdout + gone.stderr
    assert not unit.exists() and not wants.is_symlink() and not (root / "opt/ea").exists()
    assert config.exists() and "kept (use --purge to remove)" in gone.stdout


def test_purge_removes_the_mqtt_credential_too(tmp_path):
    """The password file the install's note asks for (/etc/credstore/edge-agent.mqtt_password)
    is the service's secret: kept by a plain uninstall, removed by --purge."""
    root = tmp_path / "root"
    args = ["install", "--root", str(root), "--no-package", "--python", sys.executable, "--no-enable"]
    assert run_service(*args).returncode == 0
    credential = root / service.CREDENTIAL_FILE.lstrip("/")
    credential.parent.mkdir(parents=True)
    credential.write_text("s3cret")
    kept = run_service("uninstall", "--root", str(root))
    assert kept.returncode == 0 and credential.exists()
    assert f"- remove {credential}: kept (use --purge to remove)" in kept.stdout
    purged = run_service("uninstall", "--root", str(root), "--purge")
    assert purged.returncode == 0, purged.stdout + purged.stderr
    assert f"* remove {credential}" in purged.stdout and not credential.exists()


def test_installed_unit_verifies(tmp_path):
    """What the installer writes with a non-default prefix is still a valid unit."""
    text = service.render_unit(UNIT.read_text(), "/srv/agent")
    assert "ExecStart=/srv/agent/venv/bin/edge-agent run" in text
    if shutil.which("systemd-analyze"):
        path = verifiable_copy(tmp_path, text.replace("/srv/agent/venv/bin/edge-agent",
                                                      "/opt/edge-agent/venv/bin/edge-agent"))
        proc = subprocess.run(["systemd-analyze", "verify", str(path)], capture_output=True,
                              text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
    with pytest.raises(service.ServiceError, match="absolute"):
        service.render_unit(UNIT.read_text(), "relative/path")


def test_bad_config_example_is_a_clear_error(tmp_path):
    proc = run_service("install", "--root", str(tmp_path), "--no-package",
                       "--config-example", str(tmp_path / "missing.toml"))
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        f"edge-agent: error: --config-example {tmp_path / 'missing.toml'}: no such file")


def test_fresh_install_config_names_the_camera_and_the_default_model(tmp_path):
    """The shipped example is tailored: detected camera, manifest default model; it must load."""
    from edge_agent.models import catalog
    from edge_agent.config import load_config
    from edge_agent.provision.service import tailor_config

    example = (Path(__file__).resolve().parents[1] / "edge_agent" / "data" / "config.example.toml").read_text()
    text = tailor_config(example, ("opencv", "/dev/video2"), catalog.load_manifest().default)
    path = tmp_path / "config.toml"
    path.write_text(text)
    cfg = load_config(str(path), env={})
    assert (cfg.source.kind, cfg.source.uri) == ("opencv", "/dev/video2")
    assert cfg.model.name == "deeplabv3_mnv2_pascal_quant"
    assert text.count("\n") == example.count("\n")  # comments and layout kept
    # nothing detected: only the model is filled in; a value that would not load is never written
    plain = tailor_config(example, None, "deeplabv3_mnv2_pascal_quant")
    assert 'kind = "folder"' in plain and 'name = "deeplabv3_mnv2_pascal_quant"' in plain
    assert tailor_config(example, ("webcam", "x"), None) == example


def test_install_without_an_explicit_example_writes_the_tailored_one(tmp_path):
    root = tmp_path / "root"
    result = run_service("install", "--root", str(root), "--prefix", "/opt/ea", "--no-package",
                         "--python", sys.executable, "--no-enable")
    assert result.returncode == 0, result.stdout + result.stderr
    text = (root / "etc/edge-agent/config.toml").read_text()
    assert 'name = "deeplabv3_mnv2_pascal_quant"' in text and "[mqtt]" in text


def test_staged_tree_points_at_its_final_path_and_notes_the_camera(tmp_path):
    """--root is a packaging root: the venv's scripts name /opt/ea/venv, never the staging path,
    so the tree runs once copied to /; the config says that no camera was looked for."""
    root = tmp_path / "root"
    result = run_service("install", "--root", str(root), "--prefix", "/opt/ea", "--no-package",
                         "--python", sys.executable, "--no-enable")
    assert result.returncode == 0, result.stdout + result.stderr
    venv = root / "opt/ea/venv"
    leaked = [f.name for f in (venv / "bin").iterdir() if f.is_file() and not f.is_symlink()
              and str(root).encode() in f.read_bytes()]
    assert leaked == [], leaked
    assert str(root) not in (venv / "pyvenv.cfg").read_text()
    assert "VIRTUAL_ENV=/opt/ea/venv" in (venv / "bin/activate").read_text().replace("'", "").replace('"', "")
    assert "point the venv's scripts at /opt/ea/venv" in result.stdout
    config = (root / "etc/edge-agent/config.toml").read_text()
    assert "# NOTE (service install): no camera was found on this host (not looked for" in config
    assert config.index("# NOTE (service install)") < config.index("[source]")
    assert "Note: no camera was found (not looked for with --root)" in result.stdout
    assert "owner as created: the device's package sets root:edge-agent" in result.stdout
    assert "mode 0640, root:edge-agent)" not in result.stdout  # not claimed where it is not done
    again = run_service("install", "--root", str(root), "--prefix", "/opt/ea", "--no-package",
                        "--python", sys.executable, "--no-enable")
    assert "Nothing to change: already installed." in again.stdout, again.stdout


def test_a_bad_package_leaves_no_half_made_venv(tmp_path):
    root = tmp_path / "root"
    result = run_service("install", "--root", str(root), "--prefix", "/opt/ea", "--python", sys.executable,
                         "--package", str(tmp_path / "no-such-edge_agent-9.9-py3-none-any.whl"), "--no-enable")
    assert result.returncode == 2, result.stdout + result.stderr
    err = result.stderr.strip().splitlines()
    assert len(err) == 1 and "pip install" in err[0] and "the venv made for it was removed again" in err[0], err
    assert "Traceback" not in result.stderr
    assert not (root / "opt/ea/venv").exists()


def test_no_camera_note_on_a_host_without_one():
    from edge_agent.provision.service import note_no_camera

    example = (Path(__file__).resolve().parents[1] / "edge_agent" / "data" / "config.example.toml").read_text()
    text = note_no_camera(example, staging=False)
    assert "no libcamera device with picamera2, no /dev/video*" in text
    assert text.count("[source]") == example.count("[source]") and text.endswith(example[-200:])
