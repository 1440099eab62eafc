"""CI stage "systemd": what a user does on a Pi, under a REAL systemd (252, booted with systemd-nspawn).

One container per module, booted from an overlay over the cached bookworm root of
tools/systemd-root.sh (the cached root is never written). In it, as a user would: a venv, ``pip
install`` of the wheel built from this checkout (``pip wheel --no-deps``), the MQTT password in
``/etc/credstore`` and ``edge-agent service install --package WHEEL --config-example FILE`` (no
``--root``: useradd, the venv in /opt/edge-agent, the unit, daemon-reload, ``enable --now``).
The config points at a real mosquitto started here on the host's loopback (the container shares
the host's network) that accepts only the user ``edge`` with its password, a folder of images,
and a model fetched from a local mirror (copies of ../shared/test_data/models put in the
container, never in the repository).

Then, each on the running service: READY only after the first frame; the journal's start line;
the password through LoadCredential only; every directive of the shipped unit in force (systemctl
show) and MemoryDenyWriteExecute + ProtectSystem enforced on the live agent's own system calls
(injected with ptrace) while it publishes masks; ``systemctl reload``; a SIGSTOPped agent killed
and restarted by the watchdog; ``systemctl stop`` publishing the final info and ``offline``;
``service uninstall --purge`` leaving nothing.

Not provable here: the cgroup limits (MemoryMax=, TasksMax=, DevicePolicy=/DeviceAllow=) are
checked as systemd's settings only: on this cgroup-v1 host nspawn gives the container read-only
controllers, so systemd cannot apply them (a Pi's bookworm runs cgroup v2, where it does).

Run: ``SUITES=systemd bash tools/test.sh`` (builds the root; EDGE_AGENT_SYSTEMD_REQUIRED=1 turns
the skips below into failures).
"""

from __future__ import annotations

import errno
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Set, Tuple

import pytest

from edge_agent.output.encode import decode_mask_png
from tests.broker import MosquittoServer, Recorder, mosquitto_available
from tests.data import DM05, IMAGES, REPO
from tests.helpers import build_wheel
from tests.nspawn import (AT_FDCWD, MAP_PRIVATE_ANON, PIP_CACHE, PROT_EXEC, PROT_READ, PROT_WRITE, Injector,
                          Machine, children, errno_name, injection_supported, parse_us_timestamp, root_problem, wait_for)

pytestmark = [pytest.mark.systemd, pytest.mark.broker, pytest.mark.slow]

REQUIRED = os.environ.get("EDGE_AGENT_SYSTEMD_REQUIRED") == "1"
UNIT = "edge-agent.service"
SHIPPED_UNIT = REPO / "edge_agent" / "data" / UNIT
DEVICE = "pi-systemd-ci"
MQTT_USER, MQTT_PASSWORD = "edge", "pi-credential-7f3a"
CREDENTIAL = "/etc/credstore/edge-agent.mqtt_password"
MODEL = "deeplabv3_mnv2_dm05_pascal_quant"
USER_VENV = "/root/edge-agent-venv"
AGENT_STATE = "/var/lib/edge-agent"
TOPICS = f"edge-agent/{DEVICE}/"
REFUSED = "check mqtt.username and mqtt.password"  # the agent's line when the broker refuses it
# Left out of the before/after comparison of the container's files: what the system itself keeps
# writing (journal, caches, systemd's own state) and shadow's backup files (/etc/passwd- etc.,
# which useradd/userdel rewrite with the previous version, as for any user).
NOT_COMPARED = ("proc", "sys", "dev", "run", "tmp", "var/log", "var/cache", "root/.cache", "var/lib/systemd",
                "etc/passwd-", "etc/group-", "etc/shadow-", "etc/gshadow-", "etc/subuid-", "etc/subgid-")


def config_text(port: int, mask_resolution: str = "model") -> str:
    return f"""# /root/config.toml: what the user hands to `service install --config-example`
[agent]
device_id = "{DEVICE}"
log_level = "info"

[source]
kind = "folder"
uri = "/srv/edge-agent/images"
fps = 4.0

[model]
name = "{MODEL}"
mirror = "/srv/edge-agent/models"
threads = 1

[publish]
timings = "frame"
mask_resolution = "{mask_resolution}"

[mqtt]
host = "127.0.0.1"
port = {port}
username = "{MQTT_USER}"
reconnect_min_s = 0.2
reconnect_max_s = 1.0
"""


# --------------------------------------------------------------------------- the stage


@dataclass
class Stage:
    machine: Machine
    broker: MosquittoServer
    recorder: Recorder  # subscribed to the device's topics before the install
    wheel: str  # its path inside the container
    install_out: str
    before: Dict[str, Tuple]  # the container's files before the install
    accounts_before: Dict[str, str]
    timings: Dict[str, float] = field(default_factory=dict)

    def sh(self, *argv: str, **kw) -> subprocess.CompletedProcess:
        return self.machine.sh(*argv, **kw)

    def show(self, *props: str) -> Dict[str, str]:
        return self.machine.show(UNIT, *props)

    def load_credential(self) -> str:
        """LoadCredential= as systemd holds it (systemctl show of systemd 252 prints
        "[unprintable]" for it; its D-Bus property is an array of (id, source) pairs)."""
        out = self.sh("busctl", "get-property", "org.freedesktop.systemd1",
                      "/org/freedesktop/systemd1/unit/edge_2dagent_2eservice",
                      "org.freedesktop.systemd1.Service", "LoadCredential").stdout
        pairs = re.findall(r'"([^"]*)" "([^"]*)"', out)
        return "\n".join(f"{cid}:{src}" for cid, src in pairs)

    def main_pid(self) -> int:
        return int(self.show("MainPID")["MainPID"])

    def journal(self, *extra: str) -> List[dict]:
        out = self.sh("journalctl", "-u", UNIT, "-o", "json", "--no-pager", *extra).stdout
        return [json.loads(line) for line in out.splitlines() if line.strip()]

    def journal_text(self) -> str:
        return self.sh("journalctl", "-u", UNIT, "--no-pager", "-o", "short-precise").stdout

    def wait_active(self, timeout: float = 120.0, new_pid_than: int = 0) -> int:
        """The unit active with a main process (other than ``new_pid_than``): its pid."""
        def active() -> int:
            s = self.show("ActiveState", "MainPID")
            pid = int(s["MainPID"] or 0)
            return pid if s["ActiveState"] == "active" and pid and pid != new_pid_than else 0
        return wait_for(active, timeout, f"{UNIT} active", poll_s=0.3)

    def recorder_from(self, start: int = 0) -> List:
        with self.recorder._cond:
            return list(self.recorder.messages[start:])

    def count(self) -> int:
        with self.recorder._cond:
            return len(self.recorder.messages)

    def wait_messages(self, suffix: str, after: int, n: int = 1, timeout: float = 60.0,
                      where=lambda m: True) -> List:
        """``n`` messages on ``<prefix>/<device>/<suffix>`` recorded after index ``after``."""
        def found() -> List:
            got = [m for m in self.recorder_from(after) if m.topic == TOPICS + suffix and where(m)]
            return got if len(got) >= n else []
        return wait_for(found, timeout, f"{n}x {TOPICS + suffix}", poll_s=0.1)


def snapshot(root: Path) -> Dict[str, Tuple]:
    """Every path of the container's file system (but NOT_COMPARED) -> (type, mode, owner, size/target)."""
    out: Dict[str, Tuple] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = os.path.relpath(dirpath, root)
        keep = []
        for name in dirnames + filenames:
            rel = os.path.normpath(os.path.join(rel_dir, name))
            if rel.startswith(NOT_COMPARED) and any(rel == p or rel.startswith(p + "/") for p in NOT_COMPARED):
                continue
            st = os.lstat(os.path.join(dirpath, name))
            kind = "l" if os.path.islink(os.path.join(dirpath, name)) else "d" if name in dirnames else "f"
            detail = os.readlink(os.path.join(dirpath, name)) if kind == "l" else st.st_size if kind == "f" else 0
            out[rel] = (kind, st.st_mode & 0o7777, st.st_uid, st.st_gid, detail)
            if name in dirnames and kind == "d":
                keep.append(name)
        dirnames[:] = keep
    return out


def accounts(machine: Machine) -> Dict[str, str]:
    return {name: machine.path(f"/etc/{name}").read_text() for name in ("passwd", "group", "shadow", "gshadow")}


NOTES: List[str] = []  # measured times, written to the terminal when the stage is torn down


@pytest.fixture(scope="module")
def stage(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stage]:
    problem = root_problem() or (None if mosquitto_available() else "mosquitto is not installed")
    if problem:
        if REQUIRED:
            pytest.fail(f"EDGE_AGENT_SYSTEMD_REQUIRED=1 but {problem}", pytrace=False)
        pytest.skip(problem)
    work = tmp_path_factory.mktemp("systemd-real")
    timings: Dict[str, float] = {}
    t0 = time.monotonic()
    wheel = build_wheel(work / "build")
    timings["wheel"] = time.monotonic() - t0

    # A host's own CA bundle (a site's TLS-intercepting proxy, say) is what pip inside needs too.
    bundle = "/etc/ssl/certs/ca-certificates.crt"
    PIP_CACHE.mkdir(parents=True, exist_ok=True)
    machine = Machine(work / "machine", binds=[f"{PIP_CACHE}:/root/.cache/pip"],
                      bind_ro=[bundle] if os.path.isfile(bundle) else [])
    broker: Optional[MosquittoServer] = None
    recorder: Optional[Recorder] = None
    try:
        root = machine.prepare()
        # What the user brings: the wheel, a model mirror and pictures (a USB stick, say).
        shutil.copy2(wheel, root / "root" / wheel.name)
        (root / "srv/edge-agent/models").mkdir(parents=True)
        (root / "srv/edge-agent/images").mkdir(parents=True)
        shutil.copy2(DM05, root / "srv/edge-agent/models" / DM05.name)
        for image in ("bird_segmentation.bmp", "cat.bmp"):
            shutil.copy2(IMAGES / image, root / "srv/edge-agent/images" / image)
        machine.boot()
        (broker_dir := work / "broker").mkdir()
        broker = MosquittoServer(broker_dir, users={MQTT_USER: MQTT_PASSWORD}).start()
        (root / "root/config.toml").write_text(config_text(broker.port))

        t1 = time.monotonic()
        machine.sh("python3", "-m", "venv", USER_VENV)
        machine.sh(f"{USER_VENV}/bin/pip", "install", "-q", f"/root/{wheel.name}", timeout=600)
        timings["user venv + pip install"] = time.monotonic() - t1
        # The password where the install's note says, root-only, and not in the config.
        machine.sh("sh", "-c", f"mkdir -p /etc/credstore && umask 077 && printf %s '{MQTT_PASSWORD}' > {CREDENTIAL}")
        before = snapshot(root)
        accounts_before = accounts(machine)
        recorder = Recorder(broker.host, broker.port, topics=TOPICS + "#", auth=(MQTT_USER, MQTT_PASSWORD))

        t2 = time.monotonic()
        out = machine.sh(f"{USER_VENV}/bin/edge-agent", "service", "install", "--package", f"/root/{wheel.name}",
                         "--config-example", "/root/config.toml", timeout=900).stdout
        timings["service install (until active)"] = time.monotonic() - t2
        timings.update(machine.timings)
        st = Stage(machine, broker, recorder, f"/root/{wheel.name}", out, before, accounts_before, timings)
        yield st
    finally:
        t3 = time.monotonic()
        if recorder is not None:
            recorder.close()
        machine.close()
        if broker is not None:
            broker.close()
        timings["teardown"] = time.monotonic() - t3
        timings["of which poweroff"] = machine.timings.get("poweroff", 0.0)
        lines = ["systemd stage: " + ", ".join(f"{k} {v:.1f} s" for k, v in timings.items()), *NOTES]
        reporter = request.config.pluginmanager.get_plugin("terminalreporter")
        capture = request.config.pluginmanager.get_plugin("capturemanager")
        if reporter is not None and capture is not None:
            with capture.global_and_fixture_disabled():  # shown without -s
                reporter.write_line("")
                for line in lines:
                    reporter.write_line(line)


# --------------------------------------------------------------------------- the tests


def test_service_install_without_root_sets_up_user_venv_config_unit_and_starts(stage: Stage) -> None:
    out = stage.install_out
    for step in ("* create system user edge-agent", "* create venv /opt/edge-agent/venv",
                 f"* install {stage.wheel} into the venv", "* write /etc/edge-agent/config.toml",
                 "* install /etc/systemd/system/edge-agent.service", "* run systemctl daemon-reload",
                 "* enable and start edge-agent.service", "Done."):
        assert step in out, out
    s = stage.show("LoadState", "UnitFileState", "ActiveState", "SubState", "FragmentPath", "Type")
    assert s == {"LoadState": "loaded", "UnitFileState": "enabled", "ActiveState": "active",
                 "SubState": "running", "FragmentPath": "/etc/systemd/system/edge-agent.service",
                 "Type": "notify"}, s
    assert stage.machine.path("/etc/systemd/system/edge-agent.service").read_text() == SHIPPED_UNIT.read_text()
    passwd = stage.sh("getent", "passwd", "edge-agent").stdout.strip().split(":")
    assert passwd[5:] == [AGENT_STATE, "/usr/sbin/nologin"] and int(passwd[2]) < 1000, passwd
    assert "edge-agent" in stage.sh("getent", "group", "video").stdout
    ls = stage.sh("stat", "-c", "%a %U:%G %n", "/etc/edge-agent", "/etc/edge-agent/config.toml").stdout
    assert ls.split("\n")[:2] == ["750 root:edge-agent /etc/edge-agent",
                                  "640 root:edge-agent /etc/edge-agent/config.toml"], ls
    # the agent runs from the service's venv, as the service's user, with the installed wheel
    pid = stage.machine.host_pid(stage.main_pid())
    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    assert cmdline[1:5] == [b"/opt/edge-agent/venv/bin/edge-agent", b"run", b"--config",
                            b"/etc/edge-agent/config.toml"], cmdline
    # systemd had nothing to say about the unit or its directories (e.g. a mode it disagrees with)
    systemd_lines = [e["MESSAGE"] for e in stage.journal() if e.get("_PID") != str(stage.main_pid())
                     and "edge_agent" not in str(e.get("MESSAGE"))]
    assert not [l for l in systemd_lines if re.search(r"mode is different|[Ww]arning|[Ii]gnoring|[Ff]ailed", str(l))], \
        systemd_lines


def test_unit_becomes_active_only_after_the_first_frame_is_processed(stage: Stage) -> None:
    """READY=1 comes after the first frame's inference, so ActiveEnterTimestamp must come after
    the first frame's capture time plus its measured stage times (the agent's own result and
    timings messages). A Type=simple unit, or READY sent at model load, becomes active before."""
    first = json.loads(stage.wait_messages("result", 0, timeout=30)[0].payload)
    assert first["seq"] == 1, first  # the recorder saw the service's very first frame
    timings = stage.wait_messages("timings", 0, timeout=30,
                                  where=lambda m: json.loads(m.payload)["seq"] == first["seq"])
    ms = json.loads(timings[0].payload)["ms"]
    processed_by = first["capture_ts"] + sum(ms.get(k, 0.0) for k in ("preprocess", "inference",
                                                                      "postprocess", "encode")) / 1e3
    s = stage.show("ActiveEnterTimestamp", "ExecMainStartTimestamp", "Type", "NotifyAccess")
    active = parse_us_timestamp(s["ActiveEnterTimestamp"])
    exec_start = parse_us_timestamp(s["ExecMainStartTimestamp"])
    NOTES.append(f"READY: exec -> first frame captured {first['capture_ts'] - exec_start:.3f} s, processed "
                 f"{processed_by - exec_start:.3f} s, unit active {active - exec_start:.3f} s")
    assert exec_start < first["capture_ts"] < processed_by <= active, (exec_start, first, ms, active)
    assert s["Type"] == "notify" and s["NotifyAccess"] == "main"
    # and in the journal: the agent's start and model lines come before systemd's "Started"
    text = stage.journal_text()
    order = [text.find(m) for m in ("starting as device", f"running {MODEL}", "Started edge-agent.service")]
    assert -1 not in order and order == sorted(order), text[-3000:]


def test_journal_shows_the_agents_start_line(stage: Stage) -> None:
    entries = stage.journal()
    start = [e for e in entries if "starting as device" in str(e.get("MESSAGE"))]
    assert start, [e.get("MESSAGE") for e in entries][-20:]
    line = start[0]
    assert line["MESSAGE"].startswith("edge_agent.daemon.agent: edge-agent ") and f"'{DEVICE}'" in line["MESSAGE"]
    # stderr lines carry their syslog priority (<6> = info) and the unit, as journald parsed them
    assert line["PRIORITY"] == "6" and line["_SYSTEMD_UNIT"] == UNIT and line["SYSLOG_IDENTIFIER"] == "edge-agent"
    assert line["_UID"] == stage.sh("id", "-u", "edge-agent").stdout.strip()


def test_mqtt_password_arrives_through_load_credential_only(stage: Stage) -> None:
    """The password is in /etc/credstore only (not in the config, the unit, the environment);
    the agent reads it from $CREDENTIALS_DIRECTORY; the broker refuses it without it."""
    m = stage.machine
    assert MQTT_PASSWORD not in m.path("/etc/edge-agent/config.toml").read_text()
    assert MQTT_PASSWORD not in m.path("/etc/systemd/system/edge-agent.service").read_text()
    assert stage.sh("stat", "-c", "%a %U", CREDENTIAL).stdout.strip() == "600 root"
    assert stage.load_credential() == "mqtt_password:edge-agent.mqtt_password"
    assert MQTT_PASSWORD not in stage.show("Environment")["Environment"]
    pid = m.host_pid(stage.main_pid())
    environ = dict(kv.split("=", 1) for kv in Path(f"/proc/{pid}/environ").read_text().split("\0") if "=" in kv)
    assert environ["CREDENTIALS_DIRECTORY"] == f"/run/credentials/{UNIT}"
    assert MQTT_PASSWORD not in "".join(environ.values())
    assert (Path(f"/proc/{pid}/root") / f"run/credentials/{UNIT}/mqtt_password").read_text() == MQTT_PASSWORD
    # the agent is connected with it (its retained online), and mosquitto refuses anonymous clients
    check = Recorder(stage.broker.host, stage.broker.port, topics=TOPICS + "availability",
                     auth=(MQTT_USER, MQTT_PASSWORD))
    try:
        check.wait_for(TOPICS + "availability", b"online", timeout=10)
    finally:
        check.close()
    assert connack(stage.broker.port, None).is_failure
    assert connack(stage.broker.port, (MQTT_USER, "wrong-password")).is_failure
    assert str(connack(stage.broker.port, (MQTT_USER, MQTT_PASSWORD))) == "Success"

    # With another password in the credential store, the broker refuses the agent...
    try:
        stage.sh("sh", "-c", f"umask 077 && printf %s wrong-password > {CREDENTIAL}")
        mark, refusals = stage.count(), stage.journal_text().count(REFUSED)
        stage.sh("systemctl", "restart", UNIT, timeout=150)
        wait_for(lambda: stage.journal_text().count(REFUSED) > refusals, 30, f"the agent's {REFUSED!r} line")
        assert not [msg for msg in stage.recorder_from(mark) if msg.topic == TOPICS + "availability"
                    and msg.payload == b"online"], "connected with a wrong password"
    finally:
        # ... and takes it again with the right one
        stage.sh("sh", "-c", f"umask 077 && printf %s '{MQTT_PASSWORD}' > {CREDENTIAL}")
        mark = stage.count()
        stage.sh("systemctl", "restart", UNIT, timeout=150)
    stage.wait_messages("availability", mark, where=lambda msg: msg.payload == b"online", timeout=30)


def connack(port: int, auth: Optional[Tuple[str, str]]):
    """The broker's CONNACK reason code for a client with ``auth`` (None: anonymous)."""
    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion

    client = paho.Client(CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
    if auth:
        client.username_pw_set(*auth)
    got: list = []
    client.on_connect = lambda c, u, flags, rc, props: got.append(rc)
    client.connect("127.0.0.1", port, 10)
    try:
        wait_for(lambda: (client.loop(0.1), got)[1], 10, "a CONNACK", poll_s=0)
    finally:
        client.disconnect()
    return got[0]


# -- every directive of the shipped unit, as systemd applies it ----------------------------------


def shipped_service_settings() -> List[Tuple[str, str]]:
    """(key, value) of the shipped unit's [Service] section, in order (keys may repeat)."""
    out, section = [], ""
    for line in SHIPPED_UNIT.read_text().splitlines():
        line = line.strip()
        if line.startswith("["):
            section = line
        elif section == "[Service]" and line and line[0] not in "#;" and "=" in line:
            key, value = line.split("=", 1)
            out.append((key.strip(), value.strip()))
    return out


def seconds(span: str) -> float:
    """A systemd time span ('2min', '30s', '1min 30s', '500ms', '30') in seconds."""
    units = {"us": 1e-6, "ms": 1e-3, "s": 1, "min": 60, "h": 3600}
    parts = re.findall(r"([\d.]+)\s*(us|ms|min|s|h)?", span)
    assert parts, span
    return sum(float(n) * units[u or "s"] for n, u in parts)


class SyscallGroups:
    """``systemd-analyze syscall-filter`` of the container's systemd, groups expanded."""

    def __init__(self, stage: Stage) -> None:
        self.stage, self.cache = stage, {}

    def expand(self, group: str) -> Set[str]:
        if group not in self.cache:
            out = self.stage.sh("systemd-analyze", "syscall-filter", group).stdout
            names: Set[str] = set()
            for line in out.splitlines()[1:]:
                item = line.strip()
                if not item or item.startswith("#"):
                    continue
                names |= self.expand(item) if item.startswith("@") else {item}
            self.cache[group] = names
        return self.cache[group]

    def unknown_to_libseccomp(self, names: Set[str]) -> Set[str]:
        """The ``names`` the container's libseccomp cannot resolve (systemd drops them)."""
        if not names:
            return set()
        probe = ("import ctypes, sys; lib = ctypes.CDLL('libseccomp.so.2'); "
                 "print(' '.join(n for n in sys.argv[1:] if lib.seccomp_syscall_resolve_name(n.encode()) == -1))")
        return set(self.stage.sh("python3", "-c", probe, *sorted(names)).stdout.split())


def expected_and_shown(stage: Stage, key: str, values: List[str], shown: Dict[str, str]) -> Tuple[object, object]:
    """What ``systemctl show`` must say for the unit's ``key=values``, and what it says."""
    if key.endswith("Sec"):  # WatchdogSec=30 -> WatchdogUSec=30s
        prop = key[:-3] + "USec"
        return seconds(values[-1]), seconds(shown[prop])
    value = shown[key]
    if key == "SystemCallFilter":
        groups = SyscallGroups(stage)
        allowed: Set[str] = set()
        for v in values:  # systemd's semantics: the first sets an allow list, "~" removes from it
            if v.startswith("~"):
                allowed -= set().union(*(groups.expand(x) for x in v[1:].split()))
            else:
                allowed |= set().union(*(groups.expand(x) for x in v.split()))
        shown_set = set(value.split())
        # names this systemd's libseccomp does not know (newer than it) cannot be in any filter
        unknown = groups.unknown_to_libseccomp(allowed - shown_set)
        return allowed - unknown, shown_set
    if key == "SystemCallErrorNumber":
        return getattr(errno, values[-1]), int(value)
    if key in ("RestrictAddressFamilies", "SupplementaryGroups"):
        return set(" ".join(values).split()), set(value.split())
    if key == "DeviceAllow":  # systemd adds its own (ProtectClock= adds char-rtc r)
        return set(values), set(value.split("\n")) & set(values)
    if key == "MemoryMax" and values[-1].endswith("%"):
        mem_total = int(next(l for l in stage.sh("cat", "/proc/meminfo").stdout.splitlines()
                             if l.startswith("MemTotal:")).split()[1]) * 1024
        want = mem_total * float(values[-1][:-1]) / 100
        return round(want / 2**20), round(int(value) / 2**20)  # MiB: systemd rounds to pages
    if key == "LoadCredential":
        return "\n".join(values), stage.load_credential()
    if key in ("ExecStart", "ExecReload"):
        return " ".join(shlex.split(values[-1])), re.search(r"argv\[\]=(.*?) ;", value).group(1)
    return " ".join(values) if len(values) > 1 else values[-1], value


def test_every_directive_of_the_shipped_unit_is_in_force(stage: Stage) -> None:
    settings = shipped_service_settings()
    keys = list(dict.fromkeys(k for k, _ in settings))
    props = [k[:-3] + "USec" if k.endswith("Sec") else k for k in keys]
    shown = stage.show(*props)
    wrong = {}
    for key in keys:
        want, got = expected_and_shown(stage, key, [v for k, v in settings if k == key], shown)
        if want != got:
            wrong[key] = ((f"missing {sorted(want - got)}, extra {sorted(got - want)}")
                          if isinstance(want, set) and isinstance(got, set) else (want, got))
    assert not wrong, f"systemctl show disagrees with the shipped unit: {wrong}"
    assert {"MemoryDenyWriteExecute", "ProtectSystem", "SystemCallFilter", "NoNewPrivileges",
            "CapabilityBoundingSet", "DevicePolicy"} <= set(keys)
    NOTES.append(f"{len(keys)} directives of the shipped unit checked against systemctl show")


def proc_status(pid: int) -> Dict[str, str]:
    return dict(line.split(":\t", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":\t" in line)


def test_sandbox_is_enforced_on_the_running_agent_while_it_publishes_masks(stage: Stage) -> None:
    """The live agent's own system calls (injected with ptrace into its main thread): a W+X
    mapping and making memory executable are refused (MemoryDenyWriteExecute=, seccomp), a file
    under /usr cannot be created (ProtectSystem=strict: read-only file system) while its state
    directory stays writable; the same calls succeed in an unconfined process of the container.
    Meanwhile the agent keeps publishing masks (LiteRT and OpenCV at work under the sandbox)."""
    why = injection_supported()
    if why:
        pytest.skip(why)
    inner = stage.main_pid()
    pid = stage.machine.host_pid(inner)
    status = proc_status(pid)
    pid1 = proc_status(stage.machine.pid1)
    assert status["NoNewPrivs"] == "1" and status["Seccomp"].strip() == "2", status
    for cap in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
        assert int(status[cap], 16) == 0, (cap, status[cap])
    # the unit's filters come on top of nspawn's (which the container's systemd has too)
    assert int(status["Seccomp_filters"]) > int(pid1.get("Seccomp_filters", "0")), (status, pid1)
    assert status["Umask"] == "0077"
    mounts = {fields[4]: fields for fields in
              (l.split() for l in Path(f"/proc/{pid}/mountinfo").read_text().splitlines())}
    assert "ro" in mounts["/"][5].split(","), mounts["/"]  # ProtectSystem=strict
    assert "rw" in mounts[AGENT_STATE][5].split(","), mounts.get(AGENT_STATE)  # its StateDirectory
    assert "hidepid=invisible" in " ".join(mounts["/proc"]), mounts["/proc"]  # ProtectProc=invisible
    assert Path(f"/proc/{pid}/root/home").stat().st_mode & 0o777 == 0  # ProtectHome=yes: inaccessible

    mark = stage.count()
    stage.wait_messages("mask", mark, timeout=30)

    def probe(host_pid: int, writable_dir: str) -> Dict[str, int]:
        inj = Injector(host_pid)
        res: Dict[str, int] = {}
        try:
            res["mmap rwx"] = inj.syscall("mmap", 0, 4096, PROT_READ | PROT_WRITE | PROT_EXEC, MAP_PRIVATE_ANON, -1, 0)
            if res["mmap rwx"] >= 0:
                inj.syscall("munmap", res["mmap rwx"], 4096)
            page = inj.syscall("mmap", 0, 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE_ANON, -1, 0)
            assert page > 0, errno_name(page)
            res["mprotect rx"] = inj.syscall("mprotect", page, 4096, PROT_READ | PROT_EXEC)
            inj.syscall("munmap", page, 4096)
            for what, path in (("create in /usr", "/usr/lib/edge-agent-probe"),
                               ("create in writable dir", f"{writable_dir}/edge-agent-probe")):
                addr = inj.scratch(path.encode() + b"\0")
                fd = res[what] = inj.syscall("openat", AT_FDCWD, addr, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                if fd >= 0:
                    inj.syscall("close", fd)
                    inj.syscall("unlinkat", AT_FDCWD, addr, 0)
        finally:
            inj.close()
        return res

    agent = probe(pid, AGENT_STATE)
    NOTES.append(f"the agent's own system calls: { {k: errno_name(v) for k, v in agent.items()} }")
    assert agent["mmap rwx"] == -errno.EPERM and agent["mprotect rx"] == -errno.EPERM, agent
    assert agent["create in /usr"] == -errno.EROFS, agent
    assert agent["create in writable dir"] >= 0, agent

    # The control: an unconfined root process of the same container is allowed all of it.
    sleeper = subprocess.Popen(["nsenter", "-t", str(stage.machine.pid1), "-a", "sleep", "60"])

    def sleep_pid() -> int:  # nsenter forks to enter the pid namespace: its child
        return next((c for c in children(sleeper.pid)
                     if Path(f"/proc/{c}/comm").read_text().strip() == "sleep"), 0)
    inner_sleep = 0
    try:
        inner_sleep = wait_for(sleep_pid, 10, "sleep in the container")
        other = probe(inner_sleep, "/var/tmp")
    finally:  # the sleep itself (killing nsenter would leave it behind in the container)
        os.kill(inner_sleep, signal.SIGKILL) if inner_sleep else sleeper.kill()
        sleeper.wait(10)
    assert other["mmap rwx"] > 0 and other["mprotect rx"] == 0 and other["create in /usr"] >= 0, other

    # it went on segmenting and publishing throughout, and is the same process
    masks = stage.wait_messages("mask", mark, n=4, timeout=30)
    mask = decode_mask_png(masks[-1].payload)
    assert mask.ndim == 2 and 0 < mask.max() <= 20
    assert stage.main_pid() == inner and stage.show("NRestarts")["NRestarts"] == "0"


def test_systemctl_reload_rereads_the_config(stage: Stage) -> None:
    pid = stage.main_pid()
    stage.sh("sed", "-i", 's/^mask_resolution = "model"/mask_resolution = "frame"/', "/etc/edge-agent/config.toml")
    assert 'mask_resolution = "frame"' in stage.machine.path("/etc/edge-agent/config.toml").read_text()
    mark = stage.count()
    reload = stage.sh("systemctl", "reload", UNIT, ok=False)
    assert reload.returncode == 0, reload.stderr + stage.journal_text()[-3000:]

    def info_says_frame(msg) -> bool:
        return json.loads(msg.payload).get("publish", {}).get("mask_resolution") == "frame"
    stage.wait_messages("info", mark, where=info_says_frame, timeout=30)
    wait_for(lambda: "reloading the configuration" in stage.journal_text(), 10, "the reload line")
    # the retained info a newcomer gets says so too, and the masks now come at the frame's size
    late = Recorder(stage.broker.host, stage.broker.port, topics=TOPICS + "info", auth=(MQTT_USER, MQTT_PASSWORD))
    try:
        wait_for(lambda: late.matching(TOPICS + "info") and info_says_frame(late.matching(TOPICS + "info")[-1]),
                 10, "the retained info with mask_resolution frame")
    finally:
        late.close()
    results = stage.wait_messages("result", mark, n=2, timeout=30,
                                  where=lambda m: (json.loads(m.payload).get("mask") or {}).get("resolution") == "frame")
    doc = json.loads(results[-1].payload)
    assert (doc["mask"]["w"], doc["mask"]["h"]) == (doc["frame"]["w"], doc["frame"]["h"]), doc
    assert stage.main_pid() == pid and stage.show("ActiveState")["ActiveState"] == "active"


def test_a_hung_agent_is_killed_and_restarted_by_the_watchdog(stage: Stage) -> None:
    """SIGSTOP freezes every thread: no WATCHDOG=1 within WatchdogSec (30 s), systemd aborts it
    (SIGABRT, then SIGKILL after TimeoutAbortSec for a stopped process) and restarts it."""
    before = stage.show("MainPID", "NRestarts", "WatchdogUSec")
    old = int(before["MainPID"])
    t0 = time.monotonic()
    os.kill(stage.machine.host_pid(old), signal.SIGSTOP)
    new = stage.wait_active(timeout=150, new_pid_than=old)
    took = time.monotonic() - t0
    after = stage.show("NRestarts")
    NOTES.append(f"watchdog: SIGSTOP -> killed, restarted and active again in {took:.1f} s")
    assert int(after["NRestarts"]) == int(before["NRestarts"]) + 1, (before, after)
    assert new != old
    assert "Watchdog timeout" in stage.journal_text()
    mark = stage.count()
    stage.wait_messages("mask", mark, timeout=30)


def test_systemctl_stop_publishes_the_final_info_and_offline(stage: Stage) -> None:
    mark = stage.count()
    stage.sh("systemctl", "stop", UNIT, timeout=60)
    stage.wait_messages("availability", mark, where=lambda m: m.payload == b"offline", timeout=20)
    tail = stage.recorder_from(mark)
    infos = [i for i, m in enumerate(tail) if m.topic == TOPICS + "info"
             and json.loads(m.payload).get("status") == "stopped"]
    offline = next(i for i, m in enumerate(tail) if m.topic == TOPICS + "availability" and m.payload == b"offline")
    assert infos and infos[0] < offline, [(m.topic, m.payload[:60]) for m in tail[-10:]]
    s = stage.show("ActiveState", "Result", "ExecMainCode", "ExecMainStatus")
    assert s == {"ActiveState": "inactive", "Result": "success", "ExecMainCode": "1", "ExecMainStatus": "0"}, s
    # a newcomer finds the retained offline and the final info
    late = Recorder(stage.broker.host, stage.broker.port, topics=TOPICS + "#", auth=(MQTT_USER, MQTT_PASSWORD))
    try:
        late.wait_for(TOPICS + "availability", b"offline", timeout=10)
        wait_for(lambda: late.matching(TOPICS + "info"), 10, "retained info")
        assert json.loads(late.matching(TOPICS + "info")[-1].payload)["status"] == "stopped"
    finally:
        late.close()


def test_uninstall_purge_leaves_nothing(stage: Stage) -> None:
    m = stage.machine
    out = stage.sh(f"{USER_VENV}/bin/edge-agent", "service", "uninstall", "--purge").stdout
    assert "* remove user edge-agent" in out and f"* remove {CREDENTIAL}" in out, out
    assert stage.show("LoadState")["LoadState"] == "not-found"
    assert stage.sh("getent", "passwd", "edge-agent", ok=False).returncode == 2
    assert stage.sh("getent", "group", "edge-agent", ok=False).returncode == 2
    for path in ("/opt/edge-agent", "/etc/edge-agent", AGENT_STATE, "/etc/systemd/system/edge-agent.service",
                 "/etc/systemd/system/multi-user.target.wants/edge-agent.service", CREDENTIAL):
        assert not os.path.lexists(m.path(path)), path
    assert accounts(m) == stage.accounts_before  # the user and its group memberships gone
    after = snapshot(m.dir)
    created = sorted(set(after) - set(stage.before))
    # the password the user put where the install said goes too (the service's secret)
    removed = sorted(set(stage.before) - set(after) - {CREDENTIAL.lstrip("/")})
    changed = sorted(p for p in set(after) & set(stage.before) if after[p] != stage.before[p]
                     and not (after[p][0] == "d" and after[p][1:4] == stage.before[p][1:4]))
    assert (created, removed, changed) == ([], [], []), (created, removed, changed)
