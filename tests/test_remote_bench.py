"""Remote benchmarks over a real mosquitto with real agent processes and the real dm05 model.

Covers the command plumbing (strict schema, request ids, duplicates, one final answer, MQTT 5
response topic), the agent side (queue/busy, pause, named models, second interpreter) and the
host side (fleet discovery, a device killed mid-benchmark, table/CSV/JSON/plot agreement).
"""

from __future__ import annotations

import csv
import json
import re
import threading
import time
from pathlib import Path
from typing import Any, Dict, List

import cv2
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edge_agent.comms import commands
from edge_agent.output.benchmark import BenchSettings, run_benchmark
from edge_agent.comms.mqtt import MqttComms
from edge_agent.comms.commands import CommandChannel, RequestError, decode_json, validate
from edge_agent.config import BenchmarkConfig, MqttConfig
from edge_agent.cli import build_parser
from edge_agent.fleet import bench as fleet_bench
from edge_agent.fleet.client import FleetClient
from edge_agent.fleet.table import format_table
from edge_agent.remote.bench import request_schema
from edge_agent.inference.segmenter import Segmenter
from edge_agent.models.store import ModelStore
from tests.broker import Recorder
from tests.data import DM05, LABELS
from tests.helpers import RESULT_KEYS, start_agent, stop_agent, write_config

PREFIX = "edge-agent"
try:
    import matplotlib  # noqa: F401  (optional: the fleet extra; absent in the tflite-runtime venv)
    HAVE_MATPLOTLIB = True
except ImportError:
    HAVE_MATPLOTLIB = False
SCHEMA = request_schema(BenchmarkConfig(max_runs=100, max_seconds=60.0))


# -- request parsing (pure) ----------------------------------------------------------------------

@pytest.mark.parametrize("payload, reason", [
    (b'{"request_id":"a","runs":0}', "runs: expected an integer 1..100, got 0"),
    (b'{"request_id":"a","runs":101}', "runs: expected an integer 1..100, got 101"),
    (b'{"request_id":"a","runs":true}', "runs: expected an integer 1..100, got true"),
    (b'{"request_id":"a","runs":2.0}', "runs: expected an integer 1..100, got 2.0"),
    (b'{"request_id":"a","runs":"5"}', 'runs: expected an integer 1..100, got "5"'),
    (b'{"request_id":"a","runs":1' + b"0" * 40 + b"}", "runs: expected an integer 1..100, got \"100000000000... (41 digits)\""),
    (b'{"request_id":"a","min_secs":1e999}', "min_secs: expected a number 0..60, got Infinity"),
    (b'{"request_id":"a","min_secs":NaN}', "min_secs: expected a number 0..60, got NaN"),
    (b'{"request_id":"a","pipeline":1}', "pipeline: expected true or false, got 1"),
    (b'{"request_id":"a","frame_size":"8x8"}', "frame_size: expected WxH with sides 16..8192"),
    (b'{"request_id":"a","model":"../../etc/passwd"}', "model: expected a model name"),
    (b'{"request_id":"a","model":"/abs/model.tflite"}', "model: expected a model name"),
    (b'{"request_id":"a","input":"camera"}', "input: expected one of 'random', 'pattern'"),
    (b'{"request_id":"a","runz":5}', 'unknown field(s) "runz"'),
    (b'{"request_id":"a","runs":2,"runs":3}', 'duplicate key "runs"'),
    (b'{"request_id":"a","threads":{"n":1}}', "threads: expected an integer 1..64"),
])
def test_schema_refusals_name_the_field(payload, reason):
    doc = decode_json(payload)
    assert commands.request_id_of(doc) == "a"  # these are answered on benchmark/a
    with pytest.raises(RequestError) as err:
        validate(doc, SCHEMA)
    assert reason in str(err.value)


@pytest.mark.parametrize("payload, reason", [
    (b"", "empty payload"),
    (b"\xff\xfe{}", "not UTF-8"),
    (b"{not json", "not JSON"),
    (b"[" * 5000 + b"]" * 5000, "payload too large"),
    (b"[" * 3000 + b"]" * 3000, "nested too deeply"),
])
def test_payload_refusals(payload, reason):
    with pytest.raises(RequestError, match=reason):
        decode_json(payload, max_bytes=8192)


def test_request_ids_and_defaults():
    for doc in ([], {"runs": 1}, {"request_id": ""}, {"request_id": "a/b"}, {"request_id": "_invalid"},
                {"request_id": 7}, {"request_id": "x" * 65}, {"request_id": "#"}):
        assert commands.request_id_of(doc) is None
    assert commands.request_id_of(decode_json(b'{"request_id":"a","request_id":"b"}')) is None
    params = validate({"request_id": "r-1.x:2"}, SCHEMA)
    assert params["runs"] == 50 and params["model"] is None and params["pause"] is False
    assert validate({"request_id": "r", "frame_size": "1280x720"}, SCHEMA)["frame_size"] == (1280, 720)


# -- the channel on a real broker (one final answer, duplicates, response topic) --------------------

@pytest.mark.broker
def test_channel_one_final_answer_duplicates_and_response_topic(mosquitto):
    broker = mosquitto()
    comms = MqttComms(MqttConfig(host="127.0.0.1", port=broker.port, response_topic_prefixes=("replies",)),
                      "unit")
    comms.start()
    rec = Recorder("127.0.0.1", broker.port, "#")
    try:
        assert comms.wait_connected(10)
        channel = CommandChannel(lambda: comms, "benchmark", SCHEMA)
        topic = f"{PREFIX}/unit/cmd/benchmark"
        req = channel.receive(topic, b'{"request_id":"r1","runs":3}',
                              {"response_topic": "replies/r1", "correlation_data": b"\x00c1"})
        assert req is not None and req.params["runs"] == 3 and not req.fleet
        assert req.accept() and req.progress(done=1) and req.done(result={"x": 1})
        assert not req.fail("late") and not req.done() and req.final_status == "done"  # one final only
        # retransmission (same id): never a second Request nor a second answer on the id topic
        assert channel.receive(topic, b'{"request_id":"r1","runs":3}', {}) is None
        # the same id from another requester (other response topic) is told so on ITS topic only
        assert channel.receive(topic, b'{"request_id":"r1"}', {"response_topic": "replies/other",
                                                               "correlation_data": b"o"}) is None
        assert channel.receive(f"{PREFIX}/all/cmd/benchmark", b'{"request_id":"r2","runs":0}', {}) is None
        assert channel.receive(topic, b"\xff", {"response_topic": "a/+/wildcard"}) is None
        fleet_req = channel.receive(f"{PREFIX}/all/cmd/benchmark", b'{"request_id":"r3"}', {})
        assert fleet_req.fleet
        assert channel.outbox.flush(10)  # the broker acknowledged every answer ...
        comms.publish("stats", {"barrier": True}, qos=1)  # ... so the recorder gets them before this
        rec.wait_for(f"{PREFIX}/unit/stats", timeout=10)
        on_id = [json.loads(m.payload) for m in rec.matching(f"{PREFIX}/unit/benchmark/r1")]
        assert [d["status"] for d in on_id] == ["accepted", "progress", "done"]
        assert [d["final"] for d in on_id] == [False, False, True] and on_id[-1]["result"] == {"x": 1}
        assert all(d["device_id"] == "unit" and d["request_id"] == "r1" for d in on_id)
        replies = rec.matching("replies/r1")
        assert [json.loads(m.payload)["status"] for m in replies] == ["accepted", "progress", "done"]
        assert all(m.properties.CorrelationData == b"\x00c1" for m in replies)
        other = rec.matching("replies/other")
        assert len(other) == 1 and json.loads(other[0].payload)["reason"] == "duplicate request id"
        assert other[0].properties.CorrelationData == b"o"
        r2 = [json.loads(m.payload) for m in rec.matching(f"{PREFIX}/unit/benchmark/r2")]
        assert len(r2) == 1 and r2[0]["status"] == "rejected" and r2[0]["reason"].startswith("runs:")
        invalid = [json.loads(m.payload) for m in rec.matching(f"{PREFIX}/unit/benchmark/_invalid")]
        assert len(invalid) == 1 and invalid[0]["request_id"] is None and "UTF-8" in invalid[0]["reason"]
        assert channel.stats()["duplicates"] == 2 and channel.stats()["rejected"] == 2
    finally:
        rec.close()
        comms.stop()


@pytest.mark.broker
def test_channels_answering_on_one_topic_share_their_id_memory(mosquitto):
    """deploy and rollback both answer on deploy/<id>: one id must not run twice across them."""
    broker = mosquitto()
    comms = MqttComms(MqttConfig(host="127.0.0.1", port=broker.port), "unit")
    comms.start()
    try:
        assert comms.wait_connected(10)
        first = CommandChannel(lambda: comms, "deploy", SCHEMA)
        second = CommandChannel(lambda: comms, "deploy", SCHEMA, share_ids_with=first)
        alone = CommandChannel(lambda: comms, "deploy", SCHEMA)
        assert first.receive(f"{PREFIX}/unit/cmd/deploy", b'{"request_id":"same"}', {}) is not None
        assert second.receive(f"{PREFIX}/unit/cmd/rollback", b'{"request_id":"same"}', {}) is None
        assert alone.receive(f"{PREFIX}/unit/cmd/rollback", b'{"request_id":"same"}', {}) is not None
        with pytest.raises(ValueError):
            CommandChannel(lambda: comms, "models", SCHEMA, share_ids_with=first)
    finally:
        comms.stop()


# -- helpers for agent processes ------------------------------------------------------------------

def start_agents(tmp_path: Path, port: int, devices: List[str], **sections: Any):
    procs = {}
    for dev in devices:
        (tmp_path / dev).mkdir()
        config = write_config(tmp_path / dev / "agent.toml", dev, port,
                              {"kind": "synthetic", "fps": 2.0, "width": 320, "height": 240},
                              publish={"stats_interval_s": 60.0, "timings_interval_s": 60.0}, **sections)
        procs[dev] = start_agent(config)
    return procs


def wait_masks(rec: Recorder, devices: List[str], count: int = 1, timeout: float = 40.0) -> None:
    """A mask means: model loaded, command handlers installed and subscribed, pipeline running."""
    for dev in devices:
        rec.wait_for(f"{PREFIX}/{dev}/mask", count=count, timeout=timeout)


def stop_all(procs: Dict[str, Any]) -> Dict[str, str]:
    return {dev: stop_agent(p) for dev, p in procs.items()}


def same_shape(a: Any, b: Any, path: str = "") -> None:
    """Same keys at every level of nested dicts (None stands for any value: e.g. stages off)."""
    if a is None or b is None:
        return
    if isinstance(a, dict) or isinstance(b, dict):
        assert isinstance(a, dict) and isinstance(b, dict), path
        assert set(a) == set(b), f"{path}: {sorted(set(a) ^ set(b))}"
        for key in a:
            same_shape(a[key], b[key], f"{path}.{key}")
    elif isinstance(a, (int, float)) and not isinstance(a, bool):
        assert isinstance(b, (int, float)) and not isinstance(b, bool), path
    else:
        assert type(a) is type(b), f"{path}: {type(a).__name__} vs {type(b).__name__}"


def run_remote_cli(argv: List[str]) -> int:
    args = build_parser().parse_args(["remote", "bench", *argv])
    return args.func(args)


def parse_table(text: str) -> Dict[str, Dict[str, str]]:
    lines = [line for line in text.splitlines() if line.strip()]
    header_at = next(i for i, line in enumerate(lines) if line.startswith("device"))
    header = re.split(r"\s{2,}", lines[header_at].strip())
    rows = {}
    for line in lines[header_at + 1:]:
        cells = re.split(r"\s{2,}", line.strip())
        rows[cells[0]] = dict(zip(header, cells))
    return rows


# -- acceptance: three agents, one fleet command ----------------------------------------------------

@pytest.mark.broker
def test_fleet_command_three_agents_table_csv_json_agree(mosquitto, tmp_path, capsys):
    broker = mosquitto()
    devices = ["pi-1", "pi-2", "pi-3"]
    rec = Recorder("127.0.0.1", broker.port, f"{PREFIX}/#")
    procs = start_agents(tmp_path, broker.port, devices)
    try:
        wait_masks(rec, devices)
        files = {k: tmp_path / f"bench.{k}" for k in ("json", "csv", "png")}
        plot = ["--plot", str(files["png"])] if HAVE_MATPLOTLIB else []
        rc = run_remote_cli(["--all", "--runs", "3", "--warmup", "1", "--host", "127.0.0.1",
                             "--port", str(broker.port), "--timeout", "120", "--progress", "text",
                             "--json", str(files["json"]), "--csv", str(files["csv"]), *plot])
        out, err = capsys.readouterr()
        masks_after = len(rec.matching(f"{PREFIX}/pi-1/mask"))
        rec.wait_for(f"{PREFIX}/pi-1/mask", count=masks_after + 1, timeout=20)  # live pipeline untouched
    finally:
        outputs = stop_all(procs)
        rec.close()
    assert rc == 0, (out, err, outputs)
    assert all("Traceback" not in o for o in outputs.values()), outputs
    report = json.loads(files["json"].read_text())
    assert set(report["devices"]) == set(devices)
    local = run_benchmark(Segmenter(str(DM05), labels=str(LABELS)), BenchSettings(runs=1, warmup=0))
    for dev, entry in report["devices"].items():
        result = entry["result"]
        assert entry["status"] == "done" and result["device_id"] == dev and result["invoke"]["count"] == 3
        assert result["live_pipeline"] == {"running": True, "paused": False, "fps": result["live_pipeline"]["fps"]}
        assert result["model"]["sha256"] == local["model"]["sha256"] and len(result["samples_ms"]) == 3
        same_shape(result, local)  # remote and local results: one shape
    table = parse_table(out)
    rows = {r["device"]: r for r in csv.DictReader(files["csv"].open())}
    assert set(table) == set(rows) == set(devices)
    for dev in devices:
        result = report["devices"][dev]["result"]
        inv = result["invoke"]
        t, c = table[dev], rows[dev]
        assert t["status"] == c["status"] == "done"
        assert t["model"] == c["model"] == result["model"]["name"]
        assert t["runtime"] == c["runtime"] == f"{result['runtime']} {result['runtime_version']}"
        assert t["delegate"] == c["delegate"] == (result["delegate"] or "cpu")
        assert int(t["threads"]) == int(c["threads"]) == result["threads"]
        assert int(t["runs"]) == int(c["runs"]) == inv["count"]
        for key in ("p50", "p90", "p99"):
            assert t[f"{key} ms"] == f"{inv[key]:.2f}"
            assert float(c[f"{key}_ms"]) == pytest.approx(inv[key], abs=1e-4)
        assert t["fps"] == f"{result['fps']:.2f}" and float(c["fps"]) == pytest.approx(result["fps"], abs=1e-4)
    for dev in devices:
        assert f"{dev}: accepted" in err and f"{dev}: done" in err and f"{dev}: runs 3/3" in err
    if HAVE_MATPLOTLIB:
        png = cv2.imread(str(files["png"]))
        assert png is not None and png.shape[0] > 100 and png.shape[1] > 100


def test_plot_without_matplotlib_fails_before_sending(monkeypatch, tmp_path):
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed
    with pytest.raises(fleet_bench.EdgeAgentError, match="--plot needs matplotlib.*pip install"):
        run_remote_cli(["--all", "--port", "1", "--plot", str(tmp_path / "p.png")])  # no broker contacted
    assert not (tmp_path / "p.png").exists()


# -- concurrency, duplicates, MQTT 5, pause, named models, a device killed mid-benchmark -----------

def mqtt5_props(response_topic: str, correlation: bytes) -> Properties:
    props = Properties(PacketTypes.PUBLISH)
    props.ResponseTopic = response_topic
    props.CorrelationData = correlation
    return props


def answers(rec: Recorder, dev: str, rid: str) -> List[Dict[str, Any]]:
    return [json.loads(m.payload) for m in rec.matching(f"{PREFIX}/{dev}/benchmark/{rid}")]


def finals(rec: Recorder, dev: str, rid: str) -> List[Dict[str, Any]]:
    return [d for d in answers(rec, dev, rid) if d["final"]]


def wait_final(rec: Recorder, dev: str, rid: str, timeout: float = 60.0) -> Dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done = finals(rec, dev, rid)
        if done:
            return done[0]
        time.sleep(0.05)
    raise AssertionError(f"no final answer for {rid} on {dev}: {answers(rec, dev, rid)}")


@pytest.mark.broker
def test_queue_busy_duplicates_mqtt5_pause_models_and_offline(mosquitto, tmp_path):
    broker = mosquitto()
    rec = Recorder("127.0.0.1", broker.port, "#")
    procs = start_agents(tmp_path, broker.port, ["pi-k"])
    # pi-q's model store (its state dir, as write_config sets it) holds dm05 under another name
    ModelStore.open(str(tmp_path / "pi-q" / "state")).adopt(str(DM05), {"name": "dm05-stored"})
    config = write_config(tmp_path / "pi-q" / "agent.toml", "pi-q", broker.port,
                          {"kind": "synthetic", "fps": 2.0, "width": 320, "height": 240},
                          mqtt={"response_topic_prefixes": ["replies"]})
    procs["pi-q"] = start_agent(config)
    cmd = f"{PREFIX}/pi-q/cmd/benchmark"
    try:
        wait_masks(rec, ["pi-q", "pi-k"])
        # 1. one long request, four queued behind it, two refused as busy (max_concurrent 1, queue 4)
        rec.publish(cmd, json.dumps({"request_id": "long", "runs": 1, "warmup": 0, "min_secs": 1.5}).encode())
        for i in range(1, 7):
            rec.publish(cmd, json.dumps({"request_id": f"q{i}", "runs": 1, "warmup": 0}).encode())
        # duplicates while queued/running: a retransmission, and a second requester with its own topic
        rec.publish(cmd, json.dumps({"request_id": "q1", "runs": 1, "warmup": 0}).encode())
        rec.publish(cmd, b'{"request_id":"long"}', properties=mqtt5_props("replies/dup", b"d"))
        rec.publish(cmd, b"{not json")
        for rid in ("long", "q1", "q2", "q3", "q4", "q5", "q6"):
            wait_final(rec, "pi-q", rid)
        # a barrier for any (wrong) extra answer: commands are handled and answered in arrival order
        rec.publish(cmd, b'{"request_id":"barrier","runs":0}')
        assert wait_final(rec, "pi-q", "barrier")["status"] == "rejected"
        positions = {rid: answers(rec, "pi-q", rid)[0] for rid in ("long", "q1", "q2", "q3", "q4")}
        assert [positions[r]["queue_position"] for r in ("long", "q1", "q2", "q3", "q4")] == [0, 1, 2, 3, 4]
        for rid in ("long", "q1", "q2", "q3", "q4", "q5", "q6"):
            assert len(finals(rec, "pi-q", rid)) == 1, answers(rec, "pi-q", rid)  # exactly one final each
        assert all(finals(rec, "pi-q", r)[0]["status"] == "done" for r in ("long", "q1", "q2", "q3", "q4"))
        for rid in ("q5", "q6"):
            only = answers(rec, "pi-q", rid)
            assert len(only) == 1 and only[0]["status"] == "rejected" and only[0]["reason"].startswith("busy")
        long_result = finals(rec, "pi-q", "long")[0]["result"]
        assert long_result["duration_s"] >= 1.5 and long_result["stopped"] in ("min_secs", "runs")  # runs: slow runtime
        dup = rec.matching("replies/dup")
        assert len(dup) == 1 and json.loads(dup[0].payload)["reason"] == "duplicate request id"
        invalid = [json.loads(m.payload) for m in rec.matching(f"{PREFIX}/pi-q/benchmark/_invalid")]
        assert len(invalid) == 1 and invalid[0]["reason"].startswith("not JSON")

        # 2. MQTT 5 request/response, pipeline stages, pause of the live pipeline, threads override
        masks_before = len(rec.matching(f"{PREFIX}/pi-q/mask"))
        request = {"request_id": "m5", "runs": 2, "warmup": 0, "pipeline": True, "frame_size": "320x240",
                   "pause": True, "threads": 1}
        rec.publish(cmd, json.dumps(request).encode(), properties=mqtt5_props("replies/m5", b"\x00\xffcorr"))
        m5 = wait_final(rec, "pi-q", "m5")
        replies = rec.wait_for("replies/m5", count=len(answers(rec, "pi-q", "m5")), timeout=10)
        assert [json.loads(m.payload)["status"] for m in replies] == [d["status"] for d in answers(rec, "pi-q", "m5")]
        assert all(m.properties.CorrelationData == b"\x00\xffcorr" for m in replies)
        result = m5["result"]
        assert m5["status"] == "done" and result["live_pipeline"]["paused"] is True and result["threads"] == 1
        assert result["settings"]["frame_size"] == [320, 240] and result["stages"]["end_to_end"]["count"] == 2
        local = run_benchmark(Segmenter(str(DM05)), BenchSettings(runs=1, warmup=0, pipeline=True))
        same_shape(result, local)
        rec.wait_for(f"{PREFIX}/pi-q/mask", count=masks_before + 2, timeout=20)  # resumed after the benchmark

        # 3. named models: from the device's store, unknown ones refused at once
        rec.publish(cmd, b'{"request_id":"stored","runs":1,"warmup":0,"model":"dm05-stored"}')
        rec.publish(cmd, b'{"request_id":"nope","model":"no-such-model"}')
        stored = wait_final(rec, "pi-q", "stored")
        assert stored["status"] == "done" and stored["result"]["model"]["sha256"] == local["model"]["sha256"]
        nope = answers(rec, "pi-q", "nope")
        assert len(nope) == 1 and nope[0]["status"] == "rejected" and "unknown model 'no-such-model'" in nope[0]["reason"]

        # 4. a device killed (SIGKILL) mid-benchmark: the client reports it offline, no hang
        mqtt = MqttConfig(host="127.0.0.1", port=broker.port)
        with FleetClient(mqtt) as client:
            assert set(client.discover()) >= {"pi-q", "pi-k"} and set(client.online()) == {"pi-q", "pi-k"}
            running = threading.Event()
            box: Dict[str, Any] = {}

            def seen(dev: str, doc: Dict[str, Any]) -> None:
                if doc.get("phase") == "runs":
                    running.set()

            def ask() -> None:
                box["answers"] = client.request("benchmark", {"runs": 1000, "warmup": 0}, devices=["pi-k"],
                                                timeout=120, on_message=seen)

            asker = threading.Thread(target=ask)
            started = time.monotonic()
            asker.start()
            assert running.wait(60)
            procs["pi-k"].kill()
            asker.join(60)
            assert not asker.is_alive()
            answer = box["answers"]["pi-k"]
            assert answer.status == "offline" and answer.reason == "device went offline after accepting the request"
            assert answer.accepted is not None and answer.last_progress is not None
            assert time.monotonic() - started < 110  # reported, not waited out to the 120 s timeout
            # afterwards: the retained offline answers at once; a fleet request expects only pi-q
            again = client.request("benchmark", {"runs": 1}, devices=["pi-k"], timeout=30)
            assert again["pi-k"].status == "offline" and "retained" in again["pi-k"].reason
            ghost = client.request("benchmark", {"runs": 1}, devices=["ghost"], timeout=1.0)
            assert ghost["ghost"].status == "timeout" and ghost["ghost"].reason == "no answer within 1 s"
            fleet = client.request("benchmark", {"runs": 1, "warmup": 0}, fleet=True, timeout=60)
            assert list(fleet) == ["pi-q"] and fleet["pi-q"].status == "done"
            assert fleet["pi-q"].final["result"]["device_id"] == "pi-q"
        assert procs["pi-q"].poll() is None
    finally:
        outputs = stop_all(procs)
        rec.close()
    assert "Traceback" not in outputs["pi-q"], outputs["pi-q"]


def test_asyncapi_documents_every_request_and_result_field():
    yaml = pytest.importorskip("yaml")
    doc = yaml.safe_load((Path(__file__).resolve().parents[1] / "docs" / "asyncapi.yaml").read_text())
    messages = doc["components"]["messages"]
    request = messages["benchmarkRequest"]["payload"]["properties"]
    assert set(request) == {"request_id", *SCHEMA}
    assert request["request_id"]["pattern"] == f"^{commands.REQUEST_ID_PATTERN}$"
    answer = messages["benchmarkResult"]["payload"]["properties"]
    assert set(answer["status"]["enum"]) == set(commands.STATUSES)
    assert set(answer["result"]["properties"]) == RESULT_KEYS


@pytest.mark.broker
def test_shutdown_answers_running_and_queued_requests(mosquitto, tmp_path):
    """An in-process agent: shutdown() (for the agent's stop path) leaves no request unanswered."""
    from edge_agent.daemon.agent import Agent
    from edge_agent.config import load_config

    broker = mosquitto()
    rec = Recorder("127.0.0.1", broker.port, f"{PREFIX}/#")
    cfg = load_config(None, [
        "agent.device_id=pi-s", f"agent.state_dir={tmp_path / 'state'}", "source.kind=synthetic",
        "source.fps=2", "source.width=160", "source.height=120", f"model.path={DM05}",
        "mqtt.host=127.0.0.1", f"mqtt.port={broker.port}",
    ], env={})
    agent = Agent(cfg, install_signals=False)
    runner = threading.Thread(target=agent.run, daemon=True)
    runner.start()
    try:
        rec.wait_for(f"{PREFIX}/pi-s/mask", timeout=30)
        cmd = f"{PREFIX}/pi-s/cmd/benchmark"
        rec.publish(cmd, b'{"request_id":"run","runs":1000,"warmup":0}')
        rec.publish(cmd, b'{"request_id":"queued","runs":1}')
        deadline = time.monotonic() + 30
        while not any(d.get("phase") == "runs" for d in answers(rec, "pi-s", "run")):
            assert time.monotonic() < deadline, answers(rec, "pi-s", "run")
            time.sleep(0.05)
        agent.handlers["benchmark"].shutdown("agent stopping", timeout=10)
        rec.publish(cmd, b'{"request_id":"late","runs":1}')
        run, queued, late = (wait_final(rec, "pi-s", r, timeout=10) for r in ("run", "queued", "late"))
        assert run["status"] == "failed" and run["reason"] == "cancelled: agent stopping"
        assert run["result"]["stopped"] == "cancelled" and run["result"]["invoke"]["count"] >= 1
        assert queued["status"] == "failed" and queued["reason"] == "cancelled: agent stopping"
        assert late["status"] == "rejected" and late["reason"] == "agent stopping: agent stopping"
        assert agent.handlers["benchmark"].stats()["running"] == 0
        rec.wait_for(f"{PREFIX}/pi-s/mask", count=len(rec.matching(f"{PREFIX}/pi-s/mask")) + 1, timeout=10)
    finally:
        agent.request_stop()
        runner.join(15)
        rec.close()


def test_table_csv_and_progress_for_failed_devices():
    import io

    from edge_agent.fleet.client import Answer

    result = {"model": {"name": "m"}, "runtime": "litert", "runtime_version": "2.3.0", "delegate": None,
              "threads": 2, "fps": 20.0, "invoke": {"count": 3, "p50": 49.994, "p90": 50.5, "p99": 51.0, "mean": 50.0}}
    answers_ = {"a": Answer("a", "done", final={"result": result}),
                "b": Answer("b", "offline", "device went offline after accepting the request"),
                "c": Answer("c", "rejected", "runs: expected an integer 1..5, got 50", final={})}
    report = fleet_bench.report_doc("rid", {"runs": 3}, answers_)
    assert report["devices"]["b"] == {"status": "offline", "reason": answers_["b"].reason, "result": None}
    rows = fleet_bench.summary_rows(report)
    table = format_table(rows, fleet_bench.TABLE_COLUMNS)
    parsed = parse_table(table)
    assert parsed["a"]["p50 ms"] == "49.99" and parsed["a"]["delegate"] == "cpu" and parsed["a"]["fps"] == "20.00"
    assert "(device went offline after accepting the request)" in table.splitlines()[2]
    assert parsed["c"]["status"] == "rejected" and "(runs: expected an integer 1..5, got 50)" in table
    buf = io.StringIO()
    fleet_bench.write_csv(rows, buf)
    got = {r["device"]: r for r in csv.DictReader(io.StringIO(buf.getvalue()))}
    assert got["a"]["p50_ms"] == "49.994" and got["b"]["p50_ms"] == "" and got["b"]["reason"] == answers_["b"].reason
    text_out = io.StringIO()
    fleet_bench.Progress("text", 5, 1, text_out)("b", {"status": "failed", "reason": "boom"})
    assert text_out.getvalue() == "b: failed: boom\n"
    pytest.importorskip("tqdm")
    progress_out = io.StringIO()
    progress = fleet_bench.Progress("bar", runs=5, warmup=1, out=progress_out)
    progress("a", {"status": "accepted", "queue_position": 0})
    progress("a", {"status": "progress", "phase": "warmup", "done": 1, "total": 1})
    progress("a", {"status": "progress", "phase": "runs", "done": 5, "total": 5})
    assert (progress.bar.n, progress.bar.total) == (6, 6)
    progress.close()
