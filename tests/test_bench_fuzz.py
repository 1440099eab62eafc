"""Fuzz: >= 1,000 malformed/adversarial cmd/benchmark payloads against a running agent process.

Every payload is built to be invalid and is tagged with where its single ``rejected`` answer must
appear: ``benchmark/<request id>`` when the payload carries a usable, new request id, else
``benchmark/_invalid``; a repeated id is a retransmission and gets no answer at all. The test
counts the answers against those expectations, checks that nothing was accepted, that the agent
never crashed, and that its live pipeline kept publishing masks during and after the storm.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from tests.broker import Recorder
from tests.helpers import write_config

PREFIX = "edge-agent"
DEVICE = "fz"
MAX_RUNS = 5
INVALID = "_invalid"

# (payload, request id whose topic gets the answer, or INVALID, or None for "no answer")
Case = Tuple[bytes, Optional[str]]


def _dump(doc: Any) -> bytes:
    return json.dumps(doc).encode()


class Cases:
    """Adversarial payload generator (seeded: a failure is reproducible)."""

    def __init__(self, seed: int = 20240501) -> None:
        self.rng = random.Random(seed)
        self.n = 0
        self.ids: List[str] = []

    def rid(self) -> str:
        self.n += 1
        rid = f"fz{self.n}"
        self.ids.append(rid)
        return rid

    def bad_field(self) -> Case:
        """A valid request except for ONE field: wrong type, out of range, huge, nested, unknown."""
        rid = self.rid()
        field, value = self.rng.choice([
            ("runs", 0), ("runs", -1), ("runs", MAX_RUNS + 1), ("runs", 10 ** 30), ("runs", "5"),
            ("runs", True), ("runs", 2.5), ("runs", None), ("runs", [1]), ("runs", {"n": 1}),
            ("warmup", -1), ("warmup", 10 ** 6), ("min_secs", -0.5), ("min_secs", 1e308), ("min_secs", "1"),
            ("max_secs", 0), ("max_secs", 1e9), ("threads", 0), ("threads", 65), ("threads", "2"),
            ("pipeline", 1), ("pipeline", "true"), ("pause", 0), ("pause", None), ("samples", "no"),
            ("frame_size", "640X480"), ("frame_size", "0x0"), ("frame_size", "99999x1"), ("frame_size", 640),
            ("frame_size", [640, 480]), ("frame_size", "640x480 "), ("input", "camera"), ("input", ""),
            ("model", "../../etc/passwd"), ("model", "/tmp/x.tflite"), ("model", ""), ("model", 5),
            ("model", "." * 10), ("model", "x" * 200), ("model", "no-such-model"),
            ("runz", 5), ("__proto__", {}), ("request", 1), ("RUNS", 1), ("", 1), ("\u0000", 1),
            ("runs", "\ud800"), ("model", "\ud800"), ("runs", [[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]),
        ])
        doc = {"request_id": rid, "runs": 1, "warmup": 0}
        doc[field] = value
        if field != "runs" and value is None:
            doc[field] = {"n": None}
        return _dump(doc), rid

    def raw_text(self) -> Case:
        """JSON text tricks that keep a usable id: NaN, Infinity, 1e999, duplicate keys, huge ints."""
        rid = self.rid()
        body = self.rng.choice(['"runs":NaN', '"runs":Infinity', '"runs":-Infinity', '"min_secs":1e999',
                                '"runs":1,"runs":1', '"warmup":0,"warmup":0', f'"runs":{"9" * 3000}',
                                '"runs":1e2', '"runs":-0', '"threads":0x10'])
        payload = f'{{"request_id":"{rid}",{body}}}'.encode()
        if body == '"threads":0x10':  # not JSON at all: no usable id
            self.ids.pop()
            return payload, INVALID
        return payload, rid

    def no_id(self) -> Case:
        """Valid JSON (or not) without a usable request id."""
        choice = self.rng.randrange(12)
        if choice == 0:
            return bytes(self.rng.getrandbits(8) for _ in range(self.rng.randrange(1, 300))), INVALID
        if choice == 1:
            return b'{"request_id":"x\xff\xfe","runs":1}', INVALID  # invalid UTF-8
        if choice == 2:
            return self.rng.choice([b"[]", b"null", b"true", b"1", b'"benchmark"', b"{}", b"  ", b""]), INVALID
        if choice == 3:
            bad = self.rng.choice(["", " ", "a/b", "+", "#", "_invalid", "x" * 65, "../x", "a b", "\u00e9t\u00e9"])
            return _dump({"request_id": bad, "runs": 1}), INVALID
        if choice == 4:
            return _dump({"request_id": self.rng.choice([7, None, True, ["a"], {"id": "a"}, 1.5]), "runs": 1}), INVALID
        if choice == 5:
            return b'{"request_id":"a","request_id":"b"}', INVALID  # which one? refused
        if choice == 6:
            depth = self.rng.randrange(1100, 2000)
            return b"[" * depth + b"]" * depth, INVALID  # deeper than the parser's recursion limit
        if choice == 7:
            return _dump({"request_id": "big", "pad": "x" * self.rng.randrange(5000, 70000)}), INVALID  # > cap
        if choice == 8:
            return b'{"request_id": "fz", "runs": 1', INVALID  # truncated
        if choice == 9:
            return _dump({"runs": 1, "warmup": 0}), INVALID  # no id
        if choice == 10:
            return "{\"request_id\":\"ok\",\"runs\":1}".encode("utf-16"), INVALID
        return b"\x00" * self.rng.randrange(1, 64), INVALID

    def duplicate(self) -> Case:
        """An id already used (answered or not): a retransmission, never answered again."""
        rid = self.rng.choice(self.ids)
        return _dump({"request_id": rid, "runs": 0}), None

    def make(self, count: int) -> List[Case]:
        out: List[Case] = []
        makers = [self.bad_field] * 5 + [self.raw_text] * 2 + [self.no_id] * 4 + [self.duplicate]
        while len(out) < count:
            maker = self.rng.choice(makers)
            if maker == self.duplicate and not self.ids:
                continue
            out.append(maker())
        return out


@pytest.mark.broker
def test_fuzz_command_topics_of_a_running_agent(mosquitto, tmp_path: Path):
    broker = mosquitto()
    rec = Recorder("127.0.0.1", broker.port, f"{PREFIX}/{DEVICE}/#")
    replies = Recorder("127.0.0.1", broker.port, "fuzz-replies/#")
    config = write_config(tmp_path / "agent.toml", DEVICE, broker.port,
                          {"kind": "synthetic", "fps": 4.0, "width": 160, "height": 120},
                          publish={"stats_interval_s": 60.0, "timings_interval_s": 60.0},
                          mqtt={"response_topic_prefixes": ["fuzz-replies"]},
                          benchmark={"max_runs": MAX_RUNS, "max_seconds": 10.0})
    log = (tmp_path / "agent.log").open("wb")
    # stdout to a file, not a pipe nobody reads during the storm: logging must never block the agent
    agent = subprocess.Popen([sys.executable, "-m", "edge_agent", "run", "--config", str(config),
                              "--set", "agent.log_level=info"], stdout=log, stderr=subprocess.STDOUT)
    cases = Cases().make(1200)
    try:
        rec.wait_for(f"{PREFIX}/{DEVICE}/mask", timeout=40)
        masks_at_start = len(rec.matching(f"{PREFIX}/{DEVICE}/mask"))
        topics = [f"{PREFIX}/{DEVICE}/cmd/benchmark", f"{PREFIX}/all/cmd/benchmark"]
        with_response: Dict[str, Tuple[bytes, Optional[str]]] = {}
        infos = []
        for i, (payload, where) in enumerate(cases):
            props = None
            if i % 40 == 0:  # some as MQTT 5 requests with binary correlation data
                props = Properties(PacketTypes.PUBLISH)
                props.ResponseTopic = f"fuzz-replies/{i}"
                props.CorrelationData = bytes([i % 256, 0, 255])
                with_response[props.ResponseTopic] = (props.CorrelationData, where)
            infos.append(rec.client.publish(topics[i % 2], payload, qos=1, properties=props))
            if i % 100 == 99:
                infos[-1].wait_for_publish(10)
        for info in infos:
            info.wait_for_publish(10)

        expected: Dict[str, int] = {}
        for _, where in cases:
            if where is not None:
                expected[where] = expected.get(where, 0) + 1
        parsable = sum(n for k, n in expected.items() if k != INVALID)
        assert parsable >= 500 and expected[INVALID] >= 300 and len(cases) >= 1000

        rec.wait_for(f"{PREFIX}/{DEVICE}/benchmark/{INVALID}", count=expected[INVALID], timeout=45)
        deadline = time.monotonic() + 45
        while time.monotonic() < deadline:
            answered = sum(1 for m in rec.messages if m.topic.startswith(f"{PREFIX}/{DEVICE}/benchmark/"))
            if answered >= len(cases) - sum(1 for _, w in cases if w is None):
                break
            time.sleep(0.1)
        # a barrier instead of a grace period: the agent handles commands in arrival order and
        # answers in that order, so once this last request's rejection arrived (on its id topic and
        # on its MQTT 5 response topic) every answer to the storm, expected or not, has arrived too
        props = Properties(PacketTypes.PUBLISH)
        props.ResponseTopic, props.CorrelationData = "fuzz-replies/barrier", b"barrier"
        rec.client.publish(topics[0], b'{"request_id":"fuzz-barrier","runs":0}', qos=1,
                           properties=props).wait_for_publish(10)
        rec.wait_for(f"{PREFIX}/{DEVICE}/benchmark/fuzz-barrier", timeout=30)
        replies.wait_for("fuzz-replies/barrier", timeout=30)

        # the live pipeline published masks during the storm and keeps doing so after it
        after = len(rec.matching(f"{PREFIX}/{DEVICE}/mask"))
        rec.wait_for(f"{PREFIX}/{DEVICE}/mask", count=after + 2, timeout=20)
        assert after > masks_at_start, "no mask published during the storm"
        assert agent.poll() is None, "the agent died"

        # every answer: one final 'rejected' per parsable request, on its own topic; nothing accepted
        by_topic: Dict[str, List[Dict[str, Any]]] = {}
        for m in rec.messages:
            if m.topic.startswith(f"{PREFIX}/{DEVICE}/benchmark/"):
                by_topic.setdefault(m.topic.rsplit("/", 1)[1], []).append(json.loads(m.payload))
        barrier = by_topic.pop("fuzz-barrier")
        assert len(barrier) == 1 and barrier[0]["status"] == "rejected", barrier
        statuses = {d["status"] for docs in by_topic.values() for d in docs}
        assert statuses == {"rejected"}, statuses
        counts = {k: len(v) for k, v in by_topic.items()}
        assert counts == expected, {k: (counts.get(k), expected.get(k)) for k in set(counts) | set(expected)
                                    if counts.get(k) != expected.get(k)}
        rejected_parsable = sum(n for k, n in counts.items() if k != INVALID)
        assert rejected_parsable == parsable
        assert all(d["reason"] and d["final"] for docs in by_topic.values() for d in docs)

        # MQTT 5 requesters got their answer on their response topic with their correlation data
        # (a reused id from a requester with its own response topic is told it is a duplicate there)
        for topic, (correlation, where) in with_response.items():
            got = replies.matching(topic)
            assert len(got) == 1, topic
            assert got[0].properties.CorrelationData == correlation
            doc = json.loads(got[0].payload)
            assert doc["status"] == "rejected"
            assert (doc["reason"] == "duplicate request id") == (where is None), doc

        # and the agent still serves a real request afterwards
        rec.publish(f"{PREFIX}/{DEVICE}/cmd/benchmark", b'{"request_id":"after-fuzz","runs":2,"warmup":0}')
        final = None
        deadline = time.monotonic() + 30
        while final is None and time.monotonic() < deadline:
            docs = [json.loads(m.payload) for m in rec.matching(f"{PREFIX}/{DEVICE}/benchmark/after-fuzz")]
            final = next((d for d in docs if d["final"]), None)
            time.sleep(0.05)
        assert final is not None and final["status"] == "done" and final["result"]["invoke"]["count"] == 2
        print(f"fuzz: {len(cases)} payloads, {parsable} parsable requests rejected on their id topic, "
              f"{expected[INVALID]} without a usable id rejected on _invalid, "
              f"{sum(1 for _, w in cases if w is None)} duplicates ignored")
    finally:
        if agent.poll() is None:
            agent.terminate()
        try:
            agent.wait(20)
        except subprocess.TimeoutExpired:
            agent.kill()
            agent.wait()
        log.close()
        rec.close()
        replies.close()
    out = (tmp_path / "agent.log").read_text(errors="replace")
    assert agent.returncode == 0, out
    assert "Traceback" not in out, out
