"""Per-device identity and least privilege at the broker (issue 24, "What to build" 1 and 2), on a
REAL mosquitto 2.0 with the dynamic security plugin (its first config file made by the real
``mosquitto_ctrl dynsec init``), provisioned by ``edge-agent fleet ...`` through the plugin's
MQTT control API:

* device A's credentials cannot get one message onto B's topics (commands or data): the broker
  refuses, the agent counts it in ``stats.mqtt.refused`` and logs it once per topic and reason;
  a device's credentials work only with its own client id; MQTT 3.1.1 drops a denied publish
  silently (nothing to count);
* a viewer cannot command; a revoked device is disconnected and cannot reconnect; rotation
  refuses the old password at once and the real agent reconnects after a reload with the new one;
* the real agent, ``remote devices``, ``remote bench`` and the console work with least-privilege
  credentials (device; operator; the console also as a viewer); Home Assistant's rights;
* ``fleet init --dynsec-file`` writes a plugin config mosquitto loads as is;
* ``service install --mqtt-credentials`` takes the file ``fleet add --out`` wrote.
"""

from __future__ import annotations

import json
import time
import logging
import signal
import stat
import threading
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from edge_agent.cli import main as cli_main
from edge_agent.comms.broker import MosquittoBroker
from edge_agent.comms.mqtt import MqttComms
from edge_agent.config import load_config
from edge_agent.fleet import security
from tests.broker import Recorder, dynsec_plugin, mosquitto_available
from tests.helpers import OutputLines, start_agent, wait_until, write_config

pytestmark = [pytest.mark.broker,
              pytest.mark.skipif(not (mosquitto_available() and dynsec_plugin()),
                                 reason="needs mosquitto with the dynamic security plugin and mosquitto_ctrl")]

ADMIN_PW = "admin-secret-pw"
PREFIX = "edge-agent"


class Site:
    """A dynsec mosquitto and the admin's broker flags for ``edge-agent fleet``."""

    def __init__(self, broker: Any, tmp: Path) -> None:
        self.broker = broker
        self.tmp = tmp
        pw = tmp / "admin.pw"
        pw.write_text(ADMIN_PW + "\n")
        self.admin = ["--host", "127.0.0.1", "--port", str(broker.port), "--username", "admin",
                      "--password-file", str(pw)]

    def fleet(self, capsys: Any, *args: str) -> Tuple[int, str, str]:
        code = cli_main(["fleet", *args, *self.admin])
        out, err = capsys.readouterr()
        return code, out, err

    def add(self, capsys: Any, name: str, *flags: str) -> Path:
        path = self.tmp / f"{name}.cred"
        code, out, err = self.fleet(capsys, "add", name, *flags, "--out", str(path))
        assert code == 0, err
        return path


@pytest.fixture
def site(mosquitto, tmp_path: Path) -> Site:
    return Site(mosquitto(dynsec=("admin", ADMIN_PW)), tmp_path)


class Probe:
    """A raw paho client recording CONNACK, PUBACK and SUBACK reason codes."""

    def __init__(self, port: int, user: str, password: str, client_id: str = "",
                 protocol: int = paho.MQTTv5) -> None:
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=protocol)
        self.client.username_pw_set(user, password)
        self.connack: Optional[Any] = None
        self.acks: Dict[int, Any] = {}
        self._cond = threading.Condition()
        self.client.on_connect = self._on_connect
        self.client.on_publish = lambda c, u, mid, rc, p: self._ack(mid, rc)
        self.client.on_subscribe = lambda c, u, mid, rcs, p: self._ack(mid, list(rcs))
        self.client.connect("127.0.0.1", port, 30)
        self.client.loop_start()
        with self._cond:
            assert self._cond.wait_for(lambda: self.connack is not None, 10), "no CONNACK"

    def _on_connect(self, c: Any, u: Any, flags: Any, rc: Any, props: Any) -> None:
        with self._cond:
            self.connack = rc
            self._cond.notify_all()

    def _ack(self, mid: int, rc: Any) -> None:
        with self._cond:
            self.acks[mid] = rc
            self._cond.notify_all()

    def wait_ack(self, mid: int) -> Any:
        with self._cond:
            assert self._cond.wait_for(lambda: mid in self.acks, 10), f"no ack for {mid}"
            return self.acks[mid]

    def publish(self, topic: str, payload: bytes = b"x") -> Any:
        return self.wait_ack(self.client.publish(topic, payload, qos=1).mid)

    def subscribe(self, topic: str) -> Any:
        return self.wait_ack(self.client.subscribe(topic, 1)[1])[0]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def secret_of(path: Path) -> Tuple[str, str]:
    cfg = load_config(str(path)).mqtt
    return cfg.username, cfg.password


def test_fleet_commands_files_and_validation(site: Site, capsys):
    """init is idempotent; add writes a 0600 config fragment (device: device_id, user, client id),
    refuses 'all', bad ids and existing names; list shows kinds; passwords never reach the log."""
    logged = Lines("edge_agent")
    for _ in range(2):
        code, out, err = site.fleet(capsys, "init")
        assert code == 0, err
        assert "edge-agent-operator" in out
    path = site.add(capsys, "pi-1")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    cfg = load_config(str(path))
    assert (cfg.agent.device_id, cfg.mqtt.username, cfg.mqtt.client_id) == ("pi-1", "pi-1", "edge-agent-pi-1")
    assert len(cfg.mqtt.password) >= 32 and cfg.mqtt.port == site.broker.port
    for bad, why in (("all", "reserved"), ("a/b", "letters"), ("pi-1", "exists already")):
        code, out, err = site.fleet(capsys, "add", bad)
        assert code == 2 and why in err, err
    code, out, err = site.fleet(capsys, "add", "alice", "--operator")  # printed once on stdout
    assert code == 0 and 'username = "alice"' in out and "password = " in out
    printed = load_config_text(site.tmp, out).mqtt.password
    code, out, err = site.fleet(capsys, "add", "pi-1", "--out", str(path))
    assert code == 2 and "not overwritten" in err
    code, out, err = site.fleet(capsys, "add", "pi-2", "--out", str(site.tmp / "no-such-dir" / "pi-2.cred"))
    assert code == 2 and "cannot write" in err  # refused before the broker made a password nobody holds
    code, out, err = site.fleet(capsys, "list", "--json")
    kinds = {e["username"]: (e["kind"], e["client_id"]) for e in json.loads(out)}
    assert kinds == {"pi-1": ("device", "edge-agent-pi-1"), "alice": ("operator", ""), "admin": ("admin", "")}
    logged.close()
    text = "\n".join(logged.lines)
    assert "pi-1" in text and cfg.mqtt.password not in text and printed not in text


def load_config_text(tmp: Path, text: str) -> Any:
    path = tmp / "printed.toml"
    path.write_text(text)
    return load_config(str(path))


class Lines(logging.Handler):
    """Every message logged on ``name`` (and below), whatever handlers the CLI installed on root."""

    def __init__(self, name: str) -> None:
        super().__init__(logging.DEBUG)
        self.lines: List[str] = []
        self.logger = logging.getLogger(name)
        self.logger.addHandler(self)
        self._level = self.logger.level
        self.logger.setLevel(logging.DEBUG)

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())

    def close(self) -> None:
        self.logger.removeHandler(self)
        self.logger.setLevel(self._level)
        super().close()


def test_device_a_cannot_reach_device_b(site: Site, capsys):
    """A's credentials: nothing gets onto B's topics (commands or data), by MqttComms or a raw
    client; the refusals are counted per reason and logged once per topic; A's user is refused
    under another client id; 3.1.1 drops a denied publish silently."""
    a_cred, b_cred, op_cred = site.add(capsys, "dev-a"), site.add(capsys, "dev-b"), site.add(capsys, "op", "--operator")
    op_user, op_pw = secret_of(op_cred)
    rec = Recorder("127.0.0.1", site.broker.port, f"{PREFIX}/#", auth=(op_user, op_pw))
    logged = Lines("edge_agent.comms.mqtt")  # the CLI's setup_logging replaced caplog's root handler
    a = MqttComms(load_config(str(a_cred)).mqtt, "dev-a")
    b = MqttComms(load_config(str(b_cred)).mqtt, "dev-b")
    got_b: List[str] = []
    b.add_command_handler("benchmark", lambda topic, payload, props: got_b.append(topic))
    a.start(), b.start()
    try:
        assert a.wait_connected(10) and b.wait_connected(10)
        rec.wait_for(f"{PREFIX}/dev-b/availability", b"online")
        published = a.stats()["published"]
        for _ in range(2):  # twice: counted twice, logged once
            assert a.publish_topic(f"{PREFIX}/dev-b/cmd/benchmark", {"request_id": "x"}, qos=1)
            assert a.publish_topic(f"{PREFIX}/dev-b/result", {"seq": 1}, qos=1)
        a.add_listener(f"{PREFIX}/dev-b/#", lambda *args: None)
        refused = wait_until(lambda: (lambda r: r if r["publish"].get("Not authorized") == 4
                                      and r["subscribe"].get("Not authorized") == 1 else None)(a.stats()["refused"]),
                             10, "A's refusals counted")
        assert refused == {"publish": {"Not authorized": 4}, "subscribe": {"Not authorized": 1}}
        assert a.stats()["published"] == published and a.stats()["inflight"] == 0
        # A's own topics work; everything A sent before this arrived before it (one connection)
        assert a.publish("result", {"seq": 2}, qos=1)
        rec.wait_for(f"{PREFIX}/dev-a/result")
        assert a.stats()["published"] == published + 1
        a.stop()  # the raw clients below take its client id (the only one A's user may use)
        user, pw = secret_of(a_cred)
        raw = Probe(site.broker.port, user, pw, "edge-agent-dev-a")
        try:
            assert raw.publish(f"{PREFIX}/dev-b/cmd/deploy").value == 0x87
            assert raw.publish(f"{PREFIX}/all/cmd/benchmark").value == 0x87  # only operators command the fleet
            assert raw.subscribe(f"{PREFIX}/dev-b/cmd/#").value == 0x87
            assert raw.subscribe(f"{PREFIX}/#").value == 0x87
        finally:
            raw.close()
        assert Probe(site.broker.port, user, pw, "edge-agent-dev-b").connack.value == 0x87
        old = Probe(site.broker.port, user, pw, "edge-agent-dev-a", protocol=paho.MQTTv311)
        try:  # MQTT 3.1.1: PUBACK success, the message silently dropped by the broker
            assert old.publish(f"{PREFIX}/dev-b/cmd/benchmark").value == 0
            old.publish(f"{PREFIX}/dev-a/result", b"marker")
        finally:
            old.close()
        rec.wait_for(f"{PREFIX}/dev-a/result", b"marker")
        on_b = [m.topic for m in rec.messages if m.topic.startswith(f"{PREFIX}/dev-b/")
                and not m.topic.endswith(("/availability", "/info"))]
        assert on_b == [] and got_b == []
        lines = [x for x in logged.lines if "refused the" in x]
        assert len([x for x in lines if f"{PREFIX}/dev-b/cmd/benchmark" in x]) == 1, lines
        assert len([x for x in lines if f"{PREFIX}/dev-b/result" in x]) == 1, lines
        assert len([x for x in lines if f"subscription to {PREFIX}/dev-b/#" in x]) == 1, lines
        assert all("Not authorized" in x and "dev-a" in x for x in lines)
    finally:
        a.stop(), b.stop()
        rec.close()
        logged.close()


def test_viewer_cannot_command_revoked_device_cannot_reconnect(site: Site, capsys):
    dev = site.add(capsys, "dev-r")
    viewer = site.add(capsys, "watcher", "--viewer")
    v_user, v_pw = secret_of(viewer)
    agent = MqttComms(load_config(str(dev)).mqtt, "dev-r")
    got: List[str] = []
    agent.add_command_handler("benchmark", lambda topic, payload, props: got.append(topic))
    agent.start()
    probe = Probe(site.broker.port, v_user, v_pw, "any-id")
    try:
        assert agent.wait_connected(10)
        assert probe.subscribe(f"{PREFIX}/#").value == 1  # reads everything
        for topic in (f"{PREFIX}/dev-r/cmd/benchmark", f"{PREFIX}/all/cmd/benchmark", f"{PREFIX}/dev-r/result"):
            assert probe.publish(topic).value == 0x87, topic
        code, out, err = site.fleet(capsys, "revoke", "dev-r")
        assert code == 0 and "deleted" in out
        wait_until(lambda: not agent.connected, 10, "the revoked device disconnected")
        wait_until(lambda: "Not authorized" in (agent.stats()["last_error"] or ""), 15,
                   "the revoked device's reconnects refused")
        assert got == []
        user, pw = secret_of(dev)
        assert Probe(site.broker.port, user, pw, "edge-agent-dev-r").connack.value == 0x87
        code, out, err = site.fleet(capsys, "list", "--json")
        assert "dev-r" not in {e["username"] for e in json.loads(out)}
        # disable/enable (reversible revocation) for a person
        code, out, err = site.fleet(capsys, "revoke", "watcher", "--disable")
        assert code == 0
        wait_until(lambda: not probe.client.is_connected(), 10, "the disabled viewer disconnected")
        assert Probe(site.broker.port, v_user, v_pw, "x").connack.value == 0x87
        assert site.fleet(capsys, "enable", "watcher")[0] == 0
        assert Probe(site.broker.port, v_user, v_pw, "x").connack.value == 0
    finally:
        agent.stop()
        probe.close()


def test_real_agent_operator_cli_and_rotation(site: Site, capsys, tmp_path: Path):
    """The real agent on device credentials (password_file, its client id from the default), with
    Home Assistant on but no discovery rights: it runs, counts and logs the refusals; ``remote
    devices`` and ``remote bench`` work with operator credentials; ``fleet rotate`` disconnects it,
    the old password is refused, and a reload with the new password file reconnects it."""
    cred = site.add(capsys, "pi-7")
    op = site.add(capsys, "ops", "--operator")
    user, pw = secret_of(cred)
    pw_file = tmp_path / "mqtt_password"
    pw_file.write_text(pw + "\n")
    config = write_config(tmp_path / "agent.toml", "pi-7", site.broker.port,
                          {"kind": "synthetic", "fps": 5.0, "width": 160, "height": 120},
                          mqtt={"username": user, "password_file": str(pw_file)},
                          publish={"stats_interval_s": 0.5}, homeassistant={"enabled": True})
    op_user, op_pw = secret_of(op)
    rec = Recorder("127.0.0.1", site.broker.port, f"{PREFIX}/#", auth=(op_user, op_pw))
    proc = start_agent(config)
    out = OutputLines(proc)
    try:
        rec.wait_for(f"{PREFIX}/pi-7/availability", b"online", timeout=60)
        out.wait_for("refused the subscription to homeassistant/status", timeout=30)

        def refused() -> Optional[Dict[str, Any]]:
            for m in reversed(rec.matching(f"{PREFIX}/pi-7/stats")):
                r = json.loads(m.payload)["mqtt"]["refused"]
                if r["subscribe"].get("Not authorized", 0) >= 2:
                    return r
            return None
        counts = wait_until(refused, 30, "stats.mqtt.refused")
        assert counts["subscribe"]["Not authorized"] >= 2  # homeassistant/status and its configs
        flags = ["--config", str(op)]
        assert cli_main(["remote", "devices", "--discover-s", "1", *flags]) == 0
        listed = capsys.readouterr().out
        assert "pi-7" in listed
        assert cli_main(["remote", "bench", "-d", "pi-7", "--runs", "3", "--progress", "none",
                         "--timeout", "60", *flags]) == 0
        assert "done" in capsys.readouterr().out
        # a viewer lists the devices from their retained states (its presence query is refused) ...
        viewer = site.add(capsys, "viewer-7", "--viewer")
        assert cli_main(["remote", "devices", "--discover-s", "1", "--config", str(viewer)]) == 0
        captured = capsys.readouterr()
        assert "pi-7" in captured.out and "presence query refused by the broker" in captured.err, captured
        # ... and its command is refused by the broker: said at once, not after the answer timeout
        started = time.monotonic()
        assert cli_main(["remote", "bench", "-d", "pi-7", "--runs", "3", "--progress", "none",
                         "--timeout", "60", "--config", str(viewer)]) == 2
        err = capsys.readouterr().err
        assert f"the broker refused the publish on {PREFIX}/pi-7/cmd/benchmark: Not authorized" in err, err
        assert time.monotonic() - started < 30 and "Traceback" not in err
        # rotation: the broker kicks the agent, its old password is refused
        new = tmp_path / "pi-7.new.cred"
        code, _, err = site.fleet(capsys, "rotate", "pi-7", "--out", str(new))
        assert code == 0, err
        out.wait_for("refused the connection: Not authorized", timeout=30)
        assert Probe(site.broker.port, user, pw, "edge-agent-pi-7").connack.value == 0x87
        pw_file.write_text(secret_of(new)[1] + "\n")
        before = len(rec.matching(f"{PREFIX}/pi-7/availability", b"online"))
        proc.send_signal(signal.SIGHUP)
        rec.wait_for(f"{PREFIX}/pi-7/availability", b"online", count=before + 1, timeout=40)
    finally:
        text = out.stop()
        rec.close()
    assert pw not in text and secret_of(new)[1] not in text, "a password reached the agent's log"


def test_init_writes_a_plugin_config_mosquitto_loads(tmp_path: Path, capsys):
    """``fleet init --dynsec-file`` (no mosquitto_ctrl): the admin, roles and groups in the file;
    mosquitto started with the printed lines accepts the admin, and devices can be added."""
    dynsec, admin, conf = tmp_path / "dynamic-security.json", tmp_path / "admin.toml", tmp_path / "edge.conf"
    args = ["fleet", "init", "--dynsec-file", str(dynsec), "--admin-out", str(admin), "--broker-conf", str(conf),
            "--port", "1"]
    assert cli_main(args) == 0, capsys.readouterr().err
    assert stat.S_IMODE(dynsec.stat().st_mode) == 0o600 and stat.S_IMODE(admin.stat().st_mode) == 0o600
    lines = [ln for ln in conf.read_text().splitlines() if ln and not ln.startswith("#")]
    assert f"plugin_opt_config_file {dynsec}" in lines and any(ln.startswith("plugin /") for ln in lines)
    broker = MosquittoBroker(workdir=str(tmp_path), extra_conf=[*lines, "allow_anonymous false"]).start()
    try:
        flags = ["--config", str(admin), "--port", str(broker.port), "--host", "127.0.0.1"]
        assert cli_main(["fleet", "add", "pi-9", "--out", str(tmp_path / "pi-9.cred"), *flags]) == 0
        capsys.readouterr()
        assert cli_main(["fleet", "list", "--json", *flags]) == 0
        listed = {e["username"]: e["kind"] for e in json.loads(capsys.readouterr().out)}
        assert listed == {"pi-9": "device", "admin": "admin"}
        user, pw = secret_of(tmp_path / "pi-9.cred")
        probe = Probe(broker.port, user, pw, "edge-agent-pi-9")
        try:
            assert probe.publish(f"{PREFIX}/pi-9/result").value == 0x10  # allowed (no subscriber)
            assert probe.publish(f"{PREFIX}/other/result").value == 0x87
        finally:
            probe.close()
    finally:
        broker.close()


def test_service_install_takes_the_credentials_file(site: Site, capsys, tmp_path: Path):
    """One command on each side: ``fleet add pi-5 --out F`` on the host, ``service install
    --mqtt-credentials F`` on the device (staging root here): the password lands in the credential
    store (0600) and not in the config, the identity in the config; the agent's connection made
    from that config (the password through $CREDENTIALS_DIRECTORY, as LoadCredential gives it) is
    accepted by the broker; a second install changes nothing."""
    import subprocess
    import sys

    cred = site.add(capsys, "pi-5")
    root = tmp_path / "root"
    args = [sys.executable, "-m", "edge_agent.cli.service", "install", "--root", str(root), "--no-package",
            "--python", sys.executable, "--no-enable", "--mqtt-credentials", str(cred)]
    first = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert first.returncode == 0, first.stdout + first.stderr
    store = root / "etc/credstore/edge-agent.mqtt_password"
    config = root / "etc/edge-agent/config.toml"
    user, pw = secret_of(cred)
    assert store.read_text() == pw + "\n" and stat.S_IMODE(store.stat().st_mode) == 0o600
    assert pw not in config.read_text() and pw not in first.stdout + first.stderr
    creds_dir = tmp_path / "creds"
    creds_dir.mkdir()
    (creds_dir / "mqtt_password").write_text(store.read_text())
    cfg = load_config(str(config), env={"CREDENTIALS_DIRECTORY": str(creds_dir)})
    assert (cfg.agent.device_id, cfg.mqtt.username, cfg.mqtt.client_id, cfg.mqtt.password) == \
        ("pi-5", "pi-5", "edge-agent-pi-5", pw)
    assert (cfg.mqtt.host, cfg.mqtt.port) == ("127.0.0.1", site.broker.port)
    comms = MqttComms(cfg.mqtt, cfg.agent.device_id)
    comms.start()
    try:
        assert comms.wait_connected(10), comms.stats()["last_error"]
    finally:
        comms.stop()
    again = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "MQTT password to" in again.stdout and "Nothing to change" in again.stdout, again.stdout


def test_console_on_viewer_and_operator_credentials(site: Site, capsys, tmp_path: Path, monkeypatch):
    """The console sees the fleet with a viewer's credentials (read only) and with an operator's."""
    pytest.importorskip("uvicorn")
    import urllib.request

    from tests.helpers import ConsoleProcess

    dev = site.add(capsys, "pi-c")
    agent = MqttComms(load_config(str(dev)).mqtt, "pi-c")
    agent.set_info({"device_id": "pi-c", "agent_version": "test"})
    agent.start()
    token = "fleet-security-console-token"
    monkeypatch.setenv("EDGE_AGENT_CONSOLE_TOKEN", token)
    try:
        assert agent.wait_connected(10)
        for kind in ("--viewer", "--operator"):
            user, pw = secret_of(site.add(capsys, f"console{kind.strip('-')}", kind))
            pw_file = tmp_path / f"{user}.pw"
            pw_file.write_text(pw + "\n")
            console = ConsoleProcess(site.broker.port, "--username", user, "--password-file", str(pw_file),
                                     *(["--read-only"] if kind == "--viewer" else []))
            try:
                def online() -> bool:
                    request = urllib.request.Request(console.url + "api/devices", headers={"X-Console-Token": token})
                    with urllib.request.urlopen(request, timeout=10) as response:
                        devices = json.loads(response.read())["devices"]
                    return any(d.get("device") == "pi-c" and d.get("online") for d in devices)
                wait_until(online, 20, f"pi-c online in the console ({kind})")
            finally:
                text = console.stop()
            assert pw not in text
    finally:
        agent.stop()


def test_home_assistant_rights(site: Site, capsys):
    """``--homeassistant``: a device may publish its own discovery configs (not another device's)
    and hear HA's status; Home Assistant as a viewer reads discovery and publishes its status only."""
    user, pw = secret_of(site.add(capsys, "pi-h", "--homeassistant"))
    dev = Probe(site.broker.port, user, pw, "edge-agent-pi-h")
    try:
        assert dev.publish("homeassistant/sensor/edge-agent-pi-h/fps/config").value < 0x80
        assert dev.publish("homeassistant/sensor/edge-agent-other/fps/config").value == 0x87
        assert dev.subscribe("homeassistant/status").value == 1
        assert dev.subscribe("homeassistant/+/edge-agent-pi-h/+/config").value == 1
        assert dev.subscribe("homeassistant/#").value == 0x87
    finally:
        dev.close()
    user, pw = secret_of(site.add(capsys, "hass", "--viewer", "--homeassistant"))
    ha = Probe(site.broker.port, user, pw, "hass-core")
    try:
        assert ha.subscribe("homeassistant/#").value == 1 and ha.subscribe(f"{PREFIX}/#").value == 1
        assert ha.publish("homeassistant/status", b"online").value < 0x80
        assert ha.publish("homeassistant/sensor/edge-agent-pi-h/fps/config").value == 0x87
        assert ha.publish(f"{PREFIX}/pi-h/cmd/benchmark").value == 0x87
    finally:
        ha.close()
