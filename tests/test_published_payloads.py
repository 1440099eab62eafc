"""Every payload a real agent publishes is valid against its schema in docs/asyncapi.yaml (issue 14
item 8), and what the agent says about itself is true: ``stats.mqtt.last_error`` is null while
connected, a clean stop leaves a retained ``info`` with ``status: stopped`` before ``offline``, the
"running ..." log names the model, not the sha256 of its store file.

Validation is closed-world: every object the doc describes with ``properties`` is checked with
``additionalProperties: false`` (a key the code adds without documenting it fails here), besides
the doc's own types, enums, patterns and ``required`` lists (JSON Schema, by ``jsonschema``).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, List

import pytest

from edge_agent.comms.commands import DEFAULT_REMEMBER, CommandChannel
from edge_agent.config import MqttConfig
from edge_agent.fleet.bench import command_params
from edge_agent.fleet.client import FleetClient
from edge_agent.fleet.deploy import deploy, deploy_params
from edge_agent.models.store import ModelStore
from tests.asyncapi_check import DOC, PREFIX, VALIDATORS, check_all, final_info_then_offline
from tests.broker import Recorder
from tests.data import DM05, DM10, IMAGES
from tests.helpers import connected_comms, stop_agent, stop_agent_when_done, wait_until, write_config


def test_the_closed_world_catches_an_undocumented_key():
    """The validation this file relies on can fail: an extra key anywhere is an error."""
    good = {"seq": 1, "capture_ts": 1.0, "frame": {"w": 2, "h": 2}, "mask_seq": None, "mask": None,
            "classes": {"background": 1.0}, "model": "0123456789ab"}
    assert not list(VALIDATORS["result"].iter_errors(good))
    assert list(VALIDATORS["result"].iter_errors({**good, "surprise": 1}))
    assert list(VALIDATORS["result"].iter_errors({**good, "frame": {"w": 2, "h": 2, "d": 3}}))
    assert list(VALIDATORS["availability"].iter_errors("maybe"))


def test_the_request_id_window_is_the_documented_one():
    """The protocol documents the duplicate window (last N ids per reply topic kind, since the
    agent started) instead of persisting one: the number in the doc is the code's."""
    for channel in ("benchmarkReply", "deployReply"):
        text = DOC["channels"][channel]["description"]
        assert f"last {DEFAULT_REMEMBER} request ids" in " ".join(text.split()), channel
        assert "not kept across restarts" in " ".join(text.split()), channel


@pytest.mark.broker
def test_the_request_id_window_behaves_as_documented(mosquitto):
    """Within the last DEFAULT_REMEMBER ids a retransmission is never run again; beyond, it is."""
    with connected_comms(mosquitto().port, "win-1") as comms:
        channel = CommandChannel(lambda: comms, "models", {})
        topic = f"{PREFIX}/win-1/cmd/models"
        assert channel.receive(topic, b'{"request_id":"first"}') is not None
        for i in range(DEFAULT_REMEMBER - 1):  # "first" is still the oldest of the window
            assert channel.receive(topic, b'{"request_id":"n%d"}' % i) is not None
        assert channel.receive(topic, b'{"request_id":"first"}') is None  # a retransmission: not run
        assert channel.receive(topic, b'{"request_id":"one-more"}') is not None  # pushes "first" out
        assert channel.receive(topic, b'{"request_id":"first"}') is not None  # documented: run again
        assert channel.stats()["duplicates"] == 1


@pytest.mark.broker
@pytest.mark.slow
def test_every_published_payload_matches_asyncapi(mosquitto, tmp_path: Path):
    broker = mosquitto()
    rec = Recorder("127.0.0.1", broker.port, f"{PREFIX}/#")
    procs = {}
    for sub in ("f", "i"):
        (tmp_path / sub).mkdir()
    frame_cfg = write_config(tmp_path / "f" / "agent.toml", "sch-f", broker.port,
                             {"kind": "synthetic", "fps": 5.0, "width": 320, "height": 240},
                             publish={"timings": "frame", "overlay": True, "overlay_max_hz": 5.0,
                                      "stats_interval_s": 1.0})
    interval_cfg = write_config(tmp_path / "i" / "agent.toml", "sch-i", broker.port,
                                {"kind": "folder", "uri": str(IMAGES), "loop": False, "fps": 4.0},
                                publish={"timings": "interval", "timings_interval_s": 0.5,
                                         "stats_interval_s": 0.5})
    for dev, cfg in (("sch-f", frame_cfg), ("sch-i", interval_cfg)):
        with (cfg.parent / "agent.log").open("wb") as log:
            procs[dev] = subprocess.Popen([sys.executable, "-m", "edge_agent", "run", "--config", str(cfg)],
                                          stdout=log, stderr=subprocess.STDOUT)
    client = FleetClient(MqttConfig(host="127.0.0.1", port=broker.port))
    try:
        rec.wait_for(f"{PREFIX}/sch-f/overlay", timeout=60)
        client.connect()
        wait_until(lambda: "sch-f" in client.online(), 20, "sch-f online for the fleet client")
        bench = client.request("benchmark", command_params(runs=3, warmup=1, pipeline=True, samples=True),
                               devices=["sch-f"], timeout=60)
        assert bench["sch-f"].status == "done", bench
        assert client.request("benchmark", {"runs": 0}, devices=["sch-f"], timeout=20)["sch-f"].status == "rejected"
        rec.publish(f"{PREFIX}/sch-f/cmd/benchmark", b"not json")  # rejected on benchmark/_invalid
        data = DM10.read_bytes()
        done = deploy(client, deploy_params(data, "dm10", chunk_size=512 * 1024, confirm_frames=3), data,
                      devices=["sch-f"], timeout=120)
        assert done["sch-f"].status == "done", done["sch-f"]
        models = client.request("models", {}, devices=["sch-f"], timeout=20)
        assert models["sch-f"].status == "done" and len(models["sch-f"].final["models"]) == 2
        back = client.request("rollback", {"confirm_frames": 3}, devices=["sch-f"], kind="deploy", timeout=60)
        assert back["sch-f"].final["state"] == "rolled_back", back["sch-f"]
        assert client.request("rollback", {"to": "no-such-model"}, devices=["sch-f"], kind="deploy",
                              timeout=20)["sch-f"].status == "rejected"
        rec.wait_for(f"{PREFIX}/sch-f/benchmark/_invalid", timeout=10)
        rec.wait_for(f"{PREFIX}/sch-f/stats", count=3, timeout=20)
        out_i = stop_agent_when_done(procs.pop("sch-i"), timeout=60)  # a finite source: ends by itself
        out_f = stop_agent(procs.pop("sch-f"))
        for dev in ("sch-f", "sch-i"):
            rec.wait_for(f"{PREFIX}/{dev}/availability", b"offline", timeout=20)
    finally:
        client.close()
        for proc in procs.values():
            stop_agent(proc)
        rec.close()
    seen = check_all(rec, "sch-f") | check_all(rec, "sch-i")
    documented = {"availability", "info", "mask", "result", "timingsFrame", "timingsInterval", "stats",
                  "overlay", "benchmarkResult", "deployStatus", "modelsList"}
    assert seen == documented, f"not seen: {documented - seen}"
    for dev in ("sch-f", "sch-i"):
        final_info_then_offline(rec, dev)


def retained(port: int, topic: str) -> bytes:
    late = Recorder("127.0.0.1", port, topic)  # a new subscriber gets the retained message
    try:
        return bytes(late.wait_for(topic, timeout=10)[0].payload)
    finally:
        late.close()


def stats_docs(rec: Recorder, device: str) -> List[Dict[str, Any]]:
    return [json.loads(m.payload) for m in rec.matching(f"{PREFIX}/{device}/stats")]


@pytest.mark.broker
@pytest.mark.slow
def test_last_error_cleared_final_info_stopped_and_model_name_logged(mosquitto, tmp_path: Path):
    """Agent started while the broker is down, broker started, then restarted: stats say
    connected with last_error null each time; the store's model is logged by name; a clean stop
    leaves ``status: stopped`` retained and ``offline`` after it."""
    broker = mosquitto(start=False)
    state = tmp_path / "state"
    store = ModelStore.open(str(state))
    entry = store.adopt(str(DM05), {"name": "dm05-stored"})
    store.set_pointers(entry.sha256, None)  # the store's current model: its file is <sha256>.tflite
    config = write_config(tmp_path / "agent.toml", "stop-1", broker.port,
                          {"kind": "synthetic", "fps": 5.0, "width": 160, "height": 120},
                          publish={"stats_interval_s": 0.5})
    log_path = tmp_path / "agent.log"
    with log_path.open("wb") as log:
        agent = subprocess.Popen([sys.executable, "-m", "edge_agent", "run", "--config", str(config)],
                                 stdout=log, stderr=subprocess.STDOUT)
    rec = None
    try:
        wait_until(lambda: "cannot connect" in log_path.read_text(errors="replace"), 40, "a failed connect")
        broker.start()
        rec = Recorder("127.0.0.1", broker.port, f"{PREFIX}/stop-1/#")
        first = wait_until(lambda: [d for d in stats_docs(rec, "stop-1") if d["mqtt"]["connected"]], 40,
                           "stats while connected")[0]
        assert first["mqtt"]["last_error"] is None and first["mqtt"]["connects"] == 1, first["mqtt"]
        rec.close()
        broker.restart()
        rec = Recorder("127.0.0.1", broker.port, f"{PREFIX}/stop-1/#")
        again = wait_until(lambda: [d for d in stats_docs(rec, "stop-1") if d["mqtt"]["reconnects"] >= 1], 40,
                           "stats after the reconnect")[0]
        assert again["mqtt"]["connected"] and again["mqtt"]["last_error"] is None, again["mqtt"]
        running = json.loads(retained(broker.port, f"{PREFIX}/stop-1/info"))
        assert running["status"] == "running" and running["model"]["name"] == "dm05-stored"
        stop_agent(agent)
        assert agent.returncode == 0
        rec.wait_for(f"{PREFIX}/stop-1/availability", b"offline", timeout=10)
        final = final_info_then_offline(rec, "stop-1")
        assert final["model"]["name"] == "dm05-stored" and final["error"] is None
        assert json.loads(retained(broker.port, f"{PREFIX}/stop-1/info"))["status"] == "stopped"
        assert retained(broker.port, f"{PREFIX}/stop-1/availability") == b"offline"
    finally:
        stop_agent(agent)
        if rec is not None:
            rec.close()
    out = log_path.read_text(errors="replace")
    running_lines = [line for line in out.splitlines() if ": running " in line and " on " in line]
    assert running_lines and all(f"running dm05-stored ({entry.sha256[:12]}) on " in line
                                 for line in running_lines), running_lines
    assert f"running {entry.sha256}" not in out
