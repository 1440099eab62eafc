"""The daemon end to end: real mosquitto, real models, real OpenCV decoding, real sd_notify socket."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
from edge_agent.daemon.agent import Agent
from edge_agent.config import load_config
from edge_agent.errors import EdgeAgentError
from edge_agent.inference.postprocess import agreement
from edge_agent.output.encode import decode_mask_png
from tests.broker import Recorder
from tests.data import DM05, IMAGES, bird_513, bird_mask
from tests.helpers import NotifySocket, start_agent, stop_agent, stop_agent_when_done, wait_until, write_config

PREFIX = "edge-agent"


def bird_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "frames"
    folder.mkdir()
    cv2.imwrite(str(folder / "bird.png"), cv2.cvtColor(bird_513(), cv2.COLOR_RGB2BGR))
    return folder


@pytest.mark.broker
def test_folder_source_end_to_end(mosquitto, tmp_path):
    broker = mosquitto()
    rec = Recorder("127.0.0.1", broker.port, f"{PREFIX}/#")
    config = write_config(tmp_path / "agent.toml", "pi-1", broker.port,
                          {"kind": "folder", "uri": str(bird_folder(tmp_path)), "loop": True, "fps": 5.0},
                          publish={"timings": "frame", "stats_interval_s": 1.0})
    agent = start_agent(config)
    try:
        base = f"{PREFIX}/pi-1"
        rec.wait_for(f"{base}/availability", b"online", timeout=20)
        info_msg = rec.wait_for(f"{base}/info", timeout=20)[-1]
        assert info_msg.retain or True  # live delivery; retained flag is checked on a late subscriber below
        info = json.loads(info_msg.payload)
        assert info["model"]["sha256"] == __import__("hashlib").sha256(DM05.read_bytes()).hexdigest()
        assert info["model"]["input_size"] == [513, 513] and info["model"]["labels"][3] == "bird"
        assert info["runtime"] and info["host"]["cpu_count"] and info["source"]["kind"] == "folder"
        masks = rec.wait_for(f"{base}/mask", count=3, timeout=30)
        results = rec.wait_for(f"{base}/result", count=3, timeout=10)
        timings = rec.wait_for(f"{base}/timings", count=3, timeout=10)
        rec.wait_for(f"{base}/stats", timeout=10)
    finally:
        out = stop_agent(agent)
    assert agent.returncode == 0, out
    assert "(allocator: mmap threshold 1024 KiB, 2 arenas)" in out  # set before the first thread
    mask = decode_mask_png(bytes(masks[-1].payload))
    assert mask.shape == (513, 513) and mask.dtype == np.uint8
    assert agreement(mask, bird_mask()) > 0.90
    result = json.loads(results[0].payload)
    assert result["frame"] == {"w": 513, "h": 513} and result["mask_seq"] == result["seq"]
    assert result["mask"]["w"] == 513 and set(result["classes"]) >= {"background", "bird"}
    seqs = [json.loads(m.payload)["seq"] for m in results]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    t = json.loads(timings[0].payload)
    assert {"capture", "preprocess", "inference", "postprocess", "encode", "publish", "end_to_end"} <= set(t["ms"])
    assert t["ms"]["inference"] > 0
    stats = json.loads(rec.matching(f"{base}/stats")[0].payload)
    assert stats["frames"]["processed"] >= 1 and "rss_mb" in stats
    # clean shutdown: retained offline, seen by a late subscriber too
    rec.wait_for(f"{base}/availability", b"offline", timeout=10)
    late = Recorder("127.0.0.1", broker.port, f"{base}/+")
    try:
        avail = late.wait_for(f"{base}/availability", timeout=5)[0]
        assert avail.payload == b"offline" and avail.retain
        assert late.wait_for(f"{base}/info", timeout=5)[0].retain
    finally:
        late.close()
        rec.close()


def make_video(path: Path, frames: int = 12) -> Path:
    cat = cv2.imread(str(IMAGES / "cat_720p.jpg"))  # BGR 1280x720
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10.0, (1280, 720))
    assert writer.isOpened()
    for i in range(frames):
        writer.write(np.roll(cat, i * 8, axis=1))
    writer.release()
    return path


@pytest.mark.broker
def test_video_file_source_frame_resolution_masks(mosquitto, tmp_path):
    broker = mosquitto()
    video = make_video(tmp_path / "clip.avi")
    rec = Recorder("127.0.0.1", broker.port, f"{PREFIX}/#")
    config = write_config(tmp_path / "agent.toml", "cam-2", broker.port,
                          {"kind": "opencv", "uri": str(video), "loop": False},
                          publish={"mask_resolution": "frame", "overlay": True, "overlay_max_hz": 100.0})
    agent = start_agent(config)
    out = stop_agent_when_done(agent)
    assert agent.returncode == 0, out
    # 720p frames, masks and overlays stay in the heap (page faults a frame otherwise), models mapped
    assert "allocator: mmap threshold 4096 KiB for 1280x720 frames" in out
    masks = rec.matching(f"{PREFIX}/cam-2/mask")
    results = [json.loads(m.payload) for m in rec.matching(f"{PREFIX}/cam-2/result")]
    assert len(masks) == 12 and len(results) == 12, out  # a file at full speed loses no frame
    for m in masks:
        mask = decode_mask_png(bytes(m.payload))
        assert mask.shape == (720, 1280)
    assert [r["seq"] for r in results] == sorted(r["seq"] for r in results)
    assert all(r["frame"] == {"w": 1280, "h": 720} and "cat" in r["classes"] for r in results)
    overlay = cv2.imdecode(np.frombuffer(bytes(rec.matching(f"{PREFIX}/cam-2/overlay")[0].payload), np.uint8),
                           cv2.IMREAD_COLOR)
    assert overlay.shape == (720, 1280, 3)
    timings = [json.loads(m.payload) for m in rec.matching(f"{PREFIX}/cam-2/timings")]
    assert timings and timings[-1]["frames"] >= 1 and "inference" in timings[-1]["stages"]
    rec.close()


@pytest.mark.broker
def test_two_interpreters_process_a_video_file_frame_by_frame_in_order(mosquitto, tmp_path):
    """model.interpreters = 2 in the real agent: both workers run, no frame lost or reordered."""
    broker = mosquitto()
    video = make_video(tmp_path / "clip.avi", frames=16)
    rec = Recorder("127.0.0.1", broker.port, f"{PREFIX}/#")
    config = write_config(tmp_path / "agent.toml", "cam-3", broker.port,
                          {"kind": "opencv", "uri": str(video), "loop": False},
                          model={"threads": 1, "interpreters": 2})
    agent = start_agent(config)
    out = stop_agent_when_done(agent)
    assert agent.returncode == 0, out
    assert "2 interpreters" in out
    info = json.loads(rec.matching(f"{PREFIX}/cam-3/info")[0].payload)
    assert info["interpreters"] == 2 and info["threads"] == 1
    results = [json.loads(m.payload) for m in rec.matching(f"{PREFIX}/cam-3/result")]
    assert len(rec.matching(f"{PREFIX}/cam-3/mask")) == 16 and len(results) == 16, out
    assert [r["seq"] for r in results] == sorted(r["seq"] for r in results)
    assert all("cat" in r["classes"] for r in results)
    rec.close()


@pytest.mark.broker
def test_broker_down_at_start_restart_and_lwt(mosquitto, tmp_path):
    broker = mosquitto(start=False)
    config = write_config(tmp_path / "agent.toml", "pi-3", broker.port,
                          {"kind": "synthetic", "width": 320, "height": 240, "fps": 10.0},
                          publish={"stats_interval_s": 0.5}, mqtt={"keepalive": 5},
                          outbox={"enabled": False})  # drops counted (the outbox: tests/test_outbox.py)
    notify = NotifySocket(str(tmp_path / "notify.sock"))
    agent = start_agent(config, env=dict(os.environ, NOTIFY_SOCKET=notify.address, WATCHDOG_USEC="1000000"))
    try:
        # the agent runs without a broker: ready after its first frame, and frames keep flowing
        ready = notify.wait_for("READY=1")
        notify.wait_count("WATCHDOG=1", 2, since=ready)
        assert agent.poll() is None
        broker.start()
        rec = Recorder("127.0.0.1", broker.port, f"{PREFIX}/#")
        base = f"{PREFIX}/pi-3"
        rec.wait_for(f"{base}/availability", b"online", timeout=20)
        rec.wait_for(f"{base}/mask", count=2, timeout=20)
        rec.close()
        broker.restart()
        rec = Recorder("127.0.0.1", broker.port, f"{PREFIX}/#")
        rec.wait_for(f"{base}/availability", b"online", timeout=20)  # re-published after reconnect
        rec.wait_for(f"{base}/info", timeout=10)
        stats = [json.loads(m.payload) for m in rec.wait_for(f"{base}/stats", count=2, timeout=20)]
        assert stats[-1]["mqtt"]["reconnects"] >= 1
        assert stats[-1]["publish_failed"] >= 1  # frames published while away were dropped, and counted
        assert agent.poll() is None
        agent.kill()  # SIGKILL: no clean offline, the broker sends the Last Will
        rec.wait_for(f"{base}/availability", b"offline", timeout=20)
        rec.close()
    finally:
        stop_agent(agent)
        notify.close()


@pytest.mark.broker
def test_bad_model_keeps_the_agent_online_with_the_error(mosquitto, tmp_path):
    broker = mosquitto()
    rec = Recorder("127.0.0.1", broker.port, f"{PREFIX}/#")
    config = write_config(tmp_path / "agent.toml", "pi-4", broker.port,
                          {"kind": "synthetic"}, model={"path": str(IMAGES / "pets.jpg")})
    agent = start_agent(config)
    try:
        rec.wait_for(f"{PREFIX}/pi-4/availability", b"online", timeout=20)
        info = json.loads(rec.wait_for(f"{PREFIX}/pi-4/info", timeout=10)[-1].payload)
        assert info["status"] == "error" and "not a TFLite model" in info["error"]
        # still serving commands after the error: a benchmark request gets its final answer
        rec.publish(f"{PREFIX}/pi-4/cmd/benchmark", b'{"request_id":"alive","runs":1,"warmup":0}')
        answers = wait_until(lambda: [json.loads(m.payload) for m in rec.matching(f"{PREFIX}/pi-4/benchmark/alive")
                                      if json.loads(m.payload)["final"]], timeout=30, what="a final answer")
        assert answers[-1]["status"] == "failed" and "not a TFLite model" in answers[-1]["reason"]
        assert agent.poll() is None
    finally:
        out = stop_agent(agent)
        rec.close()
    assert "Traceback" not in out


# -- sd_notify with a real NOTIFY_SOCKET ---------------------------------------------------------

def test_sd_notify_ready_watchdog_stopping_in_a_real_process(tmp_path):
    notify = NotifySocket(str(tmp_path / "notify.sock"))
    config = write_config(tmp_path / "agent.toml", "pi-5", 1, {"kind": "synthetic", "fps": 10.0},
                          mqtt={"enabled": False})
    env = dict(os.environ, NOTIFY_SOCKET=notify.address, WATCHDOG_USEC="1000000")
    agent = start_agent(config, env=env)
    try:
        notify.wait_for("READY=1")
        t = notify.wait_for("WATCHDOG=1")
        notify.wait_count("WATCHDOG=1", 3, since=t)  # WatchdogSec=1: a ping every 0.5 s while frames flow
        assert any(m.startswith("STATUS=") for _, m in notify.messages)
    finally:
        out = stop_agent(agent)
    notify.wait_for("STOPPING=1", timeout=5)
    notify.close()
    assert agent.returncode == 0, out


def test_watchdog_stops_when_inference_hangs(tmp_path, monkeypatch):
    """Fault injection: invoke() blocks forever; the agent must withhold WATCHDOG=1."""
    notify = NotifySocket(str(tmp_path / "notify.sock"))
    monkeypatch.setenv("NOTIFY_SOCKET", notify.address)
    monkeypatch.setenv("WATCHDOG_USEC", "600000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    cfg = load_config(None, [
        "agent.device_id=hang", "source.kind=synthetic", "source.fps=20", "mqtt.enabled=false",
        f"model.path={DM05}", "model.inference_timeout_s=1.0",
    ], env={})
    agent = Agent(cfg, install_signals=False)
    hang = threading.Event()
    release = threading.Event()
    runner = threading.Thread(target=agent.run, daemon=True)
    runner.start()
    try:
        notify.wait_for("READY=1")
        t0 = notify.wait_for("WATCHDOG=1")
        notify.wait_count("WATCHDOG=1", 2, since=t0)  # WatchdogSec=0.6: a ping every 0.3 s
        model = agent.pipeline.segmenter.model
        original = model.invoke

        def stuck():
            hang.set()
            release.wait(30)
            original()

        model.invoke = stuck
        assert hang.wait(5)
        hung_at = time.monotonic()
        # once inference_timeout_s (1 s) has passed the pings stop: systemd sees a gap of more than
        # three times WatchdogSec (it would restart the unit after one)
        silent_from = notify.wait_silence("WATCHDOG=1", quiet_s=2.0, timeout=15)
        assert silent_from >= hung_at
        release.set()
        model.invoke = original
        notify.wait_count("WATCHDOG=1", 1, since=time.monotonic(), timeout=15)  # pings resume with progress
    finally:
        release.set()
        agent.request_stop()
        runner.join(15)
        notify.close()


@pytest.mark.broker
def test_sighup_reload_moves_to_a_new_broker_with_its_commands(mosquitto, tmp_path):
    """SIGHUP re-reads the config; a new broker gets online/info and the command handlers."""
    first, second = mosquitto(), mosquitto()
    source = {"kind": "synthetic", "width": 320, "height": 240, "fps": 5.0}
    config = write_config(tmp_path / "agent.toml", "pi-6", first.port, source)
    agent = start_agent(config)
    rec2 = Recorder("127.0.0.1", second.port, f"{PREFIX}/#")
    try:
        rec1 = Recorder("127.0.0.1", first.port, f"{PREFIX}/#")
        rec1.wait_for(f"{PREFIX}/pi-6/mask", timeout=20)
        rec1.close()
        write_config(config, "pi-6", second.port, source)
        agent.send_signal(signal.SIGHUP)
        rec2.wait_for(f"{PREFIX}/pi-6/availability", b"online", timeout=20)
        rec2.wait_for(f"{PREFIX}/pi-6/mask", timeout=20)
        rec2.publish(f"{PREFIX}/pi-6/cmd/benchmark", json.dumps({"request_id": "r1", "runs": 2, "warmup": 0}).encode())
        answers = rec2.wait_for(f"{PREFIX}/pi-6/benchmark/r1", count=2, timeout=60)
        assert json.loads(answers[0].payload)["status"] == "accepted"
        final = [json.loads(m.payload) for m in rec2.wait_for(f"{PREFIX}/pi-6/benchmark/r1", count=1, timeout=60)]
        deadline = time.monotonic() + 60
        while not any(a["status"] in ("done", "failed", "rejected") for a in final) and time.monotonic() < deadline:
            time.sleep(0.2)
            final = [json.loads(m.payload) for m in rec2.matching(f"{PREFIX}/pi-6/benchmark/r1")]
        assert [a["status"] for a in final if a["status"] in ("done", "failed", "rejected")] == ["done"]
    finally:
        out = stop_agent(agent)
        rec2.close()
    assert agent.returncode == 0, out


def test_model_name_is_fetched_into_the_state_dir(tmp_path, monkeypatch):
    from edge_agent.daemon.model_manager import ModelManager
    from tests.data import MODELS

    monkeypatch.delenv("EDGE_AGENT_MODELS_DIR", raising=False)
    monkeypatch.setenv("EDGE_AGENT_MODEL_MIRROR", str(MODELS))
    cfg = load_config(None, ["model.name=deeplabv3_mnv2_dm05_pascal_quant",
                             f"agent.state_dir={tmp_path}"], env={})
    path, labels = ModelManager(cfg, host=None).configured()
    assert path == str(tmp_path / "catalog" / "deeplabv3_mnv2_dm05_pascal_quant.tflite")
    assert Path(path).read_bytes() == DM05.read_bytes() and labels[3] == "bird"
    cfg = load_config(None, ["model.name=resnet50", f"agent.state_dir={tmp_path}"], env={})
    with pytest.raises(EdgeAgentError, match="unknown model 'resnet50'"):
        ModelManager(cfg, host=None).configured()


def test_a_stored_model_that_no_longer_loads_falls_back_to_the_configured_one(tmp_path):
    """The store's current model cannot run (here: an Edge TPU build, no delegate): serve the
    configured model instead of nothing."""
    from edge_agent.models.store import ModelStore
    from tests.data import DM05_EDGETPU

    store = ModelStore.open(str(tmp_path), 3)
    stored = store.adopt(str(DM05_EDGETPU), {"name": "tpu-only", "labels": None})
    store.set_pointers(stored.sha256, None)
    cfg = load_config(None, [f"model.path={DM05}", "mqtt.enabled=false", "source.kind=synthetic",
                             f"agent.state_dir={tmp_path}"], env={})
    agent = Agent(cfg, install_signals=False)
    assert agent.models.open_store() is not None
    agent.start_pipeline()
    try:
        assert agent.error is None and agent.pipeline is not None
        assert agent.segmenter.model.path == str(DM05)
    finally:
        agent.stop_pipeline()
