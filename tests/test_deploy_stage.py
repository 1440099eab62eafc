"""cmd/deploy with ``activate: false`` (stage only), cmd/benchmark of the staged model by sha256, and
cmd/models ``remove``: a real in-process agent, a real mosquitto (what ``edge-agent host sweep`` does)."""

from __future__ import annotations

import hashlib
import threading

import pytest

from edge_agent.config import load_config
from edge_agent.daemon.agent import Agent
from edge_agent.fleet import bench as fleet_bench
from edge_agent.fleet import deploy as host
from edge_agent.fleet.client import FleetClient
from edge_agent.models.store import ModelStore
from tests.broker import Recorder
from tests.data import DM05, DM10
from tests.helpers import write_config

SHA05 = hashlib.sha256(DM05.read_bytes()).hexdigest()
SHA10 = hashlib.sha256(DM10.read_bytes()).hexdigest()


@pytest.mark.broker
def test_stage_benchmark_and_remove_leave_the_store_and_the_running_model_as_they_were(mosquitto, tmp_path):
    broker = mosquitto()
    device = "stage-1"
    config = write_config(tmp_path / "agent.toml", device, broker.port,
                          {"kind": "synthetic", "width": 320, "height": 240, "fps": 4.0},
                          model={"path": str(DM10), "threads": 1}, publish={"stats_interval_s": 60.0})
    rec = Recorder("127.0.0.1", broker.port, f"edge-agent/{device}/#")
    agent = Agent(load_config(str(config), env={}), install_signals=False)
    thread = threading.Thread(target=agent.run, daemon=True)
    thread.start()
    client = None
    try:
        rec.wait_for(f"edge-agent/{device}/mask", count=1, timeout=30)
        client = FleetClient(load_config(str(config), env={}).mqtt).connect()
        client.discover(0.5)

        def listing(**params):
            answer = client.request("models", params, devices=[device], timeout=10)[device]
            return answer

        before = listing().final
        assert before["models"] == [] and before["running"] == SHA10

        data = DM05.read_bytes()
        doc = host.deploy_params(data, "dm05-candidate", chunk_size=300_000, activate=False)
        stages = []
        answer = host.deploy(client, doc, data, devices=[device], timeout=60,
                             on_message=lambda dev, d: stages.append(d.get("stage")))[device]
        assert answer.status == "done", answer
        assert answer.final["state"] == "staged" and answer.final["running"] == SHA10
        assert "activating" not in stages and "checking" in stages
        staged = listing().final
        assert [(m["sha256"], m["role"], m["name"]) for m in staged["models"]] == [(SHA05, None, "dm05-candidate")]
        assert staged["current"] is None and agent.segmenter.model.file.sha256 == SHA10

        # the staged model is benchmarked by sha256 while the live pipeline stays on dm1.0
        report = fleet_bench.run(client, fleet_bench.command_params(3, warmup=1, model=SHA05),
                                 devices=[device], timeout=120)
        entry = report["devices"][device]
        assert entry["status"] == "done", entry
        assert entry["result"]["model"]["sha256"] == SHA05 and entry["result"]["invoke"]["p50"] > 0

        # removal: refused for what runs or is unknown, done for the staged entry
        refused = listing(remove=SHA10)
        assert refused.status == "rejected" and "no model" in refused.reason
        assert listing(remove="0" * 64).status == "rejected"
        removed = listing(remove=SHA05)
        assert removed.status == "done" and removed.final["removed"] == SHA05
        after = listing().final
        assert after["models"] == before["models"] and after["current"] == before["current"]
        assert not [p for p in ModelStore(tmp_path / "state" / "models").root.iterdir()
                    if p.suffix in (".tflite", ".json")]
        assert agent.segmenter.model.file.sha256 == SHA10

        # a current entry is never removed: activate dm0.5, then try
        doc = host.deploy_params(data, "dm05", chunk_size=300_000)
        assert host.deploy(client, doc, data, devices=[device], timeout=60)[device].final["state"] == "active"
        refused = listing(remove=SHA05)
        assert refused.status == "rejected" and "current" in refused.reason
    finally:
        if client is not None:
            client.close()
        agent.request_stop()
        thread.join(20)
        rec.close()
