"""MqttComms against a real mosquitto (and amqtt, a real MQTT-3.1.1-only broker, for the fallback)."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any, Dict, List, Tuple

import paho.mqtt.client as paho
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edge_agent.comms.broker import AmqttBroker, EmbeddedBroker, amqtt_available
from edge_agent.comms import MqttComms, encode_payload, should_fall_back
from edge_agent.config import MqttConfig
from tests.broker import Recorder
from tests.helpers import wait_until

pytestmark = pytest.mark.broker

REPO = Path(__file__).resolve().parents[1]
DEV = "dev1"
AVAIL = f"edge-agent/{DEV}/availability"
INFO = f"edge-agent/{DEV}/info"


def mqtt_cfg(port: int, **kw: Any) -> MqttConfig:
    """Fast backoff so reconnect tests take a fraction of a second, not 30 s."""
    base: Dict[str, Any] = dict(host="127.0.0.1", port=port, reconnect_min_s=0.1, reconnect_max_s=0.5,
                                keepalive=10)
    base.update(kw)
    return MqttConfig(**base)


@pytest.fixture
def comms_factory():
    made: List[MqttComms] = []

    def make(cfg: MqttConfig, device_id: str = DEV, **kw: Any) -> MqttComms:
        comms = MqttComms(cfg, device_id, **kw)
        made.append(comms)
        return comms

    yield make
    for comms in made:
        comms.stop()


def publish_until(rec: Recorder, topic: str, payload: bytes, handled: threading.Event,
                  timeout: float = 10.0) -> None:
    """Publish ``payload`` until a handler set ``handled``. A subscription's SUBACK is not visible
    from outside, so this is how a test waits for it; it also proves that everything paho's network
    thread did before (e.g. finishing an on_publish) is over."""
    wait_until(lambda: handled.is_set() or rec.publish(topic, payload), timeout=timeout,
               what=f"a handler for {topic}", poll_s=0.1)


# ---------------------------------------------------------------- pure functions


def test_topics_and_qos_mapping():
    comms = MqttComms(mqtt_cfg(1, topic_prefix="site/a", qos_mask=1, qos_stats=2), "cam-7")
    assert comms.topic("mask") == "site/a/cam-7/mask"
    assert comms.fleet_topic("cmd/models") == "site/a/all/cmd/models"
    assert comms.default_qos("mask") == 1
    assert comms.default_qos("stats") == 2
    assert comms.default_qos("availability") == 1
    assert comms.default_qos("benchmark/42") == 0
    assert comms.client_id == "edge-agent-cam-7"
    for bad in ("a/#", "+", "/x", ""):
        with pytest.raises(ValueError):
            comms.topic(bad)
    with pytest.raises(ValueError):
        MqttComms(mqtt_cfg(1), "bad/id")


def test_encode_payload():
    assert encode_payload(b"\x00\x01") == b"\x00\x01"
    assert encode_payload("é") == "é".encode()
    assert json.loads(encode_payload({"a": [1, 2]})) == {"a": [1, 2]}
    assert encode_payload(None) == b""
    with pytest.raises(TypeError):
        encode_payload(3.5)  # type: ignore[arg-type]


def test_diagnose_names_the_setting():
    from edge_agent.comms.tls import diagnose
    cfg = MqttConfig(host="broker.lan", port=8883)
    cases = {
        "cannot connect to broker.lan:8883: [Errno 111] Connection refused": "mqtt.port right?",
        "cannot connect to broker.lan:8883: [Errno -2] Name or service not known": "mqtt.host 'broker.lan' does not resolve",
        "[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: Hostname mismatch, certificate is not valid for "
        "'broker.lan'": "set mqtt.tls_insecure = true",
        "[SSL: WRONG_VERSION_NUMBER] wrong version number": "set mqtt.tls = false",
        "failed to receive on socket: [SSL: TLSV13_ALERT_CERTIFICATE_REQUIRED] tlsv13 alert certificate required":
            "set mqtt.cert_file and mqtt.key_file",
    }
    for error, hint in cases.items():
        assert hint in (diagnose(error, cfg) or ""), error
    assert diagnose("something else entirely", cfg) is None


def test_fallback_decision():
    # 0x84 is MQTT 5 "Unsupported protocol version"; 0x01 the 3.1.1 refusal paho maps to it.
    assert should_fall_back("auto", paho.MQTTv5, 0x84)
    assert should_fall_back("auto", paho.MQTTv5, 0x01)
    assert not should_fall_back("5", paho.MQTTv5, 0x84)  # explicit 5: never silently downgrade
    assert not should_fall_back("auto", paho.MQTTv311, 0x84)  # already on 3.1.1
    assert not should_fall_back("auto", paho.MQTTv5, 0x87)  # not authorized is not a protocol issue
    # Brokers that just hang up on an MQTT 5 CONNECT (amqtt does when a Last Will is set):
    assert not should_fall_back("auto", paho.MQTTv5, closed_before_connack=1)
    assert should_fall_back("auto", paho.MQTTv5, closed_before_connack=2)
    assert not should_fall_back("5", paho.MQTTv5, closed_before_connack=5)


# ---------------------------------------------------------------- availability and info


def test_online_info_retained_and_clean_offline(mosquitto, comms_factory):
    broker = mosquitto()
    comms = comms_factory(mqtt_cfg(broker.port))
    comms.set_info({"model": "dm05", "threads": 2})  # before start: published on connect
    comms.start()
    assert comms.wait_connected(10)
    assert comms.protocol == "5"
    wait_until(lambda: comms.stats()["inflight"] == 0, what="online/info acknowledged (QoS 1)")
    late = Recorder(broker.host, broker.port, f"edge-agent/{DEV}/#")  # subscribes after: needs retained
    try:
        (avail,) = late.wait_for(AVAIL, b"online")
        assert avail.retain
        (info,) = late.wait_for(INFO)
        assert info.retain and json.loads(info.payload) == {"model": "dm05", "threads": 2}
        comms.set_info({"model": "dm10"})  # connected: published at once
        late.wait_for(INFO, b'{"model":"dm10"}')
        assert comms.publish("result", {"seq": 1})
        late.wait_for(f"edge-agent/{DEV}/result", b'{"seq":1}')
        comms.stop()
        late.wait_for(AVAIL, b"offline")
    finally:
        late.close()
    after = Recorder(broker.host, broker.port, AVAIL)
    try:
        assert after.wait_for(AVAIL, b"offline")[0].retain  # the retained state is now offline
    finally:
        after.close()
    stats = comms.stats()
    assert stats["connects"] == 1 and stats["reconnects"] == 0
    assert stats["published"] >= 4 and stats["bytes_published"] > 0


LWT_CHILD = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, sys.argv[2])
    from edge_agent.comms import MqttComms
    from edge_agent.config import MqttConfig
    comms = MqttComms(MqttConfig(host="127.0.0.1", port=int(sys.argv[1])), "killed")
    comms.start()
    assert comms.wait_connected(10)
    print("connected", flush=True)
    time.sleep(60)  # idle until the test SIGKILLs this child (not a wait in the test)
""")


def test_last_will_offline_when_process_is_sigkilled(mosquitto):
    broker = mosquitto()
    topic = "edge-agent/killed/availability"
    rec = Recorder(broker.host, broker.port, topic)
    child = subprocess.Popen([sys.executable, "-c", LWT_CHILD, str(broker.port), str(REPO)],
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "connected"
        rec.wait_for(topic, b"online")
        os.kill(child.pid, signal.SIGKILL)
        child.wait(10)
        rec.wait_for(topic, b"offline")
    finally:
        if child.poll() is None:
            child.kill()
        child.wait()
        rec.close()


# ---------------------------------------------------------------- broker down / restarted


def test_broker_down_at_start_then_started(mosquitto, comms_factory, caplog):
    caplog.set_level(logging.DEBUG, logger="edge_agent.comms.mqtt")
    broker = mosquitto(start=False)
    comms = comms_factory(mqtt_cfg(broker.port))
    comms.set_info({"v": 1})
    started = time.monotonic()
    comms.start()  # must not block nor raise with nobody listening
    assert time.monotonic() - started < 2.0, "start() blocked on an absent broker"
    # Publishing while down never blocks and is counted as dropped (no unbounded queue).
    results = [comms.publish("mask", b"png" * 100) for _ in range(500)]
    assert not any(results)
    assert comms.stats()["dropped"] == 500
    wait_until(lambda: "cannot connect" in (comms.stats()["last_error"] or ""), what="a failed attempt")
    wait_until(lambda: sum("cannot connect" in r.getMessage() for r in list(caplog.records)) >= 3,
               what="three failed attempts with backoff (the first logged as a warning, the rest at debug)")
    assert sum(r.levelno == logging.WARNING and "cannot connect" in r.getMessage()
               for r in list(caplog.records)) == 1  # said once, not at every retry
    assert not comms.connected
    broker.start()
    assert comms.wait_connected(10)
    rec = Recorder(broker.host, broker.port, f"edge-agent/{DEV}/+")
    try:
        rec.wait_for(AVAIL, b"online")
        rec.wait_for(INFO, b'{"v":1}')
    finally:
        rec.close()
    assert comms.stats()["connects"] == 1


def test_broker_restart_mid_run(mosquitto, comms_factory):
    broker = mosquitto()
    comms = comms_factory(mqtt_cfg(broker.port))
    comms.set_info({"v": 2})
    comms.start()
    assert comms.wait_connected(10)
    assert comms.publish("stats", {"fps": 1})
    broker.stop()  # no persistence: the retained online/info die with it
    wait_until(lambda: not comms.connected, what="disconnect")
    # while away: the disconnect itself, or (on a slow machine, where the broker is already
    # refusing) the failed reconnection attempt that overwrote it
    error = wait_until(lambda: comms.stats()["last_error"], what="last_error while disconnected")
    assert any(word in error for word in ("disconnected", "cannot connect", "before CONNACK"))
    dropped_before = comms.stats()["dropped"]
    assert not comms.publish("stats", {"fps": 2})
    assert comms.stats()["dropped"] == dropped_before + 1
    broker.start()  # same port
    wait_until(lambda: comms.stats()["reconnects"] == 1 and comms.connected, what="reconnect")
    wait_until(lambda: comms.stats()["inflight"] == 0, what="online/info acknowledged (QoS 1)")
    rec = Recorder(broker.host, broker.port, f"edge-agent/{DEV}/+")
    try:
        assert rec.wait_for(AVAIL, b"online")[0].retain  # re-published after the reconnect
        assert rec.wait_for(INFO, b'{"v":2}')[0].retain
        assert comms.publish("stats", {"fps": 3})
        rec.wait_for(f"edge-agent/{DEV}/stats", b'{"fps":3}')
    finally:
        rec.close()
    stats = comms.stats()
    # the outage is on record as a reconnect; last_error says why we are NOT connected: null now
    assert stats["connects"] == 2 and stats["reconnects"] == 1
    assert stats["connected"] and stats["last_error"] is None


def test_publish_drops_when_too_many_in_flight(mosquitto, comms_factory):
    """A frozen broker (SIGSTOP: TCP up, no PUBACKs) fills the in-flight window; the rest is dropped."""
    broker = mosquitto()
    comms = comms_factory(mqtt_cfg(broker.port, max_queued_messages=5, keepalive=60))
    probed = threading.Event()
    comms.add_command_handler("probe", lambda t, p, props: probed.set())
    comms.start()
    assert comms.wait_connected(10)
    wait_until(lambda: comms.stats()["inflight"] == 0, what="online acknowledged")
    # paho forgets an acknowledged message just after calling on_publish, in its network thread:
    # a command handled there afterwards proves it is forgotten (it would take an in-flight slot)
    rec = Recorder(broker.host, broker.port, "unused")
    try:
        publish_until(rec, f"edge-agent/{DEV}/cmd/probe", b"x", probed)
    finally:
        rec.close()
    assert broker.pid is not None
    os.kill(broker.pid, signal.SIGSTOP)
    try:
        results = [comms.publish("result", {"seq": i}, qos=1) for i in range(12)]
        assert results == [True] * 5 + [False] * 7
        assert comms.stats()["dropped"] == 7
    finally:
        os.kill(broker.pid, signal.SIGCONT)
    wait_until(lambda: comms.stats()["inflight"] == 0, what="PUBACKs after SIGCONT")
    assert comms.publish("result", {"seq": 99}, qos=1)


# ---------------------------------------------------------------- TLS and authentication


def test_tls_client_cert_and_password(mosquitto, comms_factory, tls_certs):
    broker = mosquitto(tls=tls_certs, users={"agent": "s3cret"}, require_certificate=True)
    cfg = mqtt_cfg(broker.port, tls=True, ca_file=str(tls_certs.ca), cert_file=str(tls_certs.client_cert),
                   key_file=str(tls_certs.client_key), username="agent", password="s3cret")
    comms = comms_factory(cfg)
    comms.start()
    assert comms.wait_connected(10), comms.stats()
    rec = Recorder(broker.host, broker.port, AVAIL, certs=tls_certs, auth=("agent", "s3cret"))
    try:
        rec.wait_for(AVAIL, b"online")
    finally:
        rec.close()


def test_tls_untrusted_server_is_refused_and_retried(mosquitto, comms_factory, tls_certs, tmp_path, caplog):
    from tests.broker import make_certs
    other_ca = make_certs(tmp_path / "other").ca  # a CA that did not sign the server certificate
    broker = mosquitto(tls=tls_certs)
    comms = comms_factory(mqtt_cfg(broker.port, tls=True, ca_file=str(other_ca)))
    with caplog.at_level(logging.WARNING, logger="edge_agent.comms.mqtt"):
        comms.start()
        assert not comms.wait_connected(1.0)
        # the refused handshake is recorded when it completes: wait for it (slow under load/qemu)
        deadline = time.monotonic() + 30
        while "CERTIFICATE_VERIFY_FAILED" not in (comms.stats()["last_error"] or ""):
            assert time.monotonic() < deadline, comms.stats()
            time.sleep(0.05)
        assert not comms.stats()["connected"]
    assert any("certificate verify failed" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("protocol", ["auto", "3.1.1"])
def test_wrong_password_logs_clear_error_and_retries(mosquitto, comms_factory, caplog, protocol):
    broker = mosquitto(users={"agent": "right"})
    comms = comms_factory(mqtt_cfg(broker.port, username="agent", password="wrong", protocol=protocol))
    with caplog.at_level(logging.ERROR, logger="edge_agent.comms.mqtt"):
        comms.start()
        wait_until(lambda: len([r for r in caplog.records if "refused" in r.getMessage()]) >= 2,
                   what="two refused attempts")
    refusals = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert all("authorized" in m.lower() and "mqtt.password" in m for m in refusals), refusals
    assert all("\n" not in m for m in refusals)
    assert not comms.connected
    assert comms.stats()["connects"] == 0
    assert "refused" in comms.stats()["last_error"]
    assert not comms.publish("result", b"x")  # dropped, not raised


# ---------------------------------------------------------------- commands


def test_command_handlers_device_and_fleet_and_exceptions(mosquitto, comms_factory):
    broker = mosquitto()
    comms = comms_factory(mqtt_cfg(broker.port))
    got: List[Tuple[str, bytes]] = []
    done = threading.Event()

    probed = threading.Event()

    def handler(topic: str, payload: bytes, props: Dict[str, Any]) -> None:
        if payload == b"probe":
            probed.set()
            return
        got.append((topic, payload))
        if payload == b"boom":
            raise RuntimeError("handler bug")
        if payload == b"last":
            done.set()

    rec = Recorder(broker.host, broker.port, "nothing/here")
    # A retained command is replayed at every (re)subscribe: it must be ignored, not re-run.
    rec.publish(f"edge-agent/{DEV}/cmd/ping", b"stale retained", retain=True)
    comms.add_command_handler("ping", handler)  # before start: subscribed on connect
    comms.start()
    assert comms.wait_connected(10)
    comms.add_command_handler("deploy", handler, subtree=True)  # while connected: subscribed now
    try:
        publish_until(rec, f"edge-agent/{DEV}/cmd/deploy/probe", b"probe", probed)  # "deploy" subscribed
        rec.publish(f"edge-agent/{DEV}/cmd/ping", b"boom")
        rec.publish("edge-agent/all/cmd/ping", b"fleet")
        rec.publish("edge-agent/other-device/cmd/ping", b"not for us")
        rec.publish(f"edge-agent/{DEV}/cmd/deploy/abc", b"sub")
        rec.publish(f"edge-agent/{DEV}/cmd/deploy", b"deploy itself")
        rec.publish(f"edge-agent/{DEV}/cmd/ping", b"last")
        assert done.wait(10), got
    finally:
        rec.close()
    assert got == [
        (f"edge-agent/{DEV}/cmd/ping", b"boom"),
        ("edge-agent/all/cmd/ping", b"fleet"),
        (f"edge-agent/{DEV}/cmd/deploy/abc", b"sub"),
        (f"edge-agent/{DEV}/cmd/deploy", b"deploy itself"),
        (f"edge-agent/{DEV}/cmd/ping", b"last"),
    ]
    assert comms.connected  # the exception did not kill the network thread


def test_handlers_resubscribed_after_broker_restart(mosquitto, comms_factory):
    broker = mosquitto()
    comms = comms_factory(mqtt_cfg(broker.port))
    got = threading.Event()
    comms.add_command_handler("models", lambda t, p, props: got.set())
    comms.start()
    assert comms.wait_connected(10)
    broker.restart()
    wait_until(lambda: comms.stats()["reconnects"] == 1, what="reconnect")
    rec = Recorder(broker.host, broker.port, "unused")
    try:
        publish_until(rec, "edge-agent/all/cmd/models", b"list", got)  # resubscribed: handled again
    finally:
        rec.close()


def test_mqtt5_response_topic_and_correlation_data(mosquitto, comms_factory):
    broker = mosquitto()
    comms = comms_factory(mqtt_cfg(broker.port))
    seen: List[Dict[str, Any]] = []

    def benchmark(topic: str, payload: bytes, props: Dict[str, Any]) -> None:
        seen.append(props)
        comms.reply(props["response_topic"], {"ok": True, "runs": int(payload)}, props["correlation_data"])

    comms.add_command_handler("benchmark", benchmark)
    comms.start()
    assert comms.wait_connected(10)
    rec = Recorder(broker.host, broker.port, "client/replies/#")
    try:
        props = Properties(PacketTypes.PUBLISH)
        props.ResponseTopic = "client/replies/1"
        props.CorrelationData = b"\x01req-42"
        rec.publish(f"edge-agent/{DEV}/cmd/benchmark", b"10", properties=props)
        (answer,) = rec.wait_for("client/replies/1")
    finally:
        rec.close()
    assert json.loads(answer.payload) == {"ok": True, "runs": 10}
    assert answer.properties.CorrelationData == b"\x01req-42"
    assert seen[0]["response_topic"] == "client/replies/1"


# ---------------------------------------------------------------- MQTT 5 -> 3.1.1 fallback


@pytest.mark.skipif(not amqtt_available(), reason="amqtt (an MQTT 3.1.1-only broker) is not installed")
def test_auto_falls_back_to_311_against_a_v311_only_broker(comms_factory, caplog):
    with AmqttBroker() as broker:
        # amqtt stays silent on an MQTT 5 CONNECT with a Last Will: the CONNACK timeout drives it.
        comms = comms_factory(mqtt_cfg(broker.port), connack_timeout_s=0.5)
        comms.set_info({"v": 3})
        with caplog.at_level(logging.WARNING, logger="edge_agent.comms.mqtt"):
            comms.start()
            assert comms.wait_connected(15), comms.stats()
        assert comms.protocol == "3.1.1"
        assert any("falling back to MQTT 3.1.1" in r.getMessage() for r in caplog.records)
        rec = Recorder(broker.host, broker.port, f"edge-agent/{DEV}/+", protocol=paho.MQTTv311)
        try:
            rec.wait_for(AVAIL, b"online")
            rec.wait_for(INFO, b'{"v":3}')
        finally:
            rec.close()
        comms.stop()


@pytest.mark.skipif(not amqtt_available(), reason="amqtt is not installed")
def test_explicit_mqtt5_does_not_fall_back(comms_factory, caplog):
    with AmqttBroker() as broker:
        comms = comms_factory(mqtt_cfg(broker.port, protocol="5"), connack_timeout_s=0.3)
        with caplog.at_level(logging.ERROR, logger="edge_agent.comms.mqtt"):
            comms.start()
            wait_until(lambda: len([r for r in caplog.records if "before CONNACK" in r.getMessage()]) >= 3,
                       what="three failed attempts")
        assert comms.protocol == "5" and not comms.connected
        comms.stop()


def test_embedded_broker_round_trip():
    with EmbeddedBroker() as broker:
        assert broker.kind in ("mosquitto", "amqtt")
        rec = Recorder(broker.host, broker.port, "demo/#", protocol=paho.MQTTv311)
        try:
            rec.publish("demo/x", b"hello")
            rec.wait_for("demo/x", b"hello")
        finally:
            rec.close()


# ---------------------------------------------------------------- the documented interface


def test_asyncapi_documents_every_topic_and_refs_resolve():
    yaml = pytest.importorskip("yaml")
    doc = yaml.safe_load((REPO / "docs" / "asyncapi.yaml").read_text())
    assert doc["asyncapi"].startswith("3.")

    def resolve(ref: str) -> Any:
        node = doc
        for part in ref.lstrip("#/").split("/"):
            node = node[part]
        return node

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if "$ref" in node:
                resolve(node["$ref"])  # KeyError = dangling reference
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(doc)
    addresses = {ch["address"] for ch in doc["channels"].values()}
    from edge_agent.comms.mqtt import _QOS_KEYS
    for suffix in _QOS_KEYS:
        assert f"{{prefix}}/{{deviceId}}/{suffix}" in addresses, suffix
    for cmd in ("benchmark", "deploy", "rollback", "models", "presence"):
        assert f"{{prefix}}/{{target}}/cmd/{cmd}" in addresses, cmd
