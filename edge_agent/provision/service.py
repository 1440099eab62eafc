"""``edge-agent service install|uninstall``: put the agent on a device as a systemd service.

Why a Python command rather than a long shell script: every step is checked before it runs
(idempotent: a second install changes nothing and says so), ``--dry-run`` prints exactly the
actions and commands a real run would perform, and ``--root DIR`` installs into a staging tree
so the whole thing is testable without root. Only the standard library is used, so it runs
from a checkout with the system ``python3`` (``systemd/install.sh``) before any venv exists.

Install steps: system user ``edge-agent`` (group ``edge-agent``, member of ``video`` and of the
optional device groups that exist), a venv under ``<prefix>/venv`` with the agent installed,
``/etc/edge-agent/config.toml`` from the example if absent (never overwritten), the unit in
``/etc/systemd/system`` with the prefix filled in, ``daemon-reload``, ``enable --now``.
With ``--root``, user creation, ownership changes, daemon-reload and start are skipped (they
concern the running host, not the staging tree); the unit is enabled with ``systemctl --root``.
"""

from __future__ import annotations

import grp
import os
import pwd
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, List, Optional, Sequence, Tuple

from edge_agent import data
from edge_agent.errors import EdgeAgentError

USER = "edge-agent"
UNIT_NAME = "edge-agent.service"
DEFAULT_PREFIX = "/opt/edge-agent"
CONFIG_DIR = "/etc/edge-agent"
STATE_DIR = "/var/lib/edge-agent"
UNIT_DIR = "/etc/systemd/system"
CREDENTIAL_FILE = "/etc/credstore/edge-agent.mqtt_password"
REQUIRED_GROUP = "video"
# Added only where they exist: render (GPU delegates), gpio (Pi GPIO), plugdev (USB Coral
# udev rule), apex (PCIe Coral udev rule).
OPTIONAL_GROUPS = ("render", "gpio", "plugdev", "apex")

REPO = Path(__file__).resolve().parents[2]  # the checkout, when running from one
UNIT_TEMPLATE = data.path(data.UNIT_TEMPLATE)
CONFIG_EXAMPLES = (data.path(data.CONFIG_EXAMPLE),)


class ServiceError(EdgeAgentError):
    """A service install/uninstall step cannot be done (not root, command failed, ...)."""


@dataclass
class Step:
    """One action. ``done`` means the system already is as the step would make it."""

    what: str
    run: Callable[[], None]
    done: bool = False
    skip_reason: str = ""
    command: Optional[Sequence[str]] = None


@dataclass
class Layout:
    """Where things go, inside ``root`` (``/`` for a real install)."""

    root: Path
    prefix: str

    def at(self, path: str) -> Path:
        return self.root / path.lstrip("/")

    @property
    def staging(self) -> bool:
        return self.root != Path("/")

    @property
    def venv(self) -> Path:
        return self.at(self.prefix) / "venv"

    @property
    def config(self) -> Path:
        return self.at(CONFIG_DIR) / "config.toml"

    @property
    def unit(self) -> Path:
        return self.at(UNIT_DIR) / UNIT_NAME


# --------------------------------------------------------------------------- pure helpers


def render_unit(template: str, prefix: str) -> str:
    """The unit text with the venv prefix filled in (the template says /opt/edge-agent)."""
    prefix = prefix.rstrip("/") or "/"
    if not prefix.startswith("/"):
        raise ServiceError(f"--prefix must be an absolute path, got {prefix!r}")
    return template.replace(DEFAULT_PREFIX + "/", prefix.rstrip("/") + "/")


def find_config_example(explicit: Optional[str]) -> Optional[Path]:
    if explicit:
        path = Path(explicit)
        if not path.is_file():
            raise ServiceError(f"--config-example {explicit}: no such file")
        return path
    return next((p for p in CONFIG_EXAMPLES if p.is_file()), None)


def detect_camera() -> Optional[Tuple[str, str]]:
    """The source a fresh install should use: picamera2 where apt's python3-picamera2 and a
    libcamera device exist, else the first V4L2 device, else None (the example stays as is)."""
    import glob
    import importlib.util

    picam = importlib.util.find_spec("picamera2") is not None or has_system_picamera2()
    if picam and glob.glob("/dev/media*"):
        return "picamera2", ""
    videos = sorted(glob.glob("/dev/video[0-9]*"), key=lambda p: int(re.sub(r"\D", "", p) or 0))
    return ("opencv", videos[0]) if videos else None


def tailor_config(text: str, camera: Optional[Tuple[str, str]], model_name: Optional[str]) -> str:
    """The shipped example with this device's camera and the manifest's default model filled in,
    so that a fresh install runs (it fetches the model on first start). Only the example's own
    ``kind = "folder"`` / ``uri = ""`` / ``name = ""`` lines are touched; the result must load."""
    out, section = [], ""
    for line in text.splitlines(keepends=True):
        head = line.strip()
        if head.startswith("[") and head.endswith("]"):
            section = head.strip("[]")
        elif section == "source" and camera and re.match(r'kind = "folder"', head):
            line = line.replace('"folder"', f'"{camera[0]}"', 1)
        elif section == "source" and camera and re.match(r'uri = ""', head):
            line = line.replace('""', f'"{camera[1]}"', 1)
        elif section == "model" and model_name and re.match(r'name = ""', head):
            line = line.replace('""', f'"{model_name}"', 1)
        out.append(line)
    tailored = "".join(out)
    from edge_agent.config import ConfigError, load_config  # late: only needed here

    with tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False) as fh:
        fh.write(tailored)
    try:
        load_config(fh.name, env={})
    except ConfigError:
        return text
    finally:
        os.unlink(fh.name)
    return tailored


NO_CAMERA_NOTE = ("# NOTE (service install): no camera was found on this host{why}: set kind and uri\n"
                  "# below (picamera2 | opencv with /dev/videoN or rtsp://... | folder), then check with\n"
                  "# `edge-agent config check --config /etc/edge-agent/config.toml` and\n"
                  "# `systemctl restart edge-agent`.\n")


def note_no_camera(text: str, staging: bool) -> str:
    """``text`` with a note above ``[source]`` saying that no camera was found and what to set."""
    why = (" (not looked for: --root stages a tree for another machine)" if staging else
           " (no libcamera device with picamera2, no /dev/video*)")
    note = NO_CAMERA_NOTE.format(why=why)
    return re.sub(r"^\[source\]", lambda m: note + m.group(0), text, count=1, flags=re.M)


def venv_mentions(venv: Path, path: Path) -> bool:
    """True when a script or activate file of ``venv``'s bin/ names ``path`` (a staging path)."""
    needle = str(path).encode()
    return any(needle in f.read_bytes() for f in (venv / "bin").iterdir()
               if f.is_file() and not f.is_symlink()) if (venv / "bin").is_dir() else False


def relocate_venv(venv: Path, final: Path) -> None:
    """Rewrite the staging path ``venv`` to ``final`` in its scripts' ``#!`` lines, activate
    files and pyvenv.cfg: a tree staged with ``--root`` is a packaging root and runs at ``/``."""
    old, new = str(venv).encode(), str(final).encode()
    targets = [f for f in (venv / "bin").iterdir() if f.is_file() and not f.is_symlink()]
    targets.append(venv / "pyvenv.cfg")
    for f in targets:
        data = f.read_bytes()
        if old in data:
            mode = f.stat().st_mode
            f.write_bytes(data.replace(old, new))
            os.chmod(f, mode)


def unit_active() -> bool:
    """True when the unit runs now (a re-install must restart it for a new package to run)."""
    try:
        return subprocess.run(["systemctl", "is-active", "--quiet", UNIT_NAME], check=False,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode == 0
    except FileNotFoundError:
        return False


def default_config_text() -> str:
    """Fallback when no example file ships: the defaults, rendered by the config module."""
    from edge_agent import config as cfg  # imported late: only needed in this fallback

    header = "# edge-agent configuration (defaults). See `edge-agent config show`.\n\n"
    return header + cfg.to_toml(cfg.Config(), mask_secrets=False)


def default_package() -> str:
    """Install from this checkout when running from one, else from the package index."""
    return str(REPO) if (REPO / "pyproject.toml").is_file() else "edge-agent"


def default_python() -> str:
    """The system interpreter: apt's python3-picamera2 is built for it, not for pyenv/conda."""
    if Path("/usr/bin/python3").exists():
        return "/usr/bin/python3"
    return shutil.which("python3") or sys.executable


def system_numpy_pin(python: str) -> List[str]:
    """``["numpy==X"]`` for the numpy ``python`` already has (apt's), else ``[]``.

    In a ``--system-site-packages`` venv pip would otherwise put numpy 2 over apt's numpy 1.x, and
    apt's picamera2 (and the helpers it imports, built against apt's numpy) then fail to import
    with a ValueError. Pinning the system version makes pip keep it and pick compatible wheels
    of the other packages (e.g. opencv-python-headless 4.11 with numpy 1.24)."""
    try:
        proc = subprocess.run([python, "-c", "import numpy; print(numpy.__version__)"],
                              capture_output=True, text=True, timeout=60, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return []
    version = proc.stdout.strip()
    return [f"numpy=={version}"] if proc.returncode == 0 and re.fullmatch(r"[\w.+]+", version) else []


def has_system_picamera2() -> bool:
    """picamera2 comes from apt on Raspberry Pi OS; the venv must then see system packages."""
    return any(Path(p, "picamera2").is_dir() for p in ("/usr/lib/python3/dist-packages",))


def user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
        return True
    except KeyError:
        return False


def group_exists(name: str) -> bool:
    try:
        grp.getgrnam(name)
        return True
    except KeyError:
        return False


def missing_groups(user: str, wanted: Sequence[str]) -> List[str]:
    present = [g for g in wanted if group_exists(g)]
    return [g for g in present if user not in grp.getgrnam(g).gr_mem]


def run_command(cmd: Sequence[str]) -> None:
    try:
        proc = subprocess.run(list(cmd), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, check=False)
    except FileNotFoundError:
        raise ServiceError(f"{cmd[0]}: command not found") from None
    if proc.returncode != 0:
        last = (proc.stdout or "").strip().splitlines()[-1:] or [""]
        raise ServiceError(f"`{shlex.join(cmd)}` failed ({proc.returncode}): {last[0]}")


def write_file(path: Path, text: str, mode: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.chmod(tmp, mode)
    os.replace(tmp, path)


def chown(path: Path, user: str, group: str) -> None:
    shutil.chown(path, user=user, group=group)


# --------------------------------------------------------------------------- plans


def plan_install(opts: Any) -> List[Step]:
    lay = Layout(Path(opts.root or "/").resolve(), opts.prefix)
    steps: List[Step] = []
    staging_note = "skipped: --root installs into a staging tree, not this host"

    # 1. user and groups
    if lay.staging:
        steps.append(Step(f"create system user {USER} (groups {REQUIRED_GROUP}, optional "
                          f"{', '.join(OPTIONAL_GROUPS)})", lambda: None, skip_reason=staging_note))
    else:
        useradd = ["useradd", "--system", "--user-group", "--home-dir", STATE_DIR,
                   "--no-create-home", "--shell", "/usr/sbin/nologin",
                   "--comment", "edge-agent daemon", USER]
        steps.append(Step(f"create system user {USER}", lambda: run_command(useradd),
                          done=user_exists(USER), command=useradd))
        groups = [REQUIRED_GROUP] + list(OPTIONAL_GROUPS)
        todo = missing_groups(USER, groups) if user_exists(USER) else [
            g for g in groups if group_exists(g)]
        usermod = ["usermod", "--append", "--groups", ",".join(todo), USER]
        steps.append(Step(f"add {USER} to groups {', '.join(todo) or '(none missing)'}",
                          lambda: run_command(usermod) if todo else None,
                          done=not todo, command=usermod))

    # 2. venv and package
    venv_python = lay.venv / "bin" / "python"
    venv_cmd = [opts.python, "-m", "venv"]
    if opts.system_site_packages:
        venv_cmd.append("--system-site-packages")
    if opts.no_package:
        venv_cmd.append("--without-pip")
    venv_cmd.append(str(lay.venv))
    venv_existed = venv_python.exists()
    steps.append(Step(f"create venv {lay.venv}", lambda: run_command(venv_cmd),
                      done=venv_existed, command=venv_cmd))
    if opts.no_package:
        steps.append(Step("install the edge-agent package into the venv", lambda: None,
                          skip_reason="skipped: --no-package"))
    else:
        pip_cmd = [str(venv_python), "-m", "pip", "install", "--upgrade", opts.package]
        if opts.system_site_packages:
            pip_cmd += system_numpy_pin(opts.python)

        def install_package() -> None:
            try:
                run_command(pip_cmd)
            except ServiceError as exc:
                if not venv_existed:  # nothing half-made is left behind: the venv was ours
                    shutil.rmtree(lay.venv, ignore_errors=True)
                    raise ServiceError(f"{exc} (the venv made for it was removed again)") from None
                raise

        steps.append(Step(f"install {opts.package} into the venv", install_package, command=pip_cmd))
    if lay.staging:
        final = Path(opts.prefix) / "venv"
        steps.append(Step(f"point the venv's scripts at {final} (the staged tree runs once copied to /)",
                          lambda: relocate_venv(lay.venv, final),
                          done=venv_existed and not venv_mentions(lay.venv, lay.venv)))

    # 3. config (never overwritten)
    example = find_config_example(opts.config_example)
    source = str(example) if example else "the built-in defaults"

    def install_config() -> None:
        text = example.read_text() if example else default_config_text()
        if not opts.config_example:  # the shipped example: fill in this device's camera and model
            from edge_agent.models import catalog

            camera = None if lay.staging else detect_camera()
            text = tailor_config(text, camera, catalog.load_manifest().default)
            if camera is None:
                text = note_no_camera(text, lay.staging)
        write_file(lay.config, text, 0o640)
        os.chmod(lay.config.parent, 0o750)
        if not lay.staging:
            chown(lay.config.parent, "root", USER)
            chown(lay.config, "root", USER)

    owner = (f"root:{USER}" if not lay.staging else
             f"owner as created: the device's package sets root:{USER}")
    steps.append(Step(f"write {lay.config} from {source} (mode 0640, {owner})",
                      install_config, done=lay.config.exists()))

    # 3b. the broker identity from `edge-agent fleet add DEVICE --out FILE` (--mqtt-credentials)
    if getattr(opts, "mqtt_credentials", None):
        from edge_agent.provision import credentials

        steps += [Step(what, run, done=done) for what, run, done in
                  credentials.plan(opts.mqtt_credentials, lay.config, lay.at(CREDENTIAL_FILE))]

    # 4. unit
    unit_text = render_unit(Path(opts.unit_template).read_text(), opts.prefix)
    unit_current = lay.unit.read_text() if lay.unit.exists() else None
    steps.append(Step(f"install {lay.unit}", lambda: write_file(lay.unit, unit_text, 0o644),
                      done=unit_current == unit_text))

    # 5. systemd
    if lay.staging:
        steps.append(Step("systemctl daemon-reload", lambda: None, skip_reason=staging_note))
        enable = ["systemctl", f"--root={lay.root}", "enable", UNIT_NAME]
        wants = lay.at(UNIT_DIR) / "multi-user.target.wants" / UNIT_NAME
        steps.append(Step(f"enable {UNIT_NAME} in {lay.root}", lambda: run_command(enable),
                          done=wants.is_symlink(), command=enable,
                          skip_reason="" if not opts.no_enable else "skipped: --no-enable"))
    else:
        reload_cmd = ["systemctl", "daemon-reload"]
        steps.append(Step("run systemctl daemon-reload", lambda: run_command(reload_cmd),
                          command=reload_cmd))
        was_running = unit_active()
        enable = ["systemctl", "enable"] + ([] if opts.no_start else ["--now"]) + [UNIT_NAME]
        steps.append(Step(f"enable{'' if opts.no_start else ' and start'} {UNIT_NAME}",
                          lambda: run_command(enable), command=enable,
                          skip_reason="" if not opts.no_enable else "skipped: --no-enable"))
        if was_running and not opts.no_package:  # the new package runs only after a restart
            restart = ["systemctl", "try-restart", UNIT_NAME]
            steps.append(Step(f"restart {UNIT_NAME} (it was running the previous package)",
                              lambda: run_command(restart), command=restart,
                              skip_reason="" if not opts.no_start else "skipped: --no-start"))
    return steps


def plan_uninstall(opts: Any) -> List[Step]:
    lay = Layout(Path(opts.root or "/").resolve(), opts.prefix)
    steps: List[Step] = []
    if lay.staging:
        disable = ["systemctl", f"--root={lay.root}", "disable", UNIT_NAME]
    else:
        disable = ["systemctl", "disable", "--now", UNIT_NAME]
    steps.append(Step(f"disable {UNIT_NAME}", lambda: run_command(disable),
                      done=not lay.unit.exists(), command=disable))
    steps.append(Step(f"remove {lay.unit}", lambda: lay.unit.unlink(), done=not lay.unit.exists()))
    steps.extend(homeassistant_removal(lay))
    if not lay.staging:
        reload_cmd = ["systemctl", "daemon-reload"]
        steps.append(Step("run systemctl daemon-reload", lambda: run_command(reload_cmd),
                          command=reload_cmd))
    prefix_dir = lay.at(opts.prefix)
    steps.append(Step(f"remove {prefix_dir}", lambda: shutil.rmtree(prefix_dir),
                      done=not prefix_dir.exists()))
    keep = "kept (use --purge to remove)"
    for path in (lay.at(CONFIG_DIR), lay.at(STATE_DIR)):
        steps.append(Step(f"remove {path}", lambda p=path: shutil.rmtree(p), done=not path.exists(),
                          skip_reason="" if opts.purge else keep))
    # The MQTT password the install's note asks for: a purge leaves no secret of the service behind.
    credential = lay.at(CREDENTIAL_FILE)
    if credential.exists():
        steps.append(Step(f"remove {credential}", lambda: credential.unlink(),
                          skip_reason="" if opts.purge else keep))
    if lay.staging:
        steps.append(Step(f"remove user {USER}", lambda: None,
                          skip_reason="skipped: --root installs into a staging tree"))
    else:
        userdel = ["userdel", USER]
        steps.append(Step(f"remove user {USER}", lambda: run_command(userdel),
                          done=not user_exists(USER), command=userdel,
                          skip_reason="" if opts.purge else keep))
    return steps


def homeassistant_removal(lay: Layout) -> List[Step]:
    """With ``homeassistant.enabled`` in the installed config: remove the device's entities from
    Home Assistant (the agent is stopped, so nothing re-announces them). A broker that cannot be
    reached does not stop the uninstall: one line says how to do it later."""
    from edge_agent.config import load_config

    if lay.staging or not lay.config.is_file():
        return []
    try:
        config = load_config(str(lay.config))
    except EdgeAgentError:
        return []
    if not config.homeassistant.enabled:
        return []
    what = "remove the Home Assistant entities"
    try:
        from edge_agent.comms import homeassistant  # paho-mqtt: absent under a bare system python3
    except ImportError:
        return [Step(what, lambda: None, skip_reason="skipped: paho-mqtt is not installed for this "
                     f"python; run `edge-agent homeassistant --remove --config {lay.config}` first")]

    def remove() -> None:
        try:
            print("  " + homeassistant.removal_note(homeassistant.remove_entities(config), config))
        except EdgeAgentError as exc:
            print(f"  Home Assistant entities not removed ({exc}); later: "
                  f"edge-agent homeassistant --remove --config {lay.config}")

    return [Step(what, remove)]


def execute(steps: Sequence[Step], dry_run: bool, out: Callable[[str], None] = print) -> int:
    """Print and (unless ``dry_run``) perform the steps; returns the number of changes."""
    changed = 0
    for step in steps:
        cmd = f"  $ {shlex.join(step.command)}" if step.command else ""
        if step.skip_reason:
            out(f"- {step.what}: {step.skip_reason}")
        elif step.done:
            out(f"- {step.what}: already done")
        elif dry_run:
            out(f"* would {step.what}{cmd}")
            changed += 1
        else:
            out(f"* {step.what}{cmd}")
            step.run()
            changed += 1
    return changed


def _check_privileges(opts: Any) -> None:
    if not opts.dry_run and not opts.root and os.geteuid() != 0:
        raise ServiceError("service install/uninstall changes the system: run it as root "
                           "(sudo), or use --dry-run / --root DIR")


def install(opts: Any) -> int:
    """Run (or, with ``opts.dry_run``, print) every install step; ``opts`` holds the CLI's options."""
    _check_privileges(opts)
    if not Path(opts.unit_template).is_file():
        raise ServiceError(f"unit template not found: {opts.unit_template} "
                           "(run from a checkout, or pass --unit-template)")
    mode = " (dry run: nothing is changed)" if opts.dry_run else ""
    print(f"Installing edge-agent as a systemd service{mode}")
    changed = execute(plan_install(opts), opts.dry_run)
    lay = Layout(Path(opts.root or "/").resolve(), opts.prefix)
    if not opts.dry_run:
        print("Nothing to change: already installed." if changed == 0 else "Done.")
    if not opts.dry_run and lay.config.exists() and NO_CAMERA_NOTE.split("{why}")[0] in lay.config.read_text():
        print(f"Note: no camera was found{' (not looked for with --root)' if lay.staging else ''}: set "
              f"[source] kind and uri in {lay.config} (a note there says how).")
    if not lay.at(CREDENTIAL_FILE).exists():
        print(f"Note: for an MQTT password, put it in {CREDENTIAL_FILE} (root, mode 0600); "
              f"the unit passes it as the credential mqtt_password.")
    print(f"Edit {lay.config}, then `systemctl restart edge-agent`; logs: "
          "`journalctl -u edge-agent -f`.")
    return 0


def uninstall(opts: Any) -> int:
    """Disable and remove the unit and the venv (``opts.purge``: config, state, the MQTT
    credential and the user too)."""
    _check_privileges(opts)
    mode = " (dry run: nothing is changed)" if opts.dry_run else ""
    print(f"Uninstalling the edge-agent service{mode}")
    execute(plan_uninstall(opts), opts.dry_run)
    return 0
