"""Store-and-forward (edge_agent/comms/outbox.py): the SQLite queue, its budgets and its replay
through a real mosquitto stopped and restarted by the test; the agent end to end, SIGKILLed
during an outage (tests/test_outbox.py::test_agent_*)."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path
from typing import Dict, List, Tuple

import cv2
import numpy as np
import pytest

from edge_agent.comms.outbox import MASKS, RESULTS, Outbox, is_replayed, mark_replayed
from edge_agent.config import MqttConfig
from edge_agent.output.encode import decode_mask_png, encode_mask_png, frame_label, read_frame_label
from tests.broker import Recorder
from tests.helpers import stop_agent, wait_until, write_config

PREFIX = "edge-agent"


def result(seq: int, pad: int = 0) -> bytes:
    """A result-like JSON of the same size for every seq < 10**6 (budgets count bytes)."""
    return json.dumps({"seq": seq, "capture_ts": 1000.0 + seq, "pad": "x" * (pad + 6 - len(str(seq)))},
                      separators=(",", ":")).encode()


# -- the queue ---------------------------------------------------------------------------------

def test_put_oldest_delete_and_reopen(tmp_path):
    path = tmp_path / "outbox.sqlite3"
    box = Outbox(path, 10_000, 10_000)
    for seq in (3, 1, 2):  # stored out of order: delivered by time
        assert box.put("t/result", result(seq), 1, 1000.0 + seq) is not None
    mask = encode_mask_png(np.zeros((4, 4), np.uint8))
    box.put("t/mask", mask, 0, 1001.5, MASKS)
    assert [json.loads(r.payload)["seq"] if r.bucket == RESULTS else "mask" for r in box.oldest(10)] == [1, "mask", 2, 3]
    first = box.oldest(1)[0]
    assert [r.id for r in box.oldest(10, exclude=[first.id])][0] != first.id
    stats = box.stats(now=1010.0)
    assert (stats["messages"], stats["masks"], stats["oldest_s"]) == (4, 1, 9.0)
    assert stats["bytes"] == sum(len(result(s)) for s in (1, 2, 3)) + len(mask)
    assert box.delete([first.id, 999999]) == 1
    box.close()
    again = Outbox(path, 10_000, 10_000)  # what a restarted agent finds
    assert again.recovered == 3 and len(again) == 3
    assert [r.topic for r in again.oldest(10)] == ["t/mask", "t/result", "t/result"]
    again.close()


def test_budget_drops_the_oldest_first_and_counts_them(tmp_path):
    size = len(result(0))
    box = Outbox(tmp_path / "o.sqlite3", 5 * size, 0)  # five results fit; masks are not kept
    for seq in range(12):
        box.put("t/result", result(seq), 1, 1000.0 + seq)
    assert [json.loads(r.payload)["seq"] for r in box.oldest(100)] == [7, 8, 9, 10, 11]
    assert box.stats()["dropped"] == 7 and box.stats()["bytes"] == 5 * size
    assert box.put("t/mask", b"\x89PNG...", 0, 1.0, MASKS) is None  # budget 0: not kept, counted
    assert box.put("t/result", result(0, pad=6 * size), 1, 2000.0) is None  # alone beyond the budget
    assert box.stats()["dropped"] == 9 and len(box) == 5
    box.close()
    smaller = Outbox(tmp_path / "o.sqlite3", 2 * size, 0)  # a lower budget applies at the next start
    assert [json.loads(r.payload)["seq"] for r in smaller.oldest(100)] == [10, 11]
    smaller.close()


def test_masks_have_a_budget_of_their_own(tmp_path):
    png = encode_mask_png(np.zeros((64, 64), np.uint8))
    box = Outbox(tmp_path / "o.sqlite3", 10 * len(result(0)), 3 * len(png))
    for seq in range(10):
        box.put("t/mask", png, 0, 1000.0 + seq, MASKS)
        box.put("t/result", result(seq), 1, 1000.0 + seq)
    rows = box.oldest(100)
    assert sum(r.bucket == MASKS for r in rows) == 3 and sum(r.bucket == RESULTS for r in rows) == 10
    assert [r.ts for r in rows if r.bucket == MASKS] == [1007.0, 1008.0, 1009.0]
    box.close()


def test_a_file_that_is_not_a_database_is_moved_aside(tmp_path):
    path = tmp_path / "outbox.sqlite3"
    path.write_bytes(b"this is not sqlite" * 100)
    box = Outbox(path, 1000, 1000)
    assert len(box) == 0 and box.put("t/result", result(1), 1, 1.0) is not None
    assert list(tmp_path.glob("outbox.sqlite3.corrupt-*"))
    box.close()


def test_replayed_marks_survive_mqtt_311_and_keep_the_payload_readable():
    doc = json.loads(mark_replayed(result(7)))
    assert doc["replayed"] is True and doc["seq"] == 7 and doc["capture_ts"] == 1007.0
    assert is_replayed(mark_replayed(result(7))) and not is_replayed(result(7))
    mask = np.arange(48, dtype=np.uint8).reshape(6, 8) % 21
    png = encode_mask_png(mask, label=frame_label(42))
    marked = mark_replayed(png)
    assert is_replayed(marked) and not is_replayed(png)
    assert np.array_equal(decode_mask_png(marked), mask)
    as_is = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_UNCHANGED)  # libpng checks the CRCs
    assert np.array_equal(cv2.imdecode(np.frombuffer(marked, np.uint8), cv2.IMREAD_UNCHANGED), as_is)
    assert read_frame_label(marked) == {"seq": 42}
    assert mark_replayed(b"\xff\xd8jpeg") == b"\xff\xd8jpeg"


def test_a_put_that_returned_survives_sigkill(tmp_path):
    """Committed means durable: a writer killed with SIGKILL right after put() loses nothing."""
    path = tmp_path / "outbox.sqlite3"
    code = ("import sys, time\n"
            "from edge_agent.comms.outbox import Outbox\n"
            f"box = Outbox({str(path)!r}, 10**7, 10**7)\n"
            "for i in range(200):\n"
            "    box.put('t/result', b'{\"seq\":%d}' % i, 1, 1000.0 + i)\n"
            "    print(i, flush=True)\n"
            "time.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                            cwd=Path(__file__).resolve().parents[1])
    try:
        last = -1
        for line in proc.stdout:  # kill after the 150th put returned
            last = int(line)
            if last == 150:
                proc.send_signal(signal.SIGKILL)
                break
    finally:
        proc.kill()
        proc.wait()
    box = Outbox(path, 10**7, 10**7)
    seqs = [json.loads(r.payload)["seq"] for r in box.oldest(1000)]
    assert seqs[:151] == list(range(151))
    box.close()


# -- through a real broker -----------------------------------------------------------------------

def comms_with_outbox(port: int, device: str, path: Path, max_bytes: int = 10**7, mask_max_bytes: int = 10**7,
                      replay_max_hz: float = 200.0, **mqtt):
    from edge_agent.comms.mqtt import MqttComms

    cfg = MqttConfig(host="127.0.0.1", port=port, reconnect_min_s=0.05, reconnect_max_s=0.2, **mqtt)
    return MqttComms(cfg, device, outbox=Outbox(path, max_bytes, mask_max_bytes, replay_max_hz))


def payloads(rec: Recorder, topic: str) -> List[Tuple[dict, Dict[str, str]]]:
    out = []
    for m in rec.matching(topic):
        props = dict(getattr(m.properties, "UserProperty", []) or []) if m.properties is not None else {}
        out.append((json.loads(m.payload), props))
    return out


@pytest.mark.broker
def test_results_while_the_broker_is_down_are_delivered_in_order_after_it_returns(mosquitto, tmp_path):
    broker = mosquitto()
    rec = Recorder("127.0.0.1", broker.port, f"{PREFIX}/#")
    comms = comms_with_outbox(broker.port, "sf-1", tmp_path / "o.sqlite3")
    comms.start()
    base = f"{PREFIX}/sf-1"
    try:
        assert comms.wait_connected(10)
        assert comms.publish("result", result(0))
        rec.wait_for(f"{base}/result", count=1)
        rec.close()
        broker.stop()
        wait_until(lambda: not comms.connected, what="the agent to notice the broker is gone")
        png = encode_mask_png(np.zeros((8, 8), np.uint8), label=frame_label(1))
        for seq in range(1, 41):
            assert comms.publish("result", result(seq))  # kept: True
            if seq % 10 == 0:
                assert comms.publish("mask", png)
        assert comms.publish("stats", {"x": 1}) is False  # state is not history: dropped as before
        backlog = comms.outbox_stats()
        assert backlog["messages"] == 44 and backlog["masks"] == 4 and backlog["stored"] == 44
        assert comms.stats()["dropped"] == 1
        broker.start()
        rec = Recorder("127.0.0.1", broker.port, f"{PREFIX}/#")  # may miss the first replays: see below
        wait_until(lambda: comms.outbox_stats()["messages"] == 0, timeout=30, what="the outbox to drain")
        assert comms.outbox_stats()["replayed"] == 44
    finally:
        comms.stop()
    rec.close()
    # what the recorder got (it subscribed after the broker came back, so a prefix may be missing)
    got = payloads(rec, f"{base}/result")
    seqs = [doc["seq"] for doc, _ in got]
    assert seqs == sorted(seqs) and seqs and seqs[-1] == 40
    assert all(doc["replayed"] is True and props.get("replayed") == "true" for doc, props in got)
    assert all(doc["capture_ts"] == 1000.0 + doc["seq"] for doc, _ in got)  # the original capture time
    masks = rec.matching(f"{base}/mask")
    assert masks and all(is_replayed(bytes(m.payload)) for m in masks)


@pytest.mark.broker
def test_every_result_reaches_a_persistent_subscriber_and_live_ones_flow_during_the_replay(mosquitto, tmp_path):
    """A consumer with a persistent session (QoS 1, clean_session false) on a broker with
    persistence misses nothing: the 200 results of the outage arrive in order, marked, while
    live results published during the replay arrive before the replay ends."""
    import paho.mqtt.client as paho

    broker = mosquitto(extra=["persistence true", f"persistence_location {tmp_path}/",
                              "max_queued_messages 100000"])
    base = f"{PREFIX}/sf-2"
    got: List[Tuple[dict, Dict[str, str]]] = []
    cond = threading.Condition()

    def on_message(client, userdata, msg):
        props = dict(getattr(msg.properties, "UserProperty", []) or []) if msg.properties is not None else {}
        with cond:
            got.append((json.loads(msg.payload), props))
            cond.notify_all()

    sub = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="persistent-consumer", protocol=paho.MQTTv5)
    subscribed = threading.Event()
    sub.on_connect = lambda c, u, f, rc, p: c.subscribe(f"{base}/result", qos=1)
    sub.on_subscribe = lambda *a: subscribed.set()
    sub.on_message = on_message
    sub.reconnect_delay_set(0.05, 0.2)
    sub.connect_async("127.0.0.1", broker.port, 30, clean_start=False,
                      properties=_session_expiry())
    sub.loop_start()
    assert subscribed.wait(10)
    comms = comms_with_outbox(broker.port, "sf-2", tmp_path / "o.sqlite3", replay_max_hz=40.0)
    comms.start()
    try:
        assert comms.wait_connected(10)
        comms.publish("result", result(0))
        with cond:
            assert cond.wait_for(lambda: len(got) == 1, 10)
        broker.stop()
        wait_until(lambda: not comms.connected, what="the agent to notice the broker is gone")
        for seq in range(1, 201):
            assert comms.publish("result", result(seq))
        broker.start()
        assert comms.wait_connected(20)
        live = 1000
        while comms.outbox_stats()["messages"] and live < 1100:  # live results during the catch-up
            comms.publish("result", result(live))
            live += 1
            with cond:  # paced by its delivery: the next live result once this one arrived
                assert cond.wait_for(lambda: any(d["seq"] == live - 1 for d, _ in got), 10)
        wait_until(lambda: comms.outbox_stats()["messages"] == 0, timeout=60, what="the outbox to drain")
        with cond:
            assert cond.wait_for(lambda: {d["seq"] for d, _ in got} >= set(range(201)), 30), \
                sorted({d["seq"] for d, _ in got} ^ set(range(201)))[:20]
    finally:
        comms.stop()
        sub.disconnect()
        sub.loop_stop()
    replayed = [d["seq"] for d, p in got if d.get("replayed")]
    assert sorted(set(replayed)) == list(range(1, 201))  # every outage result, replayed
    assert replayed == sorted(replayed)  # in order (a duplicate repeats the same seq)
    assert all(p.get("replayed") == "true" for d, p in got if d.get("replayed"))
    live_seqs = [d["seq"] for d, _ in got if d["seq"] >= 1000]
    assert live_seqs and not any(d.get("replayed") for d, _ in got if d["seq"] >= 1000)
    # live results were not held back behind the backlog: the first live one arrived before the last replay
    first_live = next(i for i, (d, _) in enumerate(got) if d["seq"] >= 1000)
    last_replay = max(i for i, (d, _) in enumerate(got) if d.get("replayed"))
    assert first_live < last_replay, (first_live, last_replay, len(got))


def _session_expiry():
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = 3600
    return props


@pytest.mark.broker
def test_small_budget_with_a_real_broker_delivers_the_newest_and_counts_the_rest(mosquitto, tmp_path):
    broker = mosquitto()
    size = len(result(0))
    comms = comms_with_outbox(broker.port, "sf-3", tmp_path / "o.sqlite3", max_bytes=10 * size)
    comms.start()
    base = f"{PREFIX}/sf-3"
    try:
        assert comms.wait_connected(10)
        broker.stop()
        wait_until(lambda: not comms.connected, what="disconnected")
        for seq in range(30):
            comms.publish("result", result(seq))
        assert comms.outbox_stats()["dropped"] == 20 and comms.outbox_stats()["messages"] == 10
        comms._replayer.stop()  # replay held until the recorder listens (started again below)
        broker.start()
        rec = Recorder("127.0.0.1", broker.port, f"{PREFIX}/#")
        assert comms.wait_connected(20)
        comms._replayer._stop.clear()
        comms._replayer.start()
        rec.wait_for(f"{base}/result", count=10, timeout=30)
        wait_until(lambda: comms.outbox_stats()["messages"] == 0, timeout=30, what="drained")
    finally:
        comms.stop()
    assert [d["seq"] for d, _ in payloads(rec, f"{base}/result")] == list(range(20, 30))
    rec.close()


# -- the agent end to end --------------------------------------------------------------------------

def stored_results(db: Path) -> List[dict]:
    """The results in the agent's outbox now (read as another process would: WAL readers)."""
    if not db.exists():
        return []
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
    try:
        rows = conn.execute("SELECT payload FROM outbox WHERE bucket = 'results' ORDER BY ts, id").fetchall()
    except sqlite3.OperationalError:  # not created yet
        return []
    finally:
        conn.close()
    return [json.loads(p) for (p,) in rows]


class Consumer:
    """A consumer that must not miss results: MQTT 5, persistent session, QoS 1 (docs/daemon.md)."""

    def __init__(self, port: int, topics: List[str], client_id: str) -> None:
        import paho.mqtt.client as paho

        self.messages: List[Tuple[str, dict, Dict[str, str]]] = []
        self.cond = threading.Condition()
        subscribed = threading.Event()
        self.client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=paho.MQTTv5)
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe([(t, 1) for t in topics])
        self.client.on_subscribe = lambda *a: subscribed.set()
        self.client.on_message = self._on_message
        self.client.reconnect_delay_set(0.05, 0.2)
        self.client.connect_async("127.0.0.1", port, 30, clean_start=False, properties=_session_expiry())
        self.client.loop_start()
        assert subscribed.wait(10)

    def _on_message(self, client, userdata, msg) -> None:
        props = dict(getattr(msg.properties, "UserProperty", []) or []) if msg.properties is not None else {}
        with self.cond:
            self.messages.append((msg.topic, json.loads(msg.payload), props))
            self.cond.notify_all()

    def on(self, topic: str) -> List[Tuple[dict, Dict[str, str]]]:
        with self.cond:
            return [(doc, props) for t, doc, props in self.messages if t == topic]

    def wait(self, predicate, timeout: float, what: str) -> None:
        with self.cond:
            if not self.cond.wait_for(predicate, timeout):
                raise AssertionError(f"timed out after {timeout} s waiting for {what}")

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def contiguous(seqs) -> bool:
    seqs = sorted(set(seqs))
    return bool(seqs) and seqs == list(range(seqs[0], seqs[-1] + 1))


@pytest.mark.broker
def test_agent_killed_during_an_outage_loses_no_result(mosquitto, tmp_path):
    """Broker stopped; the agent SIGKILLed during the outage and started again while the broker is
    still down; then the broker returns. Every result of both runs reaches a persistent consumer:
    none missing, a duplicate only ever repeats its seq, the replay in capture order and marked,
    live results flowing while the backlog is replayed."""
    broker = mosquitto(extra=["persistence true", f"persistence_location {tmp_path}/",
                              "max_queued_messages 100000"])
    device = "sf-agent"
    base = f"{PREFIX}/{device}"
    config = write_config(tmp_path / "agent.toml", device, broker.port,
                          {"kind": "synthetic", "width": 160, "height": 120, "fps": 4.0},
                          publish={"stats_interval_s": 0.5},
                          outbox={"replay_max_hz": 5.0})  # a slow replay: live results visibly interleave
    db = tmp_path / "state" / "outbox.sqlite3"
    consumer = Consumer(broker.port, [f"{base}/result", f"{base}/stats"], "sf-consumer")
    logs = [open(tmp_path / f"agent-{i}.log", "wb") for i in (1, 2)]
    agent = subprocess.Popen([sys.executable, "-m", "edge_agent", "run", "--config", str(config)],
                             stdout=logs[0], stderr=subprocess.STDOUT)
    try:
        consumer.wait(lambda: len(consumer.on(f"{base}/result")) >= 3, 60, "live results")
        broker.stop()
        wait_until(lambda: len(stored_results(db)) >= 8, timeout=60, what="results kept in the outbox")
        agent.send_signal(signal.SIGKILL)
        agent.wait(10)
        killed_at = max(d["capture_ts"] for d in stored_results(db))
        run1_kept = {d["capture_ts"]: d["seq"] for d in stored_results(db)}
        agent = subprocess.Popen([sys.executable, "-m", "edge_agent", "run", "--config", str(config)],
                                 stdout=logs[1], stderr=subprocess.STDOUT)
        wait_until(lambda: sum(d["capture_ts"] > killed_at for d in stored_results(db)) >= 8, timeout=60,
                   what="the restarted agent keeping results while the broker is still down")
        broker.start()

        def drained() -> bool:
            stats = [d for d, _ in consumer.on(f"{base}/stats")]
            return bool(stats) and stats[-1]["outbox"]["messages"] == 0 and stats[-1]["outbox"]["replayed"] > 0
        consumer.wait(drained, 120, "the outbox to drain (stats.outbox.messages == 0)")
        live_after = len(consumer.on(f"{base}/result"))
        consumer.wait(lambda: len(consumer.on(f"{base}/result")) >= live_after + 2, 30, "live results after the replay")
        stop_agent(agent)
    finally:
        if agent.poll() is None:
            agent.kill()
        consumer.close()
        for f in logs:
            f.close()
    results = consumer.on(f"{base}/result")
    by_ts: Dict[float, set] = {}
    for doc, _ in results:
        by_ts.setdefault(doc["capture_ts"], set()).add(doc["seq"])
    assert all(len(seqs) == 1 for seqs in by_ts.values())  # a duplicate only ever repeats its seq
    assert set(run1_kept) <= set(by_ts), "a result kept before the SIGKILL was not delivered"
    run1 = [d["seq"] for d, _ in results if d["capture_ts"] <= killed_at]
    run2 = [d["seq"] for d, _ in results if d["capture_ts"] > killed_at]
    # none missing: the first run from its first live result to the SIGKILL, the second from its start
    assert contiguous(run1) and max(run1) == max(run1_kept.values()), sorted(set(run1))
    assert contiguous(run2), sorted(set(run2))
    replayed = [(d["capture_ts"], p) for d, p in results if d.get("replayed")]
    assert len(replayed) >= len(run1_kept)
    assert [ts for ts, _ in replayed] == sorted(ts for ts, _ in replayed)  # in capture order
    assert all(p.get("replayed") == "true" for _, p in replayed)
    live = [i for i, (d, _) in enumerate(results) if not d.get("replayed") and d["capture_ts"] > killed_at]
    last_replay = max(i for i, (d, _) in enumerate(results) if d.get("replayed"))
    assert live and live[0] < last_replay  # live results flowed while the backlog was replayed
    stats = [d for d, _ in consumer.on(f"{base}/stats")][-1]
    assert stats["outbox"]["recovered"] >= len(run1_kept) and stats["outbox"]["dropped"] == 0
