"""The Home Assistant bridge on a real mosquitto, without Home Assistant: what it announces, the
state it keeps retained, stale entities it clears, and the config checks. (The real Home
Assistant reading all of it: tests/test_homeassistant_real.py.)"""

from __future__ import annotations

import json
import re
from typing import Any, Dict

import pytest

from edge_agent.comms.homeassistant import (BENCHMARK, METRICS, STATE, Discovery, HomeAssistantBridge,
                                            class_slugs, device_key)
from edge_agent.comms.mqtt import MqttComms
from edge_agent.config import load_config
from edge_agent.errors import ConfigError
from tests.broker import Recorder

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


@pytest.mark.broker
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
        assert table["object_id"] == "cam_7_class_dining_table" and table["name"] == "dining table"
        assert table["unique_id"] == "edge_agent_cam_7_class_dining_table"  # as before: a plain id keeps its ids
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


@pytest.mark.broker
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


@pytest.mark.broker
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


@pytest.mark.broker
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


# -- the discovery configs themselves (no broker) ----------------------------------------------------

def discovery(device_id: str, labels, *extra: str) -> Discovery:
    cfg = load_config(None, [f"agent.device_id={device_id}", "homeassistant.enabled=true", *extra], env={})
    return Discovery(cfg, device_id, info(labels))


def test_unique_ids_are_distinct_for_distinct_device_ids():
    """pi-1 and pi_1 (and Pi-1, cam + class fps vs cam-class + fps) used to share unique ids: Home
    Assistant then drops the second device's entities. Plain hostname-style ids keep theirs."""
    assert device_key("pi-1") == "pi_1" and device_key("cam-7") == "cam_7"
    assert device_key("raspberrypi") == "raspberrypi"
    for other in ("pi_1", "Pi-1", "pi--1", "-pi-1", "cam-class", "cam-class-x"):
        key = device_key(other)
        assert re.fullmatch(r"[a-z0-9_]+-[0-9a-f]{10}", key), key
    ids = ["pi-1", "pi_1", "Pi-1", "PI_1", "pi--1", "pi-1-", "pi__1", "cam", "cam-class", "cam_class", "a-class-b",
           "classy-cam", "cam-classy"]
    labels = ["background", "fps", "person", "class", "class fps", "3d object"]
    owner: Dict[Any, str] = {}  # Home Assistant wants unique ids unique per platform (mqtt) and domain
    for dev in ids:
        configs = discovery(dev, labels).configs()
        uids = [(topic.split("/")[1], doc["unique_id"]) for topic, doc in configs.items()]
        assert len(set(uids)) == len(uids), dev
        for uid in uids:
            assert owner.setdefault(uid, dev) == dev, f"{uid}: {owner[uid]} and {dev}"
    # the proof's premise (homeassistant.device_key): no metric key ends in "_<another key>"
    for key in METRICS:
        words = key.split("_")
        for i in range(1, len(words)):
            tail = "_".join(words[i:])
            assert tail not in METRICS and not tail.startswith("class"), key


def test_class_entities_have_their_own_namespace():
    """A class named like a metric (fps, model, overlay) has its own object id and topic."""
    d = discovery("cam-7", ["background", "fps", "model", "overlay", "run benchmark"])
    configs = d.configs()
    object_ids = [(topic.split("/")[1], doc["object_id"]) for topic, doc in configs.items()]
    assert len(set(object_ids)) == len(object_ids), sorted(object_ids)
    fps = configs["homeassistant/sensor/edge-agent-cam-7/fps/config"]
    fps_class = configs["homeassistant/sensor/edge-agent-cam-7/class_fps/config"]
    assert fps["object_id"] == "cam_7_fps" and fps_class["object_id"] == "cam_7_class_fps"
    model_class = configs["homeassistant/binary_sensor/edge-agent-cam-7/class_model/config"]
    assert model_class["object_id"] == "cam_7_class_model"


# A Jinja expression that is only subscripts with single-quoted string literals: jinja2 is not in
# the venv, so the templates are held to this strict shape and then evaluated by hand.
TEMPLATE = re.compile(r"\{\{ value_json((?:\['(?:[^'\\]|\\.)*'\])+) \}\}")
SUBSCRIPT = re.compile(r"\['((?:[^'\\]|\\.)*)'\]")


def render(template: str, value_json: Dict[str, Any]) -> Any:
    try:
        import jinja2
    except ImportError:
        match = TEMPLATE.fullmatch(template)
        assert match, f"not a plain subscript template: {template}"
        value: Any = value_json
        for key in SUBSCRIPT.findall(match.group(1)):
            value = value[re.sub(r"\\(.)", r"\1", key)]
        return value
    return jinja2.Environment(undefined=jinja2.StrictUndefined).from_string(template).render(value_json=value_json)


def test_value_templates_work_for_any_class_name():
    """``value_json.classes.3d_object`` is a Jinja syntax error; brackets work for any slug."""
    d = discovery("cam-7", ["background", "3d object", "person"])
    configs = d.configs()
    state = d.state({"3d object": 0.25, "person": 0.5}, {"fps": 4.5, "inference_ms": 31.2, "end_to_end_ms": 40.0,
                                                           "cpu_temp_c": 50.0, "dropped": 3})
    state = json.loads(json.dumps(state))  # as Home Assistant gets it
    sensor = configs["homeassistant/sensor/edge-agent-cam-7/class_3d_object/config"]
    present = configs["homeassistant/binary_sensor/edge-agent-cam-7/class_3d_object/config"]
    assert sensor["value_template"] == "{{ value_json['classes']['3d_object'] }}"
    assert str(render(sensor["value_template"], state)) == "25.0"
    assert render(present["value_template"], state) == "ON"
    assert str(render(configs["homeassistant/sensor/edge-agent-cam-7/fps/config"]["value_template"], state)) == "4.5"
    bench = {"p50_ms": 12.5, "p90_ms": 14.0, "runs": 5}
    for topic, doc in configs.items():
        if "value_template" in doc:  # every template parses and finds its value
            render(doc["value_template"], bench if doc["state_topic"].endswith(BENCHMARK) else state)
    from edge_agent.comms.homeassistant import value_template
    assert value_template("it's", "a\\b") == "{{ value_json['it\\'s']['a\\\\b'] }}"
    assert render(value_template("it's", "a\\b"), {"it's": {"a\\b": 7}}) == 7
