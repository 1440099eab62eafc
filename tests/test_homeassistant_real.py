"""The agent against a REAL Home Assistant: the curated entity set, its names, a status that says
why an agent is unwell, no "unknown" entity for a healthy one, the overlay image, removal.

Home Assistant core 2025.4.4 runs from its own venv (installed once by tools/homeassistant-venv.sh,
cached), with its MQTT integration pointed at a real mosquitto; real agent processes run on real
images with a real model. Everything is checked through Home Assistant's own REST API.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from edge_agent.output.encode import read_frame_label
from edge_agent.system import cpu_temp_c
from tests.broker import MosquittoServer, Recorder, mosquitto_available
from tests.data import DM05, IMAGES, INVOKE_ERROR, LABELS, MODELS, VOC
from tests.homeassistant import NO_PYTHON_EXIT, HomeAssistantServer, ha_venv, install_home_assistant
from tests.helpers import write_config

pytestmark = [pytest.mark.slow, pytest.mark.homeassistant, pytest.mark.broker]

DEVICE = "pi-ha"
OBJ = "pi_ha"  # the device id as HA object ids spell it
BASE = f"edge-agent/{DEVICE}"
NODE = f"edge-agent-{DEVICE}"
CONSOLE = "http://console.example:8080/"
HAS_CPU_TEMP = cpu_temp_c() is not None
# entity id -> the name Home Assistant shows (after the device's name): the default set for PASCAL VOC
NAMES = {
    f"sensor.{OBJ}_status": "Status", f"binary_sensor.{OBJ}_problem": "Problem",
    f"sensor.{OBJ}_fps": "Frame rate", f"sensor.{OBJ}_inference_time": "Inference time",
    f"sensor.{OBJ}_end_to_end_time": "End-to-end time", f"image.{OBJ}_overlay": "Overlay",
    **({f"sensor.{OBJ}_cpu_temperature": "CPU temperature"} if HAS_CPU_TEMP else {}),
    **{f"binary_sensor.{OBJ}_class_{c}": c.title() for c in ("person", "car", "cat", "dog")},
    **{f"sensor.{OBJ}_class_{c}": f"{c.title()} coverage" for c in ("person", "car", "cat", "dog")},
}
ENTITIES = sorted(NAMES)
# What an earlier version announced (and left retained): removed when this one starts.
LEGACY = {f"sensor.{OBJ}_class_background": ("sensor", "class_background"),
          f"binary_sensor.{OBJ}_class_background": ("binary_sensor", "class_background"),
          f"sensor.{OBJ}_dropped_frames": ("sensor", "dropped_frames"),
          f"button.{OBJ}_run_benchmark": ("button", "run_benchmark")}


def launch(config: Path, log: Path) -> subprocess.Popen:
    """The agent, its output to a file (an undrained pipe would block it)."""
    with log.open("ab") as out:
        return subprocess.Popen([sys.executable, "-m", "edge_agent", "run", "--config", str(config)],
                                stdout=out, stderr=subprocess.STDOUT)


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


@pytest.fixture(scope="session")
def ha_python_venv() -> Path:
    venv = ha_venv()
    t0 = time.monotonic()
    code, output = install_home_assistant(venv)
    if code == NO_PYTHON_EXIT or (code != 0 and not os.environ.get("EDGE_AGENT_HA_REQUIRED")):
        pytest.skip(f"Home Assistant cannot be installed here (exit {code}): {output.splitlines()[-1:]}")
    assert code == 0, output
    print(f"\nHome Assistant venv ready in {time.monotonic() - t0:.1f} s: {output.splitlines()[-1]}")
    return venv


def legacy_config(component: str, key: str) -> bytes:
    """A discovery config as an earlier version published it."""
    return json.dumps({"name": key, "unique_id": f"edge_agent_{OBJ}_{key}", "object_id": f"{OBJ}_{key}",
                       "state_topic": f"{BASE}/ha/state", "availability_topic": f"{BASE}/availability",
                       **({"command_topic": f"{BASE}/cmd/benchmark"} if component == "button" else
                          {"value_template": "{{ value_json['x'] }}"}),
                       "device": {"identifiers": [NODE], "name": DEVICE}}).encode()


@pytest.fixture(scope="module")
def world(ha_python_venv, tmp_path_factory):
    """mosquitto + Home Assistant (holding an earlier version's entities) + the agent on bird and
    cat frames, 2 s each, looping; [homeassistant] with its defaults and a console URL."""
    if not mosquitto_available():
        pytest.skip("mosquitto is not installed")
    tmp = tmp_path_factory.mktemp("ha-world")
    (tmp / "mosquitto").mkdir()
    broker = MosquittoServer(tmp / "mosquitto").start()
    rec = Recorder("127.0.0.1", broker.port, "#")
    for component, key in LEGACY.values():
        rec.publish(f"homeassistant/{component}/{NODE}/{key}/config", legacy_config(component, key), retain=True)
    ha = HomeAssistantServer(ha_python_venv, tmp / "ha", "127.0.0.1", broker.port)
    frames = tmp / "frames"
    frames.mkdir()
    for name in ("bird.bmp", "cat.bmp"):  # links: the shared data is never copied
        (frames / name).symlink_to(IMAGES / name)
    config = write_config(
        tmp / "agent.toml", DEVICE, broker.port,
        {"kind": "folder", "uri": str(frames), "loop": True, "fps": 0.5},
        publish={"timings_interval_s": 1.0, "stats_interval_s": 2.0, "overlay_max_hz": 2.0},
        homeassistant={"enabled": True, "state_interval_s": 0.2, "console_url": CONSOLE})
    agent = None
    try:
        ha.start()
        print(f"Home Assistant API up after {ha.start_seconds:.1f} s")
        rec.wait_for("homeassistant/status", b"online", timeout=60)  # HA's MQTT client is connected
        ha.wait_for(lambda: all(e in ha.states() for e in LEGACY), 60, "the earlier version's entities")
        agent = launch(config, tmp / "agent.log")
        yield {"ha": ha, "rec": rec, "agent": agent, "config": config, "broker": broker, "tmp": tmp}
    finally:
        if agent is not None:
            stop(agent)
            if os.environ.get("EDGE_AGENT_TEST_VERBOSE"):
                print((tmp / "agent.log").read_text(errors="replace"))
        ha.stop()
        rec.close()
        broker.close()


def _results(rec: Recorder):
    return [json.loads(m.payload) for m in rec.matching(f"{BASE}/result")]


def _number(state) -> float:
    try:
        return float(state["state"])
    except (TypeError, KeyError, ValueError):
        return -1.0


def device_of(ha: HomeAssistantServer, entity_id: str) -> str:
    device = ha.template("{{ device_id('%s') }}" % entity_id)
    assert device and device != "None", entity_id
    return device


def test_the_default_entity_set_and_its_names(world):
    """One device with the curated set (no background, no CPU temperature on a host without one,
    at most 15), distinct names, a link to the console; the earlier version's entities are gone."""
    ha = world["ha"]
    t0 = time.monotonic()
    ha.wait_for(lambda: all(e in ha.states() for e in ENTITIES), 60, f"entities {ENTITIES}")
    print(f"entities visible {time.monotonic() - t0:.1f} s after the agent started")
    ha.wait_for(lambda: not any(e in ha.states() for e in LEGACY), 30, "the earlier version's entities removed")
    device = device_of(ha, f"sensor.{OBJ}_status")
    on_device = sorted(json.loads(ha.template("{{ device_entities('%s') | to_json }}" % device)))
    assert on_device == ENTITIES and len(on_device) <= 15
    print(f"{len(on_device)} entities: " + ", ".join(f"{NAMES[e]} ({e})" for e in on_device))
    attrs = json.loads(ha.template(
        "{{ {'name': device_attr('%s', 'name'), 'manufacturer': device_attr('%s', 'manufacturer'), "
        "'configuration_url': device_attr('%s', 'configuration_url'), 'model': device_attr('%s', 'model')} | to_json }}"
        % ((device,) * 4)))
    assert attrs == {"name": DEVICE, "manufacturer": "edge-agent", "configuration_url": CONSOLE,
                     "model": attrs["model"]} and attrs["model"]
    states = ha.states()
    for entity_id, name in NAMES.items():
        assert states[entity_id]["attributes"]["friendly_name"] == f"{DEVICE} {name}", entity_id
    assert not any("background" in e for e in states if OBJ in e)
    assert states[f"sensor.{OBJ}_status"]["attributes"]["options"] == ["running", "error", "stopped"]
    assert states[f"binary_sensor.{OBJ}_problem"]["attributes"]["device_class"] == "problem"
    assert states[f"binary_sensor.{OBJ}_class_cat"]["attributes"]["device_class"] == "occupancy"
    assert states[f"sensor.{OBJ}_class_cat"]["attributes"]["unit_of_measurement"] == "%"
    assert states[f"sensor.{OBJ}_inference_time"]["attributes"]["unit_of_measurement"] == "ms"


def test_a_healthy_agent_has_no_unknown_entity(world):
    ha = world["ha"]

    def settled():
        states = ha.states()
        shown = {e: (states.get(e) or {}).get("state") for e in ENTITIES}
        return shown if all(s not in (None, "unknown", "unavailable") for s in shown.values()) else None

    shown = ha.wait_for(settled, 60, "every entity with a value")
    print(f"states: {shown}")
    assert shown[f"sensor.{OBJ}_status"] == "running" and shown[f"binary_sensor.{OBJ}_problem"] == "off"
    status = ha.state(f"sensor.{OBJ}_status")["attributes"]
    assert status["reason"] is None and status["model"] == "deeplabv3_mnv2_dm05_pascal_quant"
    assert _number(ha.state(f"sensor.{OBJ}_inference_time")) > 0 and _number(ha.state(f"sensor.{OBJ}_fps")) > 0


def test_class_entities_follow_the_agents_frames(world):
    """"Cat coverage" shows the cat frame's fraction (as the agent computed it) and 0 on the bird
    frame; "Cat" is on and off with it."""
    ha, rec = world["ha"], world["rec"]
    seen = set()

    def both_seen():
        cat, present = ha.state(f"sensor.{OBJ}_class_cat"), ha.state(f"binary_sensor.{OBJ}_class_cat")
        if cat and present and cat["state"] not in ("unknown", "unavailable"):
            seen.add((float(cat["state"]), present["state"]))
        return any(v == 0.0 and p == "off" for v, p in seen) and any(v > 0 and p == "on" for v, p in seen)

    ha.wait_for(both_seen, 60, "cat coverage at 0/off and >0/on", interval=0.1)
    agent_cat = {round(100 * r["classes"]["cat"], 2) for r in _results(rec) if "cat" in r["classes"]}
    print(f"HA cat states seen: {sorted(seen)}; agent cat %: {sorted(agent_cat)}")
    shown = {v for v, p in seen if v > 0}
    assert shown <= agent_cat, (shown, agent_cat)
    assert all(p == ("on" if v >= 1.0 else "off") for v, p in seen), seen  # min_fraction 0.01


def test_image_entity_serves_the_overlay_jpeg(world):
    ha = world["ha"]
    state = ha.wait_for(lambda: (lambda s: s if s and s["state"] not in ("unknown", "unavailable") else None)(
        ha.state(f"image.{OBJ}_overlay")), 30, "overlay image")
    code, body, headers = ha.get(state["attributes"]["entity_picture"])
    assert code == 200 and headers.get("Content-Type", "").startswith("image/jpeg")
    picture = cv2.imdecode(np.frombuffer(body, np.uint8), cv2.IMREAD_COLOR)
    sizes = {cv2.imread(str(IMAGES / n)).shape for n in ("bird.bmp", "cat.bmp")}
    assert picture is not None and picture.shape in sizes


def test_status_turns_to_error_with_the_reason_then_stopped(world):
    """A healthy agent reloads into a model that cannot be invoked: Status = error with the reason,
    Problem on, its class entities unavailable (kept, not removed); back on a good model it runs
    again; a clean stop shows "stopped"."""
    ha, broker, tmp = world["ha"], world["broker"], world["tmp"]
    device, obj = "pi-ha-err", "pi_ha_err"
    frames = tmp / "cat-only"
    frames.mkdir()
    (frames / "cat.bmp").symlink_to(IMAGES / "cat.bmp")
    source = {"kind": "folder", "uri": str(frames), "loop": True, "fps": 1.0}
    sections = {"publish": {"timings_interval_s": 1.0, "stats_interval_s": 2.0},
                "homeassistant": {"enabled": True, "state_interval_s": 0.2}}
    config = write_config(tmp / "err.toml", device, broker.port, source, **sections)
    agent = launch(config, tmp / "err.log")
    try:
        ha.wait_for(lambda: (ha.state(f"sensor.{obj}_status") or {}).get("state") == "running"
                    and _number(ha.state(f"sensor.{obj}_class_cat")) > 0, 60, "a running agent")
        write_config(config, device, broker.port, source, model={"path": str(INVOKE_ERROR)}, **sections)
        agent.send_signal(signal.SIGHUP)
        status = ha.wait_for(lambda: (lambda s: s if s and s["state"] == "error" else None)(
            ha.state(f"sensor.{obj}_status")), 60, "status error")
        reason = status["attributes"]["reason"]
        print(f"status: error, reason: {reason!r}")
        assert "model_invoking_error.tflite" in reason and "cannot prepare this model" in reason
        problem = ha.state(f"binary_sensor.{obj}_problem")
        assert problem["state"] == "on" and problem["attributes"]["reason"] == reason
        assert ha.state(f"sensor.{obj}_class_cat")["state"] == "unavailable"
        assert ha.state(f"sensor.{obj}_fps")["state"] == "unavailable"

        write_config(config, device, broker.port, source, model={"path": str(DM05)}, **sections)
        agent.send_signal(signal.SIGHUP)
        ha.wait_for(lambda: (ha.state(f"sensor.{obj}_status") or {}).get("state") == "running"
                    and (ha.state(f"binary_sensor.{obj}_problem") or {}).get("state") == "off"
                    and _number(ha.state(f"sensor.{obj}_class_cat")) > 0, 60, "running again")
        stop(agent)
        assert agent.returncode == 0
        ha.wait_for(lambda: (ha.state(f"sensor.{obj}_status") or {}).get("state") == "stopped", 30, "stopped")
        assert ha.state(f"sensor.{obj}_fps")["state"] == "unavailable"  # offline
    finally:
        stop(agent)


def test_an_agent_that_starts_in_error_says_why(world):
    """Started on a source that does not exist: Status error with the reason, Problem on."""
    ha, broker, tmp = world["ha"], world["broker"], world["tmp"]
    device, obj = "pi-ha-nosrc", "pi_ha_nosrc"
    missing = tmp / "no-such-folder"
    config = write_config(tmp / "nosrc.toml", device, broker.port, {"kind": "folder", "uri": str(missing)},
                          publish={"stats_interval_s": 1.0}, homeassistant={"enabled": True})
    agent = launch(config, tmp / "nosrc.log")
    try:
        status = ha.wait_for(lambda: (lambda s: s if s and s["state"] == "error" else None)(
            ha.state(f"sensor.{obj}_status")), 60, "status error")
        print(f"status: error, reason: {status['attributes']['reason']!r}")
        assert str(missing) in status["attributes"]["reason"]
        assert ha.state(f"binary_sensor.{obj}_problem")["state"] == "on"
    finally:
        stop(agent)


def test_the_demo_with_home_assistant_enabled_appears_too(world, tmp_path):
    """The README's acceptance: `edge-agent demo --set homeassistant.enabled=true` (pointed at
    Home Assistant's broker) makes its device and live entities appear."""
    ha, broker = world["ha"], world["broker"]
    images = tmp_path / "images"
    images.mkdir()
    (images / "grace_hopper.bmp").symlink_to(IMAGES / "grace_hopper.bmp")
    with (tmp_path / "demo.log").open("wb") as log:
        demo = subprocess.Popen(
            [sys.executable, "-m", "edge_agent", "demo", "--images", str(images), "--mirror", str(MODELS),
             "--model", "deeplabv3_mnv2_dm05_pascal_quant", "--out", str(tmp_path / "out"),
             "--set", "homeassistant.enabled=true", "--set", "mqtt.host=127.0.0.1", "--set", f"mqtt.port={broker.port}",
             "--set", "source.loop=true", "--set", "source.fps=2"],
            stdout=log, stderr=subprocess.STDOUT)
    try:
        ha.wait_for(lambda: _number(ha.state("sensor.demo_class_person")) > 10
                    and (ha.state("binary_sensor.demo_class_person") or {}).get("state") == "on", 60, "the demo's person")
        assert ha.state("sensor.demo_status")["attributes"]["model"] == "deeplabv3_mnv2_dm05_pascal_quant"
    finally:
        demo.terminate()
        demo.wait(30)
    subprocess.run([sys.executable, "-m", "edge_agent", "homeassistant", "--remove", "--set", "agent.device_id=demo",
                    "--set", "mqtt.host=127.0.0.1", "--set", f"mqtt.port={broker.port}"], check=True,
                   capture_output=True, timeout=60)
    ha.wait_for(lambda: ha.state("sensor.demo_class_person") is None, 30, "the demo's entities removed")


def test_reannounce_on_home_assistant_online_then_remove(world):
    ha, rec, config = world["ha"], world["rec"], world["config"]
    status_config = f"homeassistant/sensor/{NODE}/status/config"
    before = len(rec.matching(status_config))
    rec.publish("homeassistant/status", b"online")  # what HA sends when it (re)starts
    rec.wait_for(status_config, count=before + 1, timeout=10)

    listing = subprocess.run([sys.executable, "-m", "edge_agent", "homeassistant", "--config", str(config)],
                             capture_output=True, text=True, timeout=60)
    assert listing.returncode == 0, listing.stderr
    assert f"sensor.{OBJ}_status" in listing.stdout and f"binary_sensor.{OBJ}_class_cat" in listing.stdout
    assert "background" not in listing.stdout

    removed = subprocess.run([sys.executable, "-m", "edge_agent", "homeassistant", "--remove",
                              "--config", str(config)], capture_output=True, text=True, timeout=60)
    assert removed.returncode == 0, removed.stderr
    assert f"removed {len(ENTITIES)} Home Assistant entities" in removed.stdout, removed.stdout
    ha.wait_for(lambda: not any(e in ha.states() for e in ENTITIES), 30, "entities removed")
    again = subprocess.run([sys.executable, "-m", "edge_agent", "homeassistant", "--config", str(config)],
                           capture_output=True, text=True, timeout=60)
    assert "not announced" in again.stdout


# -- several cameras ------------------------------------------------------------------------------

CAMS_DEVICE, CAMS_OBJ = "pi-ha-cams", "pi_ha_cams"
# door: the defaults (the classes info.cameras[i].watched names); yard and garage: their own
CAMERAS = {"door": {"uri": str(VOC / "JPEGImages")}, "yard": {"uri": str(IMAGES), "classes": ["cat", "bird"]},
           "garage": {"classes": ["car"]}}


def cameras_config(path: Path, port: int, garage: Path) -> Path:
    """An agent with three [[cameras]]: door (PASCAL VOC val photos), yard (test_data/images) and
    garage (``garage``: a folder that does not exist yet), each at 1 fps, looping."""
    lines = [f'[agent]\ndevice_id = "{CAMS_DEVICE}"\nlog_level = "debug"\nstate_dir = "{path.parent / "cams-state"}"',
             f'[model]\npath = "{DM05}"\nlabels = "{LABELS}"',
             f'[mqtt]\nhost = "127.0.0.1"\nport = {port}\nreconnect_min_s = 0.1\nreconnect_max_s = 0.5',
             '[publish]\nstats_interval_s = 1.0\ntimings_interval_s = 1.0\noverlay_max_hz = 2.0',
             '[homeassistant]\nenabled = true\nstate_interval_s = 0.2']
    for cam, extra in CAMERAS.items():
        values = {"id": cam, "kind": "folder", "uri": str(garage), "loop": True, "fps": 1.0,
                  "reopen_backoff_max_s": 1.0, **extra}
        lines.append("[[cameras]]\n" + "\n".join(f"{k} = {json.dumps(v)}" for k, v in values.items()))
    path.write_text("\n\n".join(lines) + "\n")
    return path


def _available(state) -> bool:
    return bool(state) and state["state"] not in ("unknown", "unavailable")


def test_two_cameras_and_a_failing_one_on_one_device(world):
    """A real agent with three [[cameras]]: one Home Assistant device with each camera's class
    entities (names prefixed with the camera, the classes info.cameras[i].watched names) and an
    overlay image per camera showing that camera's frames, changing; the garage camera's folder is
    missing: Status error naming it, Problem on, only the garage's entities unavailable while the
    door's and yard's and the metrics stay live; the folder appears: running again."""
    ha, rec, broker, tmp = world["ha"], world["rec"], world["broker"], world["tmp"]
    garage = tmp / "garage-frames"
    config = cameras_config(tmp / "cams.toml", broker.port, garage)
    agent = launch(config, tmp / "cams.log")
    base = f"edge-agent/{CAMS_DEVICE}"
    try:
        info = json.loads(rec.wait_for(f"{base}/info", timeout=60)[-1].payload)
        watched = {c["id"]: c["watched"] for c in info["cameras"]}
        assert watched == {"door": ["person", "car", "cat", "dog"], "yard": ["cat", "bird"], "garage": ["car"]}
        # what the device should hold: entity name (after the device's) per camera and class
        expected = {"Status", "Problem", "Frame rate", "Inference time", "End-to-end time",
                    *(["CPU temperature"] if HAS_CPU_TEMP else [])}
        for cam, classes in watched.items():
            expected |= {f"{cam.title()} overlay"}
            expected |= {f"{cam.title()} {c.title()}" for c in classes} | {f"{cam.title()} {c.title()} coverage"
                                                                          for c in classes}

        def by_name():
            named = {s["attributes"].get("friendly_name", "")[len(CAMS_DEVICE) + 1:]: e
                     for e, s in ha.states().items() if e.split(".", 1)[1].startswith(CAMS_OBJ + "_")}
            return named if set(named) >= expected else None

        named = ha.wait_for(by_name, 60, f"the {len(expected)} entities of {CAMS_DEVICE}")
        assert set(named) == expected, sorted(set(named) ^ expected)
        print(f"{len(named)} entities: " + ", ".join(f"{n} ({e})" for n, e in sorted(named.items())))
        device = device_of(ha, named["Status"])
        on_device = set(json.loads(ha.template("{{ device_entities('%s') | to_json }}" % device)))
        assert on_device == set(named.values())  # ONE device holds every camera's entities
        assert len(on_device) <= 6 + 9 * 3
        for cam in CAMERAS:
            assert named[f"{cam.title()} overlay"] == f"image.{CAMS_OBJ}_{cam}_overlay"
        assert named["Door Person"].startswith(f"binary_sensor.{CAMS_OBJ}_class_door_")
        assert named["Yard Cat coverage"].startswith(f"sensor.{CAMS_OBJ}_class_yard_")

        # the garage's folder is missing: the Status says so and names it; only its entities go
        def garage_down():
            status, problem = ha.state(named["Status"]), ha.state(named["Problem"])
            return (status if status and status["state"] == "error" and "garage" in status["attributes"]["reason"]
                    and problem and problem["state"] == "on" else None)

        status = ha.wait_for(garage_down, 60, "Status error naming the garage")
        reason = status["attributes"]["reason"]
        print(f"status: error, reason: {reason!r}")
        assert reason.startswith("camera garage: source down") and str(garage) in reason
        assert "door" not in reason and "yard" not in reason

        def live_except_garage():
            states = ha.states()
            shown = {n: states[e]["state"] for n, e in named.items()}
            garage_gone = all(s == "unavailable" for n, s in shown.items() if n.startswith("Garage"))
            others = {n: s for n, s in shown.items() if not n.startswith("Garage")}
            return shown if garage_gone and all(_available(states[named[n]]) for n in others) else None

        shown = ha.wait_for(live_except_garage, 60, "door, yard and metrics live, the garage unavailable")
        print(f"states: {shown}")
        assert _number(ha.state(named["Frame rate"])) > 0 and _number(ha.state(named["Inference time"])) > 0
        assert ha.state(named["Status"])["attributes"]["source_state"] == {"door": "open", "garage": "down",
                                                                           "yard": "open"}

        # each camera's overlay image: that camera's frames (the JPEG's frame label names it), changing
        sizes = {"door": {cv2.imread(str(p)).shape for p in (VOC / "JPEGImages").iterdir()},
                 "yard": {im.shape for im in (cv2.imread(str(p)) for p in IMAGES.iterdir()) if im is not None}}
        for cam in ("door", "yard"):
            labels = []

            def two_frames():
                state = ha.state(named[f"{cam.title()} overlay"])
                if not _available(state):
                    return None
                code, body, headers = ha.get(state["attributes"]["entity_picture"])
                label = read_frame_label(body) if code == 200 else None
                if label and (not labels or label["seq"] != labels[-1][0]["seq"]):
                    labels.append((label, body, headers.get("Content-Type", "")))
                return len(labels) >= 2

            ha.wait_for(two_frames, 60, f"the {cam} overlay changing", interval=0.3)
            print(f"{cam} overlay frames: {[label for label, _, _ in labels]}")
            for label, body, content_type in labels:
                assert label["camera"] == cam and content_type.startswith("image/jpeg")
                picture = cv2.imdecode(np.frombuffer(body, np.uint8), cv2.IMREAD_COLOR)
                assert picture is not None and picture.shape in sizes[cam], (cam, picture.shape)
            assert labels[0][1] != labels[1][1]

        # the garage's folder appears: its source is reopened, the device runs again
        garage.mkdir()
        (garage / "cat.bmp").symlink_to(IMAGES / "cat.bmp")
        ha.wait_for(lambda: (ha.state(named["Status"]) or {}).get("state") == "running"
                    and (ha.state(named["Problem"]) or {}).get("state") == "off"
                    and _available(ha.state(named["Garage overlay"]))
                    and _available(ha.state(named["Garage Car coverage"])), 60, "the garage back, running")
        stop(agent)
        assert agent.returncode == 0
        ha.wait_for(lambda: (ha.state(named["Status"]) or {}).get("state") == "stopped"
                    and ha.state(named["Door overlay"])["state"] == "unavailable", 30, "stopped")
    finally:
        stop(agent)
        print((tmp / "cams.log").read_text(errors="replace")[-3000:] if os.environ.get("EDGE_AGENT_TEST_VERBOSE") else "")
    assert "Traceback" not in (tmp / "cams.log").read_text(errors="replace")
    removed = subprocess.run([sys.executable, "-m", "edge_agent", "homeassistant", "--remove", "--config", str(config)],
                             capture_output=True, text=True, timeout=60)
    assert removed.returncode == 0 and f"removed {len(named)} Home Assistant entities" in removed.stdout, removed
    ha.wait_for(lambda: not any(e in ha.states() for e in named.values()), 30, "the cameras' entities removed")
