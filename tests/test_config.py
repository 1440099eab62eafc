"""Config: TOML parsing, refusals with key path + expected type, env/--set overrides, secrets."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import pytest

from edge_agent import config as C
from edge_agent.config import ConfigError, load_config

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "edge_agent" / "data" / "config.example.toml"
ENV = {"STATE_DIRECTORY": "/var/lib/edge-agent"}  # no EDGE_AGENT_* from the caller's shell


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "config.toml"
    path.write_text(text)
    return str(path)


def refusal(*args, **kwargs) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(*args, **kwargs)
    return str(info.value)


def test_defaults_and_computed_values(monkeypatch):
    monkeypatch.setattr(C.socket, "gethostname", lambda: "Pi 4.local")
    cfg = load_config(None, env=ENV)
    assert cfg.agent.device_id == "Pi-4"
    assert cfg.agent.state_dir == "/var/lib/edge-agent"
    assert cfg.mqtt.client_id == "edge-agent-Pi-4"
    assert (cfg.mqtt.host, cfg.mqtt.port, cfg.mqtt.protocol, cfg.mqtt.qos_state) == ("localhost", 1883, "auto", 1)
    assert (cfg.source.kind, cfg.model.preprocess, cfg.publish.timings) == ("folder", "letterbox", "interval")
    assert load_config(None, env={}).agent.state_dir.endswith(".local/state/edge-agent")
    assert load_config(None, env={"STATE_DIRECTORY": "/a:/b"}).agent.state_dir == "/a"


def test_sanitise_device_id():
    assert C.sanitise_device_id("cam#1 (hall).lan") == "cam-1-hall"
    assert C.sanitise_device_id("...") == "edge-agent"


def test_example_documents_every_key_with_its_default():
    data = tomllib.loads(EXAMPLE.read_text())
    schema = {s: {f.name for f in dataclasses.fields(cls)} for s, cls in C.SECTIONS.items()}
    assert {s: set(t) for s, t in data.items()} == schema
    assert load_config(str(EXAMPLE), env=ENV) == load_config(None, env=ENV)


def test_file_values_are_typed(tmp_path):
    path = write(tmp_path, """
        [agent]
        device_id = "cam-1"
        [source]
        kind = "opencv"
        uri = "rtsp://cam/stream"
        fps = 15            # integer accepted for a float key
        [model]
        edgetpu = "usb:1"
        [mqtt]
        protocol = 5        # number accepted for the "5" choice
        topic_prefix = "site/a"
    """)
    cfg = load_config(path, env=ENV)
    assert cfg.source.fps == 15.0 and isinstance(cfg.source.fps, float)
    assert cfg.mqtt.protocol == "5"
    assert cfg.model.edgetpu == "usb:1"
    assert cfg.mqtt.client_id == "edge-agent-cam-1"


@pytest.mark.parametrize("toml, message", [
    ('[mqtt]\nport = "abc"', "mqtt.port: expected integer 1..65535, got 'abc'"),
    ("[mqtt]\nport = 70000", "mqtt.port: expected integer 1..65535, got 70000"),
    ("[mqtt]\nport = 1883.0", "mqtt.port: expected integer 1..65535, got 1883.0"),
    ('[mqtt]\ntls = "yes"', "mqtt.tls: expected boolean (true/false), got 'yes'"),
    ("[mqtt]\nqos_mask = 3", "mqtt.qos_mask: expected integer 0..2, got 3"),
    ('[mqtt]\nprotocol = "4"', "mqtt.protocol: expected one of 'auto', '5', '3.1.1', got '4'"),
    ('[mqtt]\ntopic_prefix = "a/+/b"', "mqtt.topic_prefix: expected MQTT topic without wildcards"),
    ("[mqtt]\nprot = 1", "mqtt.prot: unknown key (did you mean 'port'?)"),
    ("[mqtx]\nport = 1", "mqtx: unknown section (did you mean 'mqtt'?)"),
    ("mqtt = 1", "mqtt: expected a table"),
    ('[agent]\ndevice_id = "a/b"', "agent.device_id: expected string of letters, digits"),
    ('[source]\nkind = "webcam"', "source.kind: expected one of 'folder', 'opencv', 'picamera2', 'synthetic', got 'webcam'"),
    ("[source]\nfps = -1", "source.fps: expected number >= 0.0, got -1"),
    ('[model]\nedgetpu = "usb:x"', "model.edgetpu: expected '' or usb, usb:N, pci, pci:N, :N, got 'usb:x'"),
    ("[publish]\npng_compression = 10", "publish.png_compression: expected integer 0..9, got 10"),
    ("[publish]\nmask_every_n = 0", "publish.mask_every_n: expected integer >= 1, got 0"),
    ("[mqtt]\nreconnect_min_s = 40.0", "mqtt.reconnect_min_s: expected <= mqtt.reconnect_max_s"),
    ("[mqtt\nport = 1", "invalid TOML"),
])
def test_bad_file_values_are_refused_with_path_and_type(tmp_path, toml, message):
    assert message in refusal(write(tmp_path, toml), env=ENV)


def test_missing_file_is_refused(tmp_path):
    assert refusal(str(tmp_path / "nope.toml"), env=ENV) == f"config file not found: {tmp_path / 'nope.toml'}"


def test_env_overrides_parse_by_type():
    cfg = load_config(None, env={**ENV,
                                 "EDGE_AGENT_MQTT_PORT": "8883",
                                 "EDGE_AGENT_MQTT_TLS": "yes",
                                 "EDGE_AGENT_MQTT_RECONNECT_MAX_S": "12.5",
                                 "EDGE_AGENT_MQTT_PASSWORD_FILE": "",
                                 "EDGE_AGENT_PUBLISH_OVERLAY": "true",
                                 "EDGE_AGENT_CONFIG": "/etc/edge-agent/config.toml"})  # not a section: ignored
    assert (cfg.mqtt.port, cfg.mqtt.tls, cfg.mqtt.reconnect_max_s, cfg.publish.overlay) == (8883, True, 12.5, True)


@pytest.mark.parametrize("env, message", [
    ({"EDGE_AGENT_MQTT_PORT": "abc"}, "mqtt.port: expected integer 1..65535, got 'abc' (from EDGE_AGENT_MQTT_PORT)"),
    ({"EDGE_AGENT_MQTT_TLS": "maybe"}, "mqtt.tls: expected boolean (true/false), got 'maybe'"),
    ({"EDGE_AGENT_SOURCE_FPS": "fast"}, "source.fps: expected number >= 0.0, got 'fast'"),
    ({"EDGE_AGENT_MQTT_HOTS": "x"}, "EDGE_AGENT_MQTT_HOTS: unknown key mqtt.hots (did you mean 'host'?)"),
])
def test_bad_env_values_are_refused(env, message):
    assert message in refusal(None, env={**ENV, **env})


def test_precedence_file_env_set(tmp_path):
    path = write(tmp_path, "[mqtt]\nhost = 'from-file'\nport = 1000\nkeepalive = 60\n")
    env = {**ENV, "EDGE_AGENT_MQTT_PORT": "2000", "EDGE_AGENT_MQTT_HOST": "from-env"}
    cfg = load_config(path, ["mqtt.host=from-set", "mqtt.host=last-wins"], env=env)
    assert (cfg.mqtt.host, cfg.mqtt.port, cfg.mqtt.keepalive) == ("last-wins", 2000, 60)


@pytest.mark.parametrize("item, message", [
    ("mqtt.port=abc", "mqtt.port: expected integer 1..65535, got 'abc' (from --set)"),
    ("mqtt.port", "--set 'mqtt.port': expected section.key=value"),
    ("port=1", "--set 'port=1': expected section.key=value"),
    ("mqtt.hots=x", "mqtt.hots: unknown key (did you mean 'host'?)"),
    ("mqtx.host=x", "--set 'mqtx.host=x': unknown section 'mqtx' (did you mean 'mqtt'?)"),
])
def test_bad_set_is_refused(item, message):
    assert refusal(None, [item], env=ENV) == message


def test_password_from_file_and_credentials_directory(tmp_path):
    secret = tmp_path / "pw"
    secret.write_text("from-file\n")
    cfg = load_config(None, ["mqtt.username=u", f"mqtt.password_file={secret}"], env=ENV)
    assert cfg.mqtt.password == "from-file"

    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "mqtt_password").write_text("from-systemd")
    env = {**ENV, "CREDENTIALS_DIRECTORY": str(creds)}
    assert load_config(None, ["mqtt.username=u"], env=env).mqtt.password == "from-systemd"
    # An explicit password or password_file wins over the credential.
    assert load_config(None, ["mqtt.username=u", "mqtt.password=inline"], env=env).mqtt.password == "inline"
    assert load_config(None, ["mqtt.username=u", f"mqtt.password_file={secret}"], env=env).mqtt.password == "from-file"
    # No credential file: no password.
    assert load_config(None, env={**ENV, "CREDENTIALS_DIRECTORY": str(tmp_path / "empty")}).mqtt.password == ""


def test_secret_refusals(tmp_path):
    missing = tmp_path / "missing"
    assert refusal(None, ["mqtt.username=u", f"mqtt.password_file={missing}"], env=ENV).startswith(
        f"mqtt.password_file: cannot read '{missing}'")
    assert "both set" in refusal(None, ["mqtt.username=u", "mqtt.password=a", f"mqtt.password_file={missing}"],
                                 env=ENV)
    assert "set mqtt.username too" in refusal(None, ["mqtt.password=a"], env=ENV)
    assert "mqtt.ca_file: file not found" in refusal(None, ["mqtt.tls=true", f"mqtt.ca_file={missing}"], env=ENV)
    assert "set mqtt.cert_file too" in refusal(None, [f"mqtt.key_file={missing}"], env=ENV)


def test_show_masks_secrets_and_round_trips(tmp_path):
    cfg = load_config(None, ["mqtt.username=u", "mqtt.password=hunter2"], env=ENV)
    shown = C.to_toml(cfg)
    assert "hunter2" not in shown and 'password = "***"' in shown
    assert json.loads(C.to_json(cfg))["mqtt"]["password"] == "***"
    assert cfg.to_dict(mask_secrets=False)["mqtt"]["password"] == "hunter2"
    assert C.to_toml(load_config(None, env=ENV)).count('password = ""') == 1  # empty is not masked
    # The unmasked TOML is a valid config that loads back to the same values.
    path = write(tmp_path, C.to_toml(cfg, mask_secrets=False))
    assert load_config(path, env=ENV) == cfg


def run_cli(argv, capsys):
    from edge_agent.cli import main

    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_check_and_show(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("EDGE_AGENT_MQTT_PORT", raising=False)
    from tests.data import DM05

    good = write(tmp_path, "[mqtt]\nusername = 'u'\npassword = 'hunter2'\nport = 8883\n"
                 f"[source]\nkind = 'synthetic'\n[model]\npath = '{DM05}'\n"
                 f"[agent]\nstate_dir = '{tmp_path}'\n")
    code, out, err = run_cli(["config", "check", "--config", good], capsys)
    assert code == 0 and "config OK" in out and "8883" in out

    code, out, _ = run_cli(["config", "show", "--config", good, "--set", "mqtt.port=1884"], capsys)
    assert code == 0 and "port = 1884" in out and "hunter2" not in out and '"***"' in out

    code, out, _ = run_cli(["config", "show", "--config", good, "--format", "json"], capsys)
    assert code == 0 and json.loads(out)["mqtt"]["password"] == "***"

    bad = tmp_path / "bad.toml"
    bad.write_text("[mqtt]\nport = 'abc'\n")
    code, out, err = run_cli(["config", "check", "--config", str(bad)], capsys)
    assert code == 2 and out == ""
    lines = err.strip().splitlines()  # every problem, one line each: the key, then what run would refuse
    assert lines[0] == "edge-agent: config error: mqtt.port: expected integer 1..65535, got 'abc'"
    assert [line.split(": ")[2].split(" ")[0] for line in lines[1:]] == ["folder", "model.path"]


def test_interpreters_reach_the_pipeline_and_are_refused_with_one_edge_tpu():
    from edge_agent.daemon.pipeline import PipelineSettings

    cfg = load_config(None, ["model.interpreters=2", "model.threads=1"], env=ENV)
    assert PipelineSettings.from_config(cfg).interpreters == 2
    assert PipelineSettings.from_config(load_config(None, env=ENV)).interpreters == 0  # automatic
    assert refusal(None, ["model.interpreters=2", "model.edgetpu=usb"], env=ENV) == (
        'model.interpreters: an Edge TPU runs one interpreter at a time; set model.interpreters = 1 '
        '(or model.edgetpu = "" to run on the CPU)')
    assert refusal(None, ["model.interpreters=17"], env=ENV).startswith("model.interpreters: expected integer 0..16")
