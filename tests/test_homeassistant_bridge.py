"""The Home Assistant bridge on a real mosquitto, without Home Assistant: what it announces, the
state it keeps retained, stale entities it clears, and the config checks. (The real Home
Assistant reading all of it: tests/test_homeassistant_real.py.)"""

from __future__ import annotations

import json

import pytest

from edge_agent.comms.homeassistant import BENCHMARK, STATE, HomeAssistantBridge, class_slugs
from edge_agent.comms.mqtt import MqttComms
from edge_agent.config import load_config
from edge_agent.errors import ConfigError
from tests.broker import Recorder

pytestmark = pytest.mark.broker

DEVICE = "cam-7"
NODE = f"edge-agent-{DEVICE}"
LABELS = ["background", "person", "dining table", "cat"]


def config(port: int, *extra: str):
    return load_config(None, [f"agent.device_id={DEVICE}", "mqtt.host=127.0.0.1", f"mqtt.port={port}",
                              "mqtt.reconnect_min_s=0.1", "mqtt.reconnect_max_s=0.5",
                              "homeassistant.enabled=true", "homeassistant.state_interval_s=0.1", *extra], env={})


def info(labels, name="model-a"):
    return {"agent_version": "0.1.0", "device_id": DEVICE, "host": {"board": "Raspberry Pi 5 Model B"},
            "model": {"name": name, "labels": labels}}


def configs(rec: Recorder):
    """Discovery topic -> last payload seen (b"" = removed)."""
    out = {}
    for m in rec.messages:
        if m.topic.startswith("homeassistant/") and m.topic.endswith("/config"):
            out[m.topic] = bytes(m.payload)
    return out


def wait_configs(rec: Recorder, predicate, what: str):
    import time
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        current = configs(rec)
        if predicate(current):
            return current
        time.sleep(0.05)
    raise AssertionError(f"{what}: {sorted(configs(rec).items())[:6]}")


def test_announces_the_device_classes_and_states_then_follows_a_model_change(mosquitto):
    broker = mosquitto()
    rec = Recorder("127.0.0.1", broker.port, "#")
    # A retained config of a class an earlier model announced: cleared once the agent knows its model.
    rec.publish(f"homeassistant/sensor/{NODE}/class_dog/config", b'{"name": "dog"}', retain=True)
    bridge = HomeAssistantBridge(MqttComms(config(broker.port).mqtt, DEVICE), config(broker.port))
    bridge.start()
    try:
        assert bridge.wait_connected(10)
        bridge.set_info(info(LABELS))
        got = wait_configs(rec, lambda c: f"homeassistant/binary_sensor/{NODE}/class_cat/config" in c
                           and c.get(f"homeassistant/sensor/{NODE}/class_dog/config") == b"", "announce")
        table = json.loads(got[f"homeassistant/sensor/{NODE}/class_dining_table/config"])
        assert table["object_id"] == "cam_7_dining_table" and table["name"] == "dining table"
        assert table["device"] == {"identifiers": [NODE], "name": DEVICE, "manufacturer": "edge-agent",
                                   "model": "Raspberry Pi 5 Model B", "sw_version": "0.1.0"}
        assert table["availability_topic"] == f"edge-agent/{DEVICE}/availability"
        button = json.loads(got[f"homeassistant/button/{NODE}/run_benchmark/config"])
        assert button["command_topic"] == f"edge-agent/{DEVICE}/cmd/benchmark" and button["retain"] is False
        image = json.loads(got[f"homeassistant/image/{NODE}/overlay/config"])
        assert image["image_topic"] == f"edge-agent/{DEVICE}/overlay" and image["content_type"] == "image/jpeg"
        # Every entity of the device is retained on the broker (a late Home Assistant sees them).
        late = Recorder("127.0.0.1", broker.port, f"homeassistant/+/{NODE}/+/config")
        wait_configs(late, lambda c: len([v for v in c.values() if v]) == 9 + 2 * len(LABELS), "retained")
        late.close()

        # Results -> the retained state topic (classes in %, presence by min_fraction 0.01).
        bridge.publish("result", json.dumps({"seq": 1, "classes": {"background": 0.995, "cat": 0.005}}).encode())
        bridge.publish("timings", json.dumps({"fps": 4.5, "dropped": {"capture": 2, "publish": 1},
                                              "stages": {"inference": {"mean": 31.26}, "end_to_end": {"mean": 40.0}}}))
        state = json.loads(rec.wait_for(f"edge-agent/{DEVICE}/{STATE}", timeout=10)[-1].payload)
        import time
        deadline = time.monotonic() + 10
        while state.get("fps") != 4.5 and time.monotonic() < deadline:
            time.sleep(0.15)
            bridge.publish("result", json.dumps({"seq": 2, "classes": {"background": 0.995, "cat": 0.005}}).encode())
            state = json.loads(rec.matching(f"edge-agent/{DEVICE}/{STATE}")[-1].payload)
        assert state["classes"] == {"background": 99.5, "person": 0.0, "dining_table": 0.0, "cat": 0.5}
        assert state["present"] == {"background": "ON", "person": "OFF", "dining_table": "OFF", "cat": "OFF"}
        assert (state["fps"], state["dropped"], state["inference_ms"], state["model"]) == (4.5, 3, 31.26, "model-a")

        # A finished benchmark -> its p50 on the retained benchmark topic.
        bridge.publish("benchmark/ha-1", json.dumps({"status": "done", "request_id": "ha-1", "final": True,
                                                     "result": {"invoke": {"p50": 12.5, "p90": 14.0, "count": 5},
                                                                "model": {"name": "model-a"}}}))
        bench = json.loads(rec.wait_for(f"edge-agent/{DEVICE}/{BENCHMARK}", timeout=10)[-1].payload)
        assert (bench["p50_ms"], bench["runs"], bench["model"]) == (12.5, 5, "model-a")

        # A model without "cat": its two entities are removed, the others stay.
        bridge.set_info(info(["background", "person", "dining table"], "model-b"))
        wait_configs(rec, lambda c: c.get(f"homeassistant/sensor/{NODE}/class_cat/config") == b""
                     and c.get(f"homeassistant/binary_sensor/{NODE}/class_cat/config") == b"", "cat removed")
        assert configs(rec)[f"homeassistant/sensor/{NODE}/class_person/config"]

        # Home Assistant restarting (birth message) -> everything announced again.
        before = bridge.announcements
        rec.publish("homeassistant/status", b"online")
        wait_configs(rec, lambda c: bridge.announcements > before, "re-announce")
    finally:
        bridge.stop()
        rec.close()


def test_only_configured_classes_and_unknown_names_said_once(mosquitto, caplog):
    broker = mosquitto()
    cfg = config(broker.port, "homeassistant.classes=cat, unicorn")
    assert cfg.homeassistant.classes == ("cat", "unicorn")
    rec = Recorder("127.0.0.1", broker.port, "homeassistant/#")
    bridge = HomeAssistantBridge(MqttComms(cfg.mqtt, DEVICE), cfg)
    bridge.start()
    try:
        assert bridge.wait_connected(10)
        bridge.set_info(info(LABELS))
        got = wait_configs(rec, lambda c: len(c) == 9 + 2, "announce")
        assert {t.split("/")[-2] for t in got if "class_" in t} == {"class_cat"}
        assert "'unicorn' is not a class of model model-a" in caplog.text
    finally:
        bridge.stop()
        rec.close()


def test_a_model_with_many_classes_is_announced_whole_through_a_small_inflight_window(mosquitto):
    """150 classes = 309 retained configs through a window of 5 unacknowledged messages: the
    announcer waits for room instead of losing configs (which Home Assistant would never see)."""
    broker = mosquitto()
    cfg = config(broker.port, "mqtt.max_queued_messages=5")
    labels = [f"thing {i}" for i in range(150)]
    bridge = HomeAssistantBridge(MqttComms(cfg.mqtt, DEVICE), cfg)
    bridge.start()
    try:
        assert bridge.wait_connected(10)
        bridge.set_info(info(labels))
        late = Recorder("127.0.0.1", broker.port, f"homeassistant/+/{NODE}/+/config")
        got = wait_configs(late, lambda c: len([v for v in c.values() if v]) == 9 + 2 * 150, "309 retained configs")
        assert f"homeassistant/binary_sensor/{NODE}/class_thing_149/config" in got
        late.close()
    finally:
        bridge.stop()


def test_slugs_are_unique_and_stable():
    assert class_slugs(["Dining Table", "dining-table", "tv/monitor", "???"]) == [
        ("Dining Table", "dining_table"), ("dining-table", "dining_table_2"), ("tv/monitor", "tv_monitor"),
        ("???", "class")]


def test_config_refuses_what_home_assistant_cannot_work_with():
    with pytest.raises(ConfigError, match="homeassistant.enabled: needs mqtt.enabled = true"):
        load_config(None, ["homeassistant.enabled=true", "mqtt.enabled=false"], env={})
    with pytest.raises(ConfigError, match="homeassistant.enabled: needs publish.result = true"):
        load_config(None, ["homeassistant.enabled=true", "publish.result=false"], env={})
    with pytest.raises(ConfigError, match="homeassistant.discovery_prefix"):
        load_config(None, ["homeassistant.discovery_prefix=ha/#"], env={})
    with pytest.raises(ConfigError, match="homeassistant.min_fraction"):
        load_config(None, ["homeassistant.min_fraction=2"], env={})


def test_service_uninstall_removes_the_entities(mosquitto, tmp_path, monkeypatch, capsys):
    """The uninstall step, as on a device (the layout's staging check is what --root would skip):
    the installed config enables Home Assistant, so its retained configs are cleared."""
    from edge_agent.provision import service

    broker = mosquitto()
    rec = Recorder("127.0.0.1", broker.port, "homeassistant/#")
    topics = [f"homeassistant/sensor/{NODE}/fps/config", f"homeassistant/sensor/{NODE}/class_cat/config"]
    for topic in topics + ["homeassistant/sensor/edge-agent-other/fps/config"]:
        rec.publish(topic, b'{"name": "x"}', retain=True)
    lay = service.Layout(tmp_path, "/opt/edge-agent")
    lay.config.parent.mkdir(parents=True)
    lay.config.write_text(f'[agent]\ndevice_id = "{DEVICE}"\n[mqtt]\nhost = "127.0.0.1"\nport = {broker.port}\n'
                          '[homeassistant]\nenabled = true\n')
    monkeypatch.setattr(service.Layout, "staging", property(lambda self: False))
    steps = service.homeassistant_removal(lay)
    assert [s.what for s in steps] == ["remove the Home Assistant entities"]
    steps[0].run()
    assert "removed 2 Home Assistant entities" in capsys.readouterr().out
    late = Recorder("127.0.0.1", broker.port, "homeassistant/#")
    rec.publish("homeassistant/sentinel", b"after the retained ones")  # the broker keeps the order
    late.wait_for("homeassistant/sentinel", timeout=10)
    assert set(configs(late)) == {"homeassistant/sensor/edge-agent-other/fps/config"}  # another device's stay
    late.close()
    rec.close()
    # Home Assistant not enabled, or a staging tree (--root): no step.
    lay.config.write_text(f'[agent]\ndevice_id = "{DEVICE}"\n')
    assert service.homeassistant_removal(lay) == []
