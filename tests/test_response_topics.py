"""MQTT 5 response topics are honoured only in the agent's reply namespace (issue 14 item 1).

A request names its own response topic, so an agent that published wherever it was told could be
made to write onto another device's topics, or be disconnected by the broker for publishing to a
``$`` topic (mosquitto; a flood of ``$SYS/x`` requests gave 71 reconnects and thousands of lost
final answers). Only ``<prefix>/<device>/<kind>/...`` and ``mqtt.response_topic_prefixes`` are
answered on; everything else gets its answers on the default topic only.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edge_agent.comms.commands import response_topic_refusal
from edge_agent.config import ConfigError, load_config
from tests.broker import Recorder
from tests.helpers import stop_agent, write_config

PREFIX = "edge-agent"
DEVICE = "rt-1"


def test_policy():
    own = f"{PREFIX}/{DEVICE}/models"
    allowed = ("ops/replies",)
    assert response_topic_refusal(f"{own}/mine/1", own, allowed) is None
    assert response_topic_refusal("ops/replies/x", own, allowed) is None
    for topic in ("$SYS/x", "$share/g/x", f"${own}/x"):
        assert "'$'" in response_topic_refusal(topic, own, allowed)
    for topic in (own, f"{own}x/1", f"{PREFIX}/other/models/1", f"{PREFIX}/{DEVICE}/mask",
                  f"{PREFIX}/{DEVICE}/deploy/1", "ops/repliesx/1", "ops/replies", "replies/1"):
        assert response_topic_refusal(topic, own, allowed) == "outside the agent's reply namespace", topic
    for topic in ("a/+/b", "a/#", "/a", "a/", "", "x" * 600, 7):
        assert response_topic_refusal(topic, own, allowed) is not None


def test_config_key_refuses_dollar_and_wildcards():
    cfg = load_config(None, ["mqtt.response_topic_prefixes=ops/replies, fleet"], env={})
    assert cfg.mqtt.response_topic_prefixes == ("ops/replies", "fleet")
    for bad in ("$SYS", "a/#", "a/+/b", "/lead", "trail/"):
        with pytest.raises(ConfigError, match="mqtt.response_topic_prefixes: expected list of MQTT topics"):
            load_config(None, [f"mqtt.response_topic_prefixes={bad}"], env={})


def props(topic: str, correlation: bytes) -> Properties:
    p = Properties(PacketTypes.PUBLISH)
    p.ResponseTopic = topic
    p.CorrelationData = correlation
    return p


@pytest.mark.broker
def test_flood_of_foreign_response_topics_through_the_real_agent(mosquitto, tmp_path: Path):
    """150 requests answering to ``$SYS/x`` and 60 to other devices' / non-answer topics, mixed with
    allowed ones, against mosquitto with ``max_queued_messages 0``: the agent stays connected
    (one connect, no reconnect), every request gets exactly one final answer on its default topic,
    nothing is published to a refused topic, allowed topics get theirs with correlation data."""
    broker = mosquitto(extra=["max_queued_messages 0"])
    rec = Recorder("127.0.0.1", broker.port, "#")  # '#' does not match '$' topics: ...
    sys_rec = Recorder("127.0.0.1", broker.port, "$SYS/x")  # ... watched on their own
    config = write_config(tmp_path / "agent.toml", DEVICE, broker.port,
                          {"kind": "synthetic", "fps": 5.0, "width": 160, "height": 120},
                          mqtt={"response_topic_prefixes": ["ops/replies"]},
                          publish={"stats_interval_s": 1.0})
    log_path = tmp_path / "agent.log"
    with log_path.open("wb") as log:  # a file, not a pipe nobody reads during the flood
        agent = subprocess.Popen([sys.executable, "-m", "edge_agent", "run", "--config", str(config)],
                                 stdout=log, stderr=subprocess.STDOUT)
    own = f"{PREFIX}/{DEVICE}/models"
    cmd = f"{PREFIX}/{DEVICE}/cmd/models"
    refused = {"$SYS/x": 150, f"{PREFIX}/other-dev/models/stolen": 20, f"{PREFIX}/{DEVICE}/mask": 20,
               f"{PREFIX}/{DEVICE}/deploy/x": 20}
    allowed = {"ops/replies/a": 5, f"{own}/mine/b": 5}
    try:
        rec.wait_for(f"{PREFIX}/{DEVICE}/mask", timeout=40)
        rids = []
        infos = []
        # the allowed ones spread through the flood (every 21st request)
        refused_q = [t for t, n in refused.items() for _ in range(n)]
        allowed_q = [t for t, n in allowed.items() for _ in range(n)]
        order = []
        while refused_q or allowed_q:
            order += [refused_q.pop() for _ in range(min(20, len(refused_q)))]
            order += [allowed_q.pop()] if allowed_q else []
        for i, topic in enumerate(order):
            rid = f"f{i}"
            rids.append((rid, topic))
            infos.append(rec.client.publish(cmd, json.dumps({"request_id": rid}).encode(), qos=1,
                                            properties=props(topic, f"c{i}".encode())))
        for info in infos:
            info.wait_for_publish(10)
        # exactly one final answer per request, on its default topic
        for rid, _ in rids:
            (answer,) = rec.wait_for(f"{own}/{rid}", timeout=30)
            doc = json.loads(answer.payload)
            assert doc["final"] and doc["status"] == "done" and doc["request_id"] == rid
        # the allowed response topics got their answer, with the correlation data echoed
        for rid, topic in rids:
            if topic in allowed:
                got = [m for m in rec.wait_for(topic, count=1, timeout=10)
                       if json.loads(m.payload)["request_id"] == rid]
                assert len(got) == 1 and got[0].properties.CorrelationData == f"c{rid[1:]}".encode()
        # a barrier: a stats message published after all answers were handed over
        stats_seen = len(rec.matching(f"{PREFIX}/{DEVICE}/stats"))
        stats = rec.wait_for(f"{PREFIX}/{DEVICE}/stats", count=stats_seen + 2, timeout=10)
        mqtt_stats = json.loads(stats[-1].payload)["mqtt"]
        assert mqtt_stats["connects"] == 1 and mqtt_stats["reconnects"] == 0, mqtt_stats
        assert mqtt_stats["connected"] is True and mqtt_stats["last_error"] is None, mqtt_stats
        # nothing was published to a refused topic
        assert sys_rec.messages == []
        assert rec.matching(f"{PREFIX}/other-dev/models/stolen") == []
        assert rec.matching(f"{PREFIX}/{DEVICE}/deploy/x") == []
        for m in rec.matching(f"{PREFIX}/{DEVICE}/mask"):
            assert m.payload.startswith(b"\x89PNG"), m.payload[:40]
        assert len(rec.matching(f"{PREFIX}/{DEVICE}/availability", b"online")) == 1
        assert agent.poll() is None
    finally:
        stop_agent(agent)
        rec.close()
        sys_rec.close()
    out = log_path.read_text(errors="replace")
    assert out.count("MQTT connected") == 1, out[-3000:]
    warnings = [line for line in out.splitlines() if " WARNING " in line and "response topic" in line]
    # one line a minute, naming the setting that would allow a topic; the rest at DEBUG
    assert len(warnings) == 1 and "mqtt.response_topic_prefixes" in warnings[0], warnings
    # each refusal with its reason (at DEBUG after the first: write_config's log level is debug)
    assert out.count("'$' topics are reserved for the broker") == refused["$SYS/x"]
    assert out.count("outside the agent's reply namespace") == sum(refused.values()) - refused["$SYS/x"]
