"""Discovery: retained state merged with the presence query (``cmd/presence``), against a real
mosquitto and a real agent process; the answer is the documented one (docs/asyncapi.yaml)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edge_agent.config import MqttConfig
from edge_agent.fleet.client import FleetClient
from tests.broker import Recorder
from tests.helpers import start_agent, stop_agent, wait_until, write_config

pytestmark = pytest.mark.broker
DOC = Path(__file__).resolve().parents[1] / "docs" / "asyncapi.yaml"


def test_presence_finds_a_device_whose_retained_state_is_gone(mosquitto, tmp_path):
    broker = mosquitto()
    config = write_config(tmp_path / "p.toml", "pres-1", broker.port,
                          {"kind": "synthetic", "width": 160, "height": 120, "fps": 1.0})
    agent = start_agent(config)
    rec = Recorder(broker.host, broker.port, "edge-agent/pres-1/#")
    cfg = MqttConfig(host="127.0.0.1", port=broker.port)
    try:
        rec.wait_for("edge-agent/pres-1/info", timeout=60)
        with FleetClient(cfg) as client:
            devices = client.discover(3.0)
            assert devices["pres-1"].via == ("retained", "presence") and devices["pres-1"].online
            assert devices["pres-1"].info["device_id"] == "pres-1"
            assert "retained availability/info: 1; presence query: 1 answered" in client.discovery
            # the host client reconnects and subscribes again after a broker restart, like the agent
            broker.restart()
            rec.wait_for("edge-agent/pres-1/availability", b"online", count=2, timeout=30)
            found = wait_until(lambda: client.discover(1.0).get("pres-1"), timeout=30,
                               what="the device found again after the restart")
            assert "presence" in found.via

        # a broker that lost (or never delivered) the retained state: only the query finds it
        for topic in ("edge-agent/pres-1/availability", "edge-agent/pres-1/info"):
            rec.publish(topic, b"", retain=True)
        with FleetClient(cfg) as client:
            assert client.discover(1.0, query=False) == {}
            assert "retained availability/info: 0" in client.discovery
            devices = client.discover(3.0)
            assert devices["pres-1"].via == ("presence",) and devices["pres-1"].online
            assert devices["pres-1"].info["model"]["name"]
            assert client.online() == ["pres-1"]

        # the answer as documented; a bad request is refused, a repeated id not answered twice
        yaml = pytest.importorskip("yaml")
        spec = yaml.safe_load(DOC.read_text())["components"]["messages"]["presence"]["payload"]
        rec.publish("edge-agent/all/cmd/presence", json.dumps({"request_id": "p-1"}).encode())
        rec.publish("edge-agent/pres-1/cmd/presence", json.dumps({"request_id": "p-1"}).encode())
        rec.publish("edge-agent/pres-1/cmd/presence", json.dumps({"request_id": "p-2", "runs": 3}).encode())
        (answer,) = rec.wait_for("edge-agent/pres-1/presence/p-1")
        doc = json.loads(answer.payload)
        assert set(spec["required"]) <= set(doc) <= set(spec["properties"]), doc.keys()
        assert doc["status"] == "done" and doc["online"] is True and doc["kind"] == "presence"
        rejected = json.loads(rec.wait_for("edge-agent/pres-1/presence/p-2")[0].payload)
        assert rejected["status"] == "rejected" and "runs" in rejected["reason"], rejected
        assert len(rec.matching("edge-agent/pres-1/presence/p-1")) == 1
    finally:
        rec.close()
        out = stop_agent(agent)
    assert "Traceback" not in out
