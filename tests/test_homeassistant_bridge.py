"""The Home Assistant bridge: the curated entity set (pure functions), and on a real mosquitto
without Home Assistant what it announces, the state it keeps retained, what it clears, and the
config checks. (The real Home Assistant reading all of it: tests/test_homeassistant_real.py.)"""

from __future__ import annotations

import json
import re
import time
from typing import Any, Dict

import pytest

from edge_agent.comms.homeassistant import (MAX_ENTITIES, METRICS, STATE, Camera, Discovery, HomeAssistantBridge,
                                            agent_health, agent_status, class_slugs, device_key, display_name,
                                            combine_timings, entities, max_entities, metrics_from)
from edge_agent.comms.mqtt import MqttComms
from edge_agent.models.classes import default_classes
from edge_agent.config import load_config
from edge_agent.errors import ConfigError
from edge_agent.inference.labels import read_labels
from tests.broker import Recorder
from tests.data import LABELS as PASCAL_LABELS

DEVICE = "cam-7"
NODE = f"edge-agent-{DEVICE}"
LABELS = ["background", "person", "dining table", "cat"]
PASCAL = read_labels(str(PASCAL_LABELS))


def config(port: int, *extra: str):
    return load_config(None, [f"agent.device_id={DEVICE}", "mqtt.host=127.0.0.1", f"mqtt.port={port}",
                              "mqtt.reconnect_min_s=0.1", "mqtt.reconnect_max_s=0.5",
                              "homeassistant.enabled=true", "homeassistant.state_interval_s=0.1", *extra], env={})


def info(labels, name="model-a", status="running", error=None):
    doc = {"agent_version": "0.1.0", "device_id": DEVICE, "host": {"board": "Raspberry Pi 5 Model B"},
           "status": status, "error": error}
    if labels is not None:
        doc["model"] = {"name": name, "labels": labels}
    return doc


def configs(rec: Recorder):
    """Discovery topic -> last payload seen (b"" = removed)."""
    out = {}
    for m in list(rec.messages):
        if m.topic.startswith("homeassistant/") and m.topic.endswith("/config"):
            out[m.topic] = bytes(m.payload)
    return out


def wait_configs(rec: Recorder, predicate, what: str):
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        current = configs(rec)
        if predicate(current):
            return current
        time.sleep(0.05)
    raise AssertionError(f"{what}: {sorted(configs(rec).items())[:6]}")


def last_state(rec: Recorder, predicate, what: str) -> Dict[str, Any]:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        states = [json.loads(m.payload) for m in rec.matching(f"edge-agent/{DEVICE}/{STATE}")]
        if states and predicate(states[-1]):
            return states[-1]
        time.sleep(0.05)
    raise AssertionError(f"{what}: {[json.loads(m.payload) for m in rec.matching(f'edge-agent/{DEVICE}/{STATE}')][-1:]}")


def topic(component: str, key: str) -> str:
    return f"homeassistant/{component}/{NODE}/{key}/config"


# -- the entity set (no broker) ----------------------------------------------------------------------

def names(es):
    return [(e.component, e.name) for e in es]


def test_default_entity_set_for_pascal_voc():
    """14 entities on a host without a CPU temperature (this one), 15 with: the status, the problem,
    three metrics, the overlay, and person/car/cat/dog with distinct names; no background."""
    es = entities(PASCAL)
    assert names(es) == [
        ("sensor", "Status"), ("binary_sensor", "Problem"), ("sensor", "Frame rate"), ("sensor", "Inference time"),
        ("sensor", "End-to-end time"), ("image", "Overlay"),
        ("binary_sensor", "Person"), ("sensor", "Person coverage"), ("binary_sensor", "Car"), ("sensor", "Car coverage"),
        ("binary_sensor", "Cat"), ("sensor", "Cat coverage"), ("binary_sensor", "Dog"), ("sensor", "Dog coverage")]
    assert len(es) == 14 and not any("cpu" in e.key for e in es)
    with_temp = entities(PASCAL, has_cpu_temp=True)
    assert len(with_temp) == MAX_ENTITIES == 15 and ("sensor", "CPU temperature") in names(with_temp)
    assert not any("background" in e.key or "Background" in e.name for e in es + with_temp)
    assert len({e.name for e in es}) == len(es)  # no two entities share a name
    # the keys earlier versions used for these classes: entity ids and history stay
    assert [e.key for e in es if e.label] == ["class_person"] * 2 + ["class_car"] * 2 + ["class_cat"] * 2 + ["class_dog"] * 2


def test_configured_classes_title_cased_and_models_without_the_preferred_ones():
    es = entities(PASCAL, classes=("diningtable", "potted plant", "tvmonitor", "unicorn"))
    assert [e.name for e in es if e.kind == "presence"] == ["Dining Table", "Potted Plant", "TV Monitor"]
    assert [e.name for e in es if e.kind == "coverage"] == ["Dining Table coverage", "Potted Plant coverage",
                                                             "TV Monitor coverage"]
    # a road model: none of the preferred classes, the first labels that are not background
    assert default_classes(["unlabeled", "road", "sidewalk", "building", "wall", "fence"]) == [
        "road", "sidewalk", "building", "wall"]
    assert default_classes(["background", "person"]) == ["person"]  # a selfie model
    assert default_classes(["person, individual, someone", "car, auto"]) == ["person, individual, someone",
                                                                            "car, auto"]
    assert entities(None) == entities([])[:6] and len(entities(None)) == 6  # no labels: no class entities


@pytest.mark.parametrize("label, name", [
    ("diningtable", "Dining Table"), ("pottedplant", "Potted Plant"), ("tvmonitor", "TV Monitor"),
    ("tv/monitor", "TV Monitor"), ("traffic_light", "Traffic Light"), ("traffic light", "Traffic Light"),
    ("TrafficLight", "Traffic Light"), ("person, individual, someone", "Person"), ("3d object", "3D Object"),
    ("aeroplane", "Aeroplane"), ("motorbike", "Motorbike"), ("person", "Person"), ("UAV", "UAV")])
def test_display_names(label, name):
    assert display_name(label) == name


def test_two_cameras_get_their_own_prefixed_entities_within_the_budget():
    """Per camera its overlay ("Door overlay") and its watched classes (the defaults: the same 4 as
    info.cameras[i].watched), names prefixed; at most 6 + 9 per camera."""
    es = entities(PASCAL, cameras=[Camera("door"), Camera("back_yard", ("cat",))])
    assert names(es) == [
        ("sensor", "Status"), ("binary_sensor", "Problem"), ("sensor", "Frame rate"), ("sensor", "Inference time"),
        ("sensor", "End-to-end time"),
        ("image", "Door overlay"),
        *[(c, f"Door {n}{s}") for n in ("Person", "Car", "Cat", "Dog")
          for c, s in (("binary_sensor", ""), ("sensor", " coverage"))],
        ("image", "Back Yard overlay"), ("binary_sensor", "Back Yard Cat"), ("sensor", "Back Yard Cat coverage")]
    assert [e.key for e in es if e.kind == "image"] == ["door_overlay", "back_yard_overlay"]
    assert [e.key for e in es if e.kind == "presence"] == ["class_door__person", "class_door__car", "class_door__cat",
                                                           "class_door__dog", "class_back_yard__cat"]
    assert len({(e.component, e.key) for e in es}) == len(es) and len({e.name for e in es}) == len(es)
    assert max_entities(1) == MAX_ENTITIES == 15 and max_entities(2) == 24
    for n in (1, 2, 4):
        cams = [Camera(c) for c in "abcd"[:n]] if n > 1 else [Camera()]
        assert len(entities(PASCAL, cameras=cams, has_cpu_temp=True)) == max_entities(n)
    four = entities(PASCAL, cameras=[Camera(c) for c in ("a", "b", "c", "d")])
    assert [e.name for e in four if e.kind == "image"] == ["A overlay", "B overlay", "C overlay", "D overlay"]
    assert entities(PASCAL, cameras=[Camera("door")], overlay=False)[5].name == "Door Person"
    # camera ids that differ only in case are different cameras
    keys = {e.key for e in entities(PASCAL, cameras=[Camera("Door"), Camera("door")]) if e.label or e.kind == "image"}
    assert len(keys) == 2 * 5


def test_two_cameras_from_the_config_their_topics_and_states(tmp_path):
    path = tmp_path / "agent.toml"
    path.write_text('[agent]\ndevice_id = "cam-7"\n[homeassistant]\nenabled = true\nclasses = ["person"]\n'
                    '[[cameras]]\nid = "door"\nkind = "synthetic"\n'
                    '[[cameras]]\nid = "yard"\nkind = "synthetic"\nclasses = ["cat", "dog"]\n')
    cfg = load_config(str(path), env={})
    d = Discovery(cfg, "cam-7", info(PASCAL))
    configs = d.configs()
    assert len(configs) == 5 + 2 * 1 + 2 * 3  # device-level, an overlay per camera, the classes
    assert topic("image", "overlay") not in configs
    assert topic("image", "overlay") in d.legacy_topics()  # the single image an earlier version showed: cleared
    assert topic("image", "overlay") not in discovery("cam-7", PASCAL).legacy_topics()  # [source]: kept
    for cam in ("door", "yard"):
        image = configs[topic("image", f"{cam}_overlay")]
        assert image["image_topic"] == f"edge-agent/cam-7/camera/{cam}/overlay"
        assert (image["name"], image["unique_id"], image["object_id"]) == (
            f"{cam.title()} overlay", f"edge_agent_cam_7_{cam}_overlay", f"cam_7_{cam}_overlay")
    assert configs[topic("binary_sensor", "class_door__person")]["name"] == "Door Person"
    assert configs[topic("sensor", "class_yard__dog")]["name"] == "Yard Dog coverage"
    state = d.state({"door": {"person": 0.2, "cat": 0.5}, "yard": {"cat": 0.3}}, {}, "running", None)
    assert state["classes"] == {"door__person": 20.0, "yard__cat": 30.0, "yard__dog": 0.0}
    assert render(configs[topic("binary_sensor", "class_yard__cat")]["value_template"], state) == "ON"
    assert state["available"] == {"metrics": "online", "cameras": {"door": "online", "yard": "online"}}
    # the availability each entity reads: the metrics', or its own camera's
    def available(key):
        return [a["value_template"] for a in configs[key]["availability"] if a["topic"].endswith("/ha/state")][0]
    assert "get('metrics'" in available(topic("sensor", "fps"))
    assert "get('yard'" in available(topic("image", "yard_overlay"))
    assert "get('yard'" in available(topic("sensor", "class_yard__cat"))
    assert "get('door'" in available(topic("binary_sensor", "class_door__person"))
    # the yard's source down: Status error naming it, the door's entities and the metrics stay
    down = {"cameras": {"door": {"source": {"state": "open"}}, "yard": {"source": {"state": "down", "last_error": "gone"}}}}
    health = agent_health(info(PASCAL), down, cameras=["door", "yard"])
    assert health == ("error", "camera yard: source down: gone", True, {"door": True, "yard": False})
    state = d.state({}, {}, *health[:2], available=health[2:])
    assert state["available"] == {"metrics": "online", "cameras": {"door": "online", "yard": "offline"}}
    assert state["problem"] == "ON"
    # every camera down, or the model failing: nothing but Status and Problem is available
    both = {"cameras": {c: {"source": {"state": "down"}} for c in ("door", "yard")}}
    assert agent_health(info(PASCAL), both, cameras=["door", "yard"])[2:] == (False, {"door": False, "yard": False})
    failing = {**down, "inference_errors": 3, "frames": {"inferred": 0}}
    assert agent_health(info(PASCAL), failing, cameras=["door", "yard"])[2:] == (False, {"door": False, "yard": False})
    assert agent_health(info(PASCAL, status="stopped"), cameras=["door"]) == ("stopped", None, False, {"door": False})


def test_device_metrics_from_every_cameras_timings():
    """Frame rate = the cameras' sum, inference/end-to-end = their fps-weighted mean (not whichever
    camera's timings came last); one camera: its own numbers."""
    door = {"camera": "door", "fps": 3.0, "stages": {"inference": {"mean": 30.0}, "end_to_end": {"mean": 50.0}}}
    yard = {"camera": "yard", "fps": 1.0, "stages": {"inference": {"mean": 70.0}, "end_to_end": {"mean": 90.0}}}
    metrics = metrics_from(combine_timings([door, yard]), None, None)
    assert (metrics["fps"], metrics["inference_ms"], metrics["end_to_end_ms"]) == (4.0, 40.0, 60.0)
    assert combine_timings([door]) is door and combine_timings([None]) is None
    frame_mode = combine_timings([{"ms": {"inference": 10.0}}, {"ms": {"inference": 20.0}}])
    assert metrics_from(frame_mode, {"fps": 5.0}, None)["fps"] == 5.0  # per-frame timings: the stats' fps
    assert metrics_from(frame_mode, None, None)["inference_ms"] == 15.0


def test_status_from_info_and_stats():
    running = info(PASCAL)
    assert agent_status(running) == ("running", None)
    assert agent_status(info(None, status="error", error="model.path: cannot prepare this model")) == (
        "error", "model.path: cannot prepare this model")
    assert agent_status(info(PASCAL, status="stopped")) == ("stopped", None)
    down = {"source": {"state": "down", "last_error": "rtsp://cam/1: connection refused"}, "frames": {"inferred": 5}}
    assert agent_status(running, down) == ("error", "source down: rtsp://cam/1: connection refused")
    assert agent_status(running, {"cameras": {"door": {"source": {"state": "down", "last_error": "gone"}}}}) == (
        "error", "camera door: source down: gone")
    assert agent_status(running, {**down, "cameras": {"": down}}) == agent_status(running, down)  # said once
    failing = {"inference_errors": 7, "last_error": "invoke failed: custom op", "frames": {"inferred": 0}}
    assert agent_status(running, failing) == ("error", "inference fails: invoke failed: custom op")
    # errors that stopped while frames are inferred again: running
    recovered = {"inference_errors": 7, "last_error": "invoke failed: custom op", "frames": {"inferred": 40}}
    assert agent_status(running, recovered, failing) == ("running", None)
    assert agent_status(running, {"last_error": "inference-0 crashed"})[0] == "error"
    # a result since those stats: that camera's source is back, its model works
    assert agent_status(running, down, live={""}) == ("running", None)
    assert agent_status(running, failing, live={""}) == ("running", None)
    two = {"cameras": {"door": down, "yard": down}}
    assert agent_status(running, two, live={"door"}) == ("error", "camera yard: source down: rtsp://cam/1: "
                                                                  "connection refused")
    assert agent_status(running, {"source": {"state": "open"}, "frames": {"inferred": 3}}) == ("running", None)


def discovery(device_id: str, labels, *extra: str, status="running") -> Discovery:
    cfg = load_config(None, [f"agent.device_id={device_id}", "homeassistant.enabled=true", *extra], env={})
    return Discovery(cfg, device_id, info(labels, status=status))


def test_configuration_url_and_its_check():
    d = discovery("cam-7", PASCAL, "homeassistant.console_url=http://console.lan:8080/")
    assert all(doc["device"]["configuration_url"] == "http://console.lan:8080/" for doc in d.configs().values())
    assert all("configuration_url" not in doc["device"] for doc in discovery("cam-7", PASCAL).configs().values())
    for bad in ("console.lan:8080", "ftp://x", "http://", "http:// x"):
        with pytest.raises(ConfigError, match="homeassistant.console_url: expected '' or an http"):
            load_config(None, [f"homeassistant.console_url={bad}"], env={})


def test_legacy_topics_cover_what_earlier_versions_announced():
    """An earlier version announced 51 entities for PASCAL (every label twice, background
    included, dropped frames, model, benchmark): all that are not announced now are cleared."""
    d = discovery("cam-7", PASCAL)
    legacy = set(d.legacy_topics())
    assert f"homeassistant/sensor/{NODE}/class_background/config" in legacy
    assert f"homeassistant/binary_sensor/{NODE}/class_diningtable/config" in legacy
    assert {f"homeassistant/sensor/{NODE}/{k}/config" for k in ("dropped_frames", "model", "benchmark_p50",
                                                                "cpu_temperature")} <= legacy
    assert f"homeassistant/button/{NODE}/run_benchmark/config" in legacy
    assert not legacy & set(d.configs())
    earlier = {topic(c, f"class_{k}") for _, k in class_slugs(PASCAL) for c in ("sensor", "binary_sensor")}
    earlier |= {topic("sensor", k) for k in ("fps", "inference_time", "end_to_end_time", "cpu_temperature",
                                             "dropped_frames", "model", "benchmark_p50")}
    earlier |= {topic("image", "overlay"), topic("button", "run_benchmark")}
    assert len(earlier) == 51 and legacy == earlier - set(d.configs()) and len(legacy) == 51 - 12


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
    labels = ["background", "fps", "person", "class", "class fps", "3d object", "status"]
    owner: Dict[Any, str] = {}  # Home Assistant wants unique ids unique per platform (mqtt) and domain
    for dev in ids:
        configs = discovery(dev, labels, "homeassistant.classes=" + ",".join(labels)).configs()
        uids = [(t.split("/")[1], doc["unique_id"]) for t, doc in configs.items()]
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
    """A class named like a metric (fps, status) has its own object id and topic."""
    d = discovery("cam-7", ["background", "fps", "status", "overlay"], "homeassistant.classes=fps,status,overlay")
    configs = d.configs()
    object_ids = [(t.split("/")[1], doc["object_id"]) for t, doc in configs.items()]
    assert len(set(object_ids)) == len(object_ids), sorted(object_ids)
    assert configs[topic("sensor", "fps")]["object_id"] == "cam_7_fps"
    assert configs[topic("sensor", "class_fps")]["object_id"] == "cam_7_class_fps"
    assert configs[topic("sensor", "class_fps")]["name"] == "Fps coverage"


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


def test_value_templates_find_their_values_for_any_class_name():
    """``value_json.classes.3d_object`` is a Jinja syntax error; brackets work for any slug."""
    d = discovery("cam-7", ["background", "3d object", "person"], "homeassistant.classes=3d object,person")
    configs = d.configs()
    state = d.state({"": {"3d object": 0.25, "person": 0.5}},
                    {"fps": 4.5, "inference_ms": 31.2, "end_to_end_ms": 40.0, "cpu_temp_c": None}, "running", None)
    state = json.loads(json.dumps(state))  # as Home Assistant gets it
    sensor, present = configs[topic("sensor", "class_3d_object")], configs[topic("binary_sensor", "class_3d_object")]
    assert sensor["value_template"] == "{{ value_json['classes']['3d_object'] }}"
    assert (sensor["name"], present["name"]) == ("3D Object coverage", "3D Object")
    assert str(render(sensor["value_template"], state)) == "25.0"
    assert render(present["value_template"], state) == "ON"
    assert render(configs[topic("sensor", "status")]["value_template"], state) == "running"
    assert render(configs[topic("binary_sensor", "problem")]["value_template"], state) == "OFF"
    for doc in configs.values():  # every state template finds its value
        if "value_template" in doc:
            assert render(doc["value_template"], state) is not None, doc["name"]
    from edge_agent.comms.homeassistant import value_template
    assert value_template("it's", "a\\b") == "{{ value_json['it\\'s']['a\\\\b'] }}"
    assert render(value_template("it's", "a\\b"), {"it's": {"a\\b": 7}}) == 7


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


# -- the bridge on a real mosquitto ------------------------------------------------------------------

@pytest.mark.broker
def test_announces_clears_the_old_set_and_follows_the_agents_state(mosquitto):
    broker = mosquitto()
    rec = Recorder("127.0.0.1", broker.port, "#")
    # What an earlier version left retained: 2 entities per label, background included, a button.
    old = [topic(c, f"class_{k}") for k in ("background", "person", "dining_table", "cat", "dog")
           for c in ("sensor", "binary_sensor")] + [topic("button", "run_benchmark"), topic("sensor", "dropped_frames")]
    for t in old:
        rec.publish(t, b'{"name": "old"}', retain=True)
    cfg = config(broker.port, "homeassistant.console_url=https://console.example:8443")
    bridge = HomeAssistantBridge(MqttComms(cfg.mqtt, DEVICE), cfg, cpu_temp=lambda: None)
    bridge.start()
    try:
        assert bridge.wait_connected(10)
        bridge.set_info(info(LABELS))
        wanted = {topic(c, k) for c, k in [("sensor", "status"), ("binary_sensor", "problem"), ("sensor", "fps"),
                                           ("sensor", "inference_time"), ("sensor", "end_to_end_time"),
                                           ("image", "overlay")]}
        wanted |= {topic(c, f"class_{k}") for k in ("person", "cat") for c in ("sensor", "binary_sensor")}
        late = Recorder("127.0.0.1", broker.port, f"homeassistant/+/{NODE}/+/config")
        got = wait_configs(late, lambda c: {t for t, v in c.items() if v} == wanted, "the retained set")
        late.close()
        assert len(wanted) == 10  # person, cat: the preferred classes this model has; no CPU temperature here
        for t in set(old) - wanted:
            assert configs(rec)[t] == b"", t
        person = json.loads(got[topic("binary_sensor", "class_person")])
        assert person["name"] == "Person" and person["device_class"] == "occupancy"
        assert json.loads(got[topic("sensor", "class_person")])["name"] == "Person coverage"
        status = json.loads(got[topic("sensor", "status")])
        assert status["device_class"] == "enum" and status["options"] == ["running", "error", "stopped"]
        assert status["device"]["configuration_url"] == "https://console.example:8443"
        assert status["unique_id"] == "edge_agent_cam_7_status"

        # Results and timings -> the retained state topic (classes in %, presence by min_fraction 0.01).
        bridge.publish("result", json.dumps({"seq": 1, "classes": {"background": 0.995, "cat": 0.005}}).encode())
        bridge.publish("timings", json.dumps({"fps": 4.5, "dropped": {"capture": 2, "publish": 1},
                                              "stages": {"inference": {"mean": 31.26}, "end_to_end": {"mean": 40.0}}}))

        def fresh(s):
            if s.get("fps") != 4.5:
                bridge.publish("result", json.dumps({"seq": 2, "classes": {"background": 0.995, "cat": 0.005}}))
            return s.get("fps") == 4.5
        state = last_state(rec, fresh, "fps 4.5")
        assert state["classes"] == {"person": 0.0, "cat": 0.5} and state["present"] == {"person": "OFF", "cat": "OFF"}
        assert (state["status"], state["problem"], state["reason"]) == ("running", "OFF", None)
        assert (state["inference_ms"], state["details"]["model"], state["details"]["dropped_frames"]) == (31.26, "model-a", 3)

        # The model fails on every frame (stats): error with the reason.
        bridge.publish("stats", json.dumps({"inference_errors": 4, "last_error": "invoke failed: op 7",
                                            "frames": {"inferred": 0}, "fps": 0.0}))
        state = last_state(rec, lambda s: s["status"] == "error", "error from stats")
        assert (state["reason"], state["problem"]) == ("inference fails: invoke failed: op 7", "ON")
        assert state["details"]["reason"] == state["reason"]

        # No model at all (info says error): the class entities stay (unavailable), the status says why.
        bridge.set_info(info(None, status="error", error="model.path: cannot prepare this model"))
        state = last_state(rec, lambda s: s["reason"] == "model.path: cannot prepare this model", "error from info")
        assert state["status"] == "error" and state["problem"] == "ON"
        before, states = bridge.announcements, len(rec.matching(f"edge-agent/{DEVICE}/{STATE}"))
        rec.publish("homeassistant/status", b"online")  # Home Assistant restarting: everything again
        # the state follows the announcement's configs and clears (one client: the broker keeps the order)
        wait_configs(rec, lambda c: bridge.announcements > before
                     and len(rec.matching(f"edge-agent/{DEVICE}/{STATE}")) > states, "re-announce")
        assert configs(rec)[topic("sensor", "class_cat")] != b""

        # A model without "cat": its entities are removed.
        bridge.set_info(info(["background", "person", "dining table"], "model-b"))
        wait_configs(rec, lambda c: c.get(topic("sensor", "class_cat")) == b""
                     and c.get(topic("binary_sensor", "class_cat")) == b"", "cat removed")
        assert configs(rec)[topic("sensor", "class_person")]
        state = last_state(rec, lambda s: s["status"] == "running", "running again")
        bridge.set_info(info(["background", "person", "dining table"], "model-b", status="stopped"))
        last_state(rec, lambda s: s["status"] == "stopped" and s["problem"] == "OFF", "stopped")
    finally:
        bridge.stop()
        rec.close()


@pytest.mark.broker
def test_a_cpu_temperature_entity_only_where_the_host_has_one(mosquitto):
    broker = mosquitto()
    rec = Recorder("127.0.0.1", broker.port, "#")
    cfg = config(broker.port)
    bridge = HomeAssistantBridge(MqttComms(cfg.mqtt, DEVICE), cfg, cpu_temp=lambda: 48.5)
    bridge.start()
    try:
        assert bridge.wait_connected(10)
        bridge.set_info(info(read_labels(str(PASCAL_LABELS))))
        late = Recorder("127.0.0.1", broker.port, f"homeassistant/+/{NODE}/+/config")
        got = wait_configs(late, lambda c: len([v for v in c.values() if v]) == 15, "15 entities")
        late.close()
        assert json.loads(got[topic("sensor", "cpu_temperature")])["name"] == "CPU temperature"
        assert last_state(rec, lambda s: True, "state")["cpu_temp_c"] == 48.5
    finally:
        bridge.stop()
        rec.close()


@pytest.mark.broker
def test_only_configured_classes_and_unknown_names_said_once(mosquitto, caplog):
    broker = mosquitto()
    cfg = config(broker.port, "homeassistant.classes=cat, unicorn")
    assert cfg.homeassistant.classes == ("cat", "unicorn")
    rec = Recorder("127.0.0.1", broker.port, "homeassistant/#")
    bridge = HomeAssistantBridge(MqttComms(cfg.mqtt, DEVICE), cfg, cpu_temp=lambda: None)
    bridge.start()
    try:
        assert bridge.wait_connected(10)
        bridge.set_info(info(LABELS))
        got = wait_configs(rec, lambda c: len([v for v in c.values() if v]) == 6 + 2, "announce")
        assert {t.split("/")[-2] for t, v in got.items() if "class_" in t and v} == {"class_cat"}
        assert "'unicorn' is not a class of model model-a" in caplog.text
    finally:
        bridge.stop()
        rec.close()


@pytest.mark.broker
def test_a_model_with_many_classes_is_announced_whole_through_a_small_inflight_window(mosquitto):
    """150 watched classes = 306 retained configs (and 300 legacy clears) through a window of 5
    unacknowledged messages: the announcer waits for room instead of losing configs."""
    broker = mosquitto()
    labels = [f"thing {i}" for i in range(150)]
    cfg = config(broker.port, "mqtt.max_queued_messages=5", "homeassistant.classes=" + ",".join(labels))
    bridge = HomeAssistantBridge(MqttComms(cfg.mqtt, DEVICE), cfg, cpu_temp=lambda: None)
    bridge.start()
    try:
        assert bridge.wait_connected(10)
        bridge.set_info(info(labels))
        late = Recorder("127.0.0.1", broker.port, f"homeassistant/+/{NODE}/+/config")
        got = wait_configs(late, lambda c: len([v for v in c.values() if v]) == 6 + 2 * 150, "306 retained configs")
        assert f"homeassistant/binary_sensor/{NODE}/class_thing_149/config" in got
        late.close()
    finally:
        bridge.stop()


@pytest.mark.broker
def test_service_uninstall_removes_the_entities(mosquitto, tmp_path, monkeypatch, capsys):
    """The uninstall step, as on a device (the layout's staging check is what --root would skip):
    the installed config enables Home Assistant, so its retained configs are cleared."""
    from edge_agent.provision import service

    broker = mosquitto()
    rec = Recorder("127.0.0.1", broker.port, "homeassistant/#")
    topics = [f"homeassistant/sensor/{NODE}/fps/config", f"homeassistant/sensor/{NODE}/class_cat/config"]
    for t in topics + ["homeassistant/sensor/edge-agent-other/fps/config"]:
        rec.publish(t, b'{"name": "x"}', retain=True)
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
