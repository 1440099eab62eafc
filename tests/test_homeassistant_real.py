"""The agent against a REAL Home Assistant: discovery, class sensors, overlay image, benchmark button.

Home Assistant core 2025.4.4 runs from its own venv (installed once by tools/homeassistant-venv.sh,
cached), with its MQTT integration pointed at a real mosquitto; the real agent process runs on
real images with a real model. Everything is checked through Home Assistant's own REST API.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from tests.broker import MosquittoServer, Recorder, mosquitto_available
from tests.data import IMAGES, MODELS
from tests.homeassistant import NO_PYTHON_EXIT, HomeAssistantServer, ha_venv, install_home_assistant
from tests.helpers import start_agent, stop_agent, write_config

pytestmark = [pytest.mark.slow, pytest.mark.homeassistant, pytest.mark.broker]

DEVICE = "pi-ha"
OBJ = "pi_ha"  # the device id as HA object ids spell it
BASE = f"edge-agent/{DEVICE}"
NODE = f"edge-agent-{DEVICE}"
CLASSES = ("bird", "cat", "person")
METRIC_SENSORS = ("fps", "inference_time", "end_to_end_time", "cpu_temperature", "dropped_frames", "model",
                  "benchmark_p50")
ENTITIES = ([f"sensor.{OBJ}_{k}" for k in METRIC_SENSORS] + [f"image.{OBJ}_overlay", f"button.{OBJ}_run_benchmark"]
            + [f"sensor.{OBJ}_class_{c}" for c in CLASSES] + [f"binary_sensor.{OBJ}_class_{c}" for c in CLASSES])


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


@pytest.fixture(scope="module")
def world(ha_python_venv, tmp_path_factory):
    """mosquitto + Home Assistant + the agent (bird and cat frames, 2 s each, looping)."""
    if not mosquitto_available():
        pytest.skip("mosquitto is not installed")
    tmp = tmp_path_factory.mktemp("ha-world")
    (tmp / "mosquitto").mkdir()
    broker = MosquittoServer(tmp / "mosquitto").start()
    rec = Recorder("127.0.0.1", broker.port, "#")
    ha = HomeAssistantServer(ha_python_venv, tmp / "ha", "127.0.0.1", broker.port)
    frames = tmp / "frames"
    frames.mkdir()
    for name in ("bird.bmp", "cat.bmp"):  # links: the shared data is never copied
        (frames / name).symlink_to(IMAGES / name)
    config = write_config(
        tmp / "agent.toml", DEVICE, broker.port,
        {"kind": "folder", "uri": str(frames), "loop": True, "fps": 0.5},
        publish={"timings_interval_s": 1.0, "stats_interval_s": 2.0, "overlay_max_hz": 2.0},
        benchmark={"max_runs": 5},
        homeassistant={"enabled": True, "classes": list(CLASSES), "state_interval_s": 0.2})
    agent = None
    try:
        ha.start()
        print(f"Home Assistant API up after {ha.start_seconds:.1f} s")
        rec.wait_for("homeassistant/status", b"online", timeout=60)  # HA's MQTT client is connected
        agent = start_agent(config)
        yield {"ha": ha, "rec": rec, "agent": agent, "config": config, "broker": broker}
    finally:
        if agent is not None:
            out = stop_agent(agent)
            if os.environ.get("EDGE_AGENT_TEST_VERBOSE"):
                print(out)
        ha.stop()
        rec.close()
        broker.close()


def _results(rec: Recorder):
    return [json.loads(m.payload) for m in rec.matching(f"{BASE}/result")]


def test_device_and_its_entities_appear_in_home_assistant(world):
    ha = world["ha"]
    t0 = time.monotonic()
    states = ha.wait_for(lambda: (lambda s: s if all(e in s for e in ENTITIES) else None)(ha.states()),
                         60, f"entities {ENTITIES}")
    print(f"entities visible {time.monotonic() - t0:.1f} s after the agent started")
    device = ha.template("{{ device_id('sensor.%s_fps') }}" % OBJ)
    assert device and device != "None"
    attrs = json.loads(ha.template(
        "{{ {'name': device_attr('%s', 'name'), 'manufacturer': device_attr('%s', 'manufacturer'), "
        "'sw_version': device_attr('%s', 'sw_version'), 'model': device_attr('%s', 'model')} | to_json }}"
        % ((device,) * 4)))
    assert attrs["name"] == DEVICE and attrs["manufacturer"] == "edge-agent"
    assert attrs["sw_version"] and attrs["model"]
    on_device = set(json.loads(ha.template("{{ device_entities('%s') | to_json }}" % device)))
    assert set(ENTITIES) <= on_device, sorted(set(ENTITIES) - on_device)
    # The running model and live numbers arrive through the retained ha/state topic.
    ha.wait_for(lambda: (ha.state(f"sensor.{OBJ}_model") or {}).get("state") == "deeplabv3_mnv2_dm05_pascal_quant",
                30, "model sensor")
    ha.wait_for(lambda: _number(ha.state(f"sensor.{OBJ}_inference_time")) > 0, 30, "inference time")
    assert states[f"sensor.{OBJ}_inference_time"]["attributes"]["unit_of_measurement"] == "ms"
    assert states[f"binary_sensor.{OBJ}_class_cat"]["attributes"].get("device_class") == "occupancy"


def _number(state) -> float:
    try:
        return float(state["state"])
    except (TypeError, KeyError, ValueError):
        return -1.0


def test_class_sensor_follows_the_agents_frames(world):
    """The cat sensor shows the cat frame's fraction (as the agent computed it) and 0 on the bird
    frame; the binary sensor is on and off with it."""
    ha, rec = world["ha"], world["rec"]
    seen = set()

    def both_seen():
        cat, present = ha.state(f"sensor.{OBJ}_class_cat"), ha.state(f"binary_sensor.{OBJ}_class_cat")
        if cat and present and cat["state"] not in ("unknown", "unavailable"):
            seen.add((float(cat["state"]), present["state"]))
        return any(v == 0.0 and p == "off" for v, p in seen) and any(v > 0 and p == "on" for v, p in seen)

    ha.wait_for(both_seen, 60, "cat sensor at 0/off and >0/on", interval=0.1)
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


def test_button_runs_a_benchmark_on_the_device(world):
    ha, rec = world["ha"], world["rec"]
    before = len(rec.matching(f"{BASE}/cmd/benchmark"))
    ha.call("button", "press", {"entity_id": f"button.{OBJ}_run_benchmark"})
    command = rec.wait_for(f"{BASE}/cmd/benchmark", count=before + 1, timeout=20)[-1]
    assert not command.retain
    request = json.loads(command.payload)
    assert request["request_id"].startswith("ha-") and set(request) == {"request_id"}
    final = None
    deadline = time.monotonic() + 120
    while final is None and time.monotonic() < deadline:
        answers = [json.loads(m.payload) for m in rec.matching(f"{BASE}/benchmark/{request['request_id']}")]
        final = next((a for a in answers if a["final"]), None)
        time.sleep(0.2)
    assert final is not None and final["status"] == "done", (
        final, request, [(m.topic, bytes(m.payload)[:200]) for m in rec.messages if "/benchmark" in m.topic])
    p50 = final["result"]["invoke"]["p50"]
    assert final["result"]["invoke"]["count"] == 5  # the device's max_runs caps the default 50
    ha.wait_for(lambda: abs(_number(ha.state(f"sensor.{OBJ}_benchmark_p50")) - p50) < 0.01, 20,
                f"benchmark p50 {p50}")


def test_the_demo_with_home_assistant_enabled_appears_too(world, tmp_path):
    """The README's acceptance: `edge-agent demo --set homeassistant.enabled=true` (pointed at
    Home Assistant's broker) makes its device and live entities appear."""
    ha, broker = world["ha"], world["broker"]
    images = tmp_path / "images"
    images.mkdir()
    (images / "grace_hopper.bmp").symlink_to(IMAGES / "grace_hopper.bmp")
    demo = subprocess.Popen(
        [sys.executable, "-m", "edge_agent", "demo", "--images", str(images), "--mirror", str(MODELS),
         "--model", "deeplabv3_mnv2_dm05_pascal_quant", "--out", str(tmp_path / "out"),
         "--set", "homeassistant.enabled=true", "--set", "mqtt.host=127.0.0.1", "--set", f"mqtt.port={broker.port}",
         "--set", "source.loop=true", "--set", "source.fps=2"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        ha.wait_for(lambda: _number(ha.state("sensor.demo_class_person")) > 10
                    and (ha.state("binary_sensor.demo_class_person") or {}).get("state") == "on", 60, "the demo's person")
        assert (ha.state("sensor.demo_model") or {}).get("state") == "deeplabv3_mnv2_dm05_pascal_quant"
    finally:
        demo.terminate()
        demo.wait(30)
    subprocess.run([sys.executable, "-m", "edge_agent", "homeassistant", "--remove", "--set", "agent.device_id=demo",
                    "--set", "mqtt.host=127.0.0.1", "--set", f"mqtt.port={broker.port}"], check=True,
                   capture_output=True, timeout=60)
    ha.wait_for(lambda: ha.state("sensor.demo_class_person") is None, 30, "the demo's entities removed")


def test_reannounce_on_home_assistant_online_then_remove(world):
    ha, rec, config = world["ha"], world["rec"], world["config"]
    fps_config = f"homeassistant/sensor/{NODE}/fps/config"
    before = len(rec.matching(fps_config))
    rec.publish("homeassistant/status", b"online")  # what HA sends when it (re)starts
    rec.wait_for(fps_config, count=before + 1, timeout=10)

    listing = subprocess.run([sys.executable, "-m", "edge_agent", "homeassistant", "--config", str(config)],
                             capture_output=True, text=True, timeout=60)
    assert listing.returncode == 0, listing.stderr
    assert f"sensor.{OBJ}_fps" in listing.stdout and f"binary_sensor.{OBJ}_class_cat" in listing.stdout

    removed = subprocess.run([sys.executable, "-m", "edge_agent", "homeassistant", "--remove",
                              "--config", str(config)], capture_output=True, text=True, timeout=60)
    assert removed.returncode == 0, removed.stderr
    assert f"removed {len(ENTITIES)} Home Assistant entities" in removed.stdout, removed.stdout
    ha.wait_for(lambda: not any(e in ha.states() for e in ENTITIES), 30, "entities removed")
    again = subprocess.run([sys.executable, "-m", "edge_agent", "homeassistant", "--config", str(config)],
                           capture_output=True, text=True, timeout=60)
    assert "not announced" in again.stdout
