"""The console's per-device state without a broker: frame pairing by seq, history, timeline, health.

The messages are what the agent publishes (edge_agent.output.stages.encode, labelled frames); a
minimal stand-in for the fleet client delivers them (the real one is in tests/test_console.py).
"""

from __future__ import annotations

import json
from types import SimpleNamespace
from typing import Any, Dict, List, Tuple

import numpy as np

from edge_agent.console import state as st
from edge_agent.console.jobs import outcome
from edge_agent.output import stages
from edge_agent.output.encode import read_frame_label
from edge_agent.sources.base import Frame

PREFIX = "edge-agent"


class Client:
    prefix = PREFIX

    def __init__(self) -> None:
        self.callback = None
        self.infos: Dict[str, Any] = {}

    def listen(self, filters: List[str], callback) -> None:
        self.callback = callback

    def devices(self) -> Dict[str, Any]:
        return {d: SimpleNamespace(online=True, info=i) for d, i in self.infos.items()}


class Clock:
    def __init__(self) -> None:
        self.t = 1767225600.0

    def __call__(self) -> float:
        return self.t


def _fleet() -> Tuple[st.FleetState, Client, Clock, List[Tuple[str, str]]]:
    client, clock, changes = Client(), Clock(), []
    fleet = st.FleetState(client, on_change=lambda k, d: changes.append((k, d)), clock=clock).start()
    return fleet, client, clock, changes


def _messages(seq: int, classes: Dict[str, float], overlay: bool = False, camera: str = "") -> Dict[str, bytes]:
    frame = Frame(image=np.zeros((12, 16, 3), np.uint8), seq=seq, timestamp=1767225600.0 + seq, monotonic=0.0,
                  source="t")
    mask = np.zeros((12, 16), np.uint8)
    mask[:, :seq % 16] = 8
    messages, _ = stages.encode(frame, stages.Masks(mask, mask, classes), "a" * 64,
                                stages.EncodeOptions(overlay=overlay), None, camera=camera)
    return dict(messages)


def _send(client: Client, dev: str, kind: str, payload: bytes, camera: str = "") -> None:
    topic = f"{PREFIX}/{dev}/camera/{camera}/{kind}" if camera else f"{PREFIX}/{dev}/{kind}"
    client.callback(topic, payload)


def test_the_shown_frame_is_one_seq_whatever_order_its_parts_arrive_in():
    fleet, client, clock, changes = _fleet()
    m0, m1, m2, m3 = (_messages(s, {"background": 0.5, "cat": s / 10}, overlay=s == 1) for s in (0, 1, 2, 3))
    for kind in ("result", "mask"):
        _send(client, "cam", kind, m0[kind])
    assert fleet.frame("cam")["cameras"][""]["shown"]["seq"] == 0
    _send(client, "cam", "mask", m1["mask"])  # the mask before its result: frame 1 is not complete yet
    assert fleet.frame("cam")["cameras"][""]["shown"]["seq"] == 0
    _send(client, "cam", "result", m1["result"])
    shown = fleet.frame("cam")["cameras"][""]["shown"]
    assert shown["seq"] == 1 and shown["classes"]["cat"] == 0.1 and ("frame", "cam") in changes
    _send(client, "cam", "overlay", m1["overlay"])
    _send(client, "cam", "result", m2["result"])
    _send(client, "cam", "result", m3["result"])
    _send(client, "cam", "mask", m3["mask"])
    _send(client, "cam", "mask", m2["mask"])  # late: seq 3 stays shown
    frame = fleet.frame("cam")["cameras"][""]
    assert frame["shown"]["seq"] == 3 and frame["shown"]["classes"]["cat"] == 0.3
    assert frame["photo"]["seq"] == 1 and frame["photo"]["classes"]["cat"] == 0.1  # the photo's own classes
    assert read_frame_label(fleet.image("cam", "mask", 3)[0]) == {"seq": 3}
    assert read_frame_label(fleet.image("cam", "mask", 2)[0]) == {"seq": 2}
    assert read_frame_label(fleet.image("cam", "overlay", 1)[0]) == {"seq": 1}
    assert fleet.image("cam", "overlay", 3) == (None, 0)  # frame 3 has no overlay: never another's
    assert read_frame_label(fleet.image("cam", "mask")[0]) == {"seq": 3}  # without seq: the shown one


def test_per_frame_timings_are_waited_for_and_kept_with_their_frame():
    fleet, client, clock, _ = _fleet()
    timings = lambda seq, inf: json.dumps({"seq": seq, "ms": {"inference": inf, "end_to_end": inf + 5}}).encode()
    _send(client, "cam", "timings", timings(1, 10.0))
    m2 = _messages(2, {"background": 1.0})
    _send(client, "cam", "result", m2["result"])
    _send(client, "cam", "mask", m2["mask"])
    assert fleet.frame("cam")["cameras"][""]["shown"] is None  # frame timings flow: wait for frame 2's
    _send(client, "cam", "timings", timings(2, 20.0))
    shown = fleet.frame("cam")["cameras"][""]["shown"]
    assert shown["seq"] == 2 and shown["ms"] == {"inference": 20.0, "end_to_end": 25.0}


def test_parts_are_bounded_and_a_restart_starts_over():
    fleet, client, clock, _ = _fleet()
    for seq in range(1, 40):
        for kind, payload in _messages(seq, {"background": 1.0}).items():
            _send(client, "cam", kind, payload)
    tele = fleet._tele["cam"]
    assert len(tele.cameras[""].frames) == st.FRAMES_KEPT and fleet.frame("cam")["seq"] == 39
    assert fleet.image("cam", "mask", 5) == (None, 0)
    _send(client, "cam", "info", json.dumps({"started_at": 5.0}).encode())
    for kind, payload in _messages(1, {"background": 1.0}).items():
        _send(client, "cam", kind, payload)
    assert fleet.frame("cam")["seq"] == 1


def test_cameras_are_kept_apart_and_unlabelled_masks_still_show():
    fleet, client, clock, _ = _fleet()
    for topic, payload in _messages(7, {"background": 0.4, "person": 0.6}, camera="door").items():
        assert topic.startswith("camera/door/")  # the agent's own per-camera topic suffix
        _send(client, "cam", topic.rsplit("/", 1)[-1], payload, camera="door")
    for kind, payload in _messages(3, {"background": 0.9, "dog": 0.1}).items():
        _send(client, "cam", kind, payload)
    cams = fleet.frame("cam")["cameras"]
    assert cams["door"]["shown"]["seq"] == 7 and cams[""]["shown"]["seq"] == 3
    assert read_frame_label(fleet.image("cam", "mask", 7, "door")[0]) == {"seq": 7, "camera": "door"}
    png = b"\x89PNG\r\n\x1a\nnot labelled"
    _send(client, "old", "mask", png)
    shown = fleet.frame("old")["cameras"][""]["shown"]
    assert shown["labelled"] is False and fleet.image("old", "mask") == (png, 1)


def test_timeline_opens_extends_and_ends_events():
    line = st.Timeline(gap_s=4.0)
    for t in range(0, 10):
        line.add(100.0 + t, {"background": 0.7, "person": 0.3, "cat": 0.001 if t else 0.2})
    line.add(120.0, {"background": 1.0})
    line.add(121.0, {"person": 0.1})
    events = line.events(122.0)
    assert [(e["class"], e["start"], e["end"], e["open"]) for e in events] == [
        ("person", 121.0, 121.0, True), ("person", 100.0, 109.0, False), ("cat", 100.0, 100.0, False)]
    assert events[1]["peak"] == 0.3 and events[1]["frames"] == 10
    assert line.events(200.0)[0]["open"] is False
    bounded = st.Timeline(gap_s=0.5, keep=3)
    for t in range(20):
        bounded.add(float(t), {"dog": 0.5} if t % 2 == 0 else {})
    assert len(bounded.events(100.0)) == 3


def test_history_is_one_point_per_step_and_bounded():
    h = st.History(span_s=60.0, step_s=2.0)
    for i in range(200):
        h.add(1000.0 + i * 0.5, {"fps": 10.0 + (i % 4), "inference": None})
    series = h.series(["fps", "inference"])
    assert len(series["t"]) <= 31 and series["t"] == sorted(series["t"])
    assert all(v == 11.5 for v in series["fps"]) and set(series["inference"]) == {None}
    assert series["t"][-1] - series["t"][0] <= 62.0
    dense = st.History(step_s=2.0, dense=True)  # coverage: a frame without the class counts as 0
    for t, classes in ((0.0, {"cat": 0.4}), (0.5, {}), (1.0, {"cat": 0.2}), (1.5, {})):
        dense.add(t, classes)
    assert dense.series()["cat"] == [0.15]


def test_health_says_what_is_wrong_in_words():
    assert st.health(False, {"status": "running"}, {"fps": 9}) == ("offline", "connection lost")
    assert st.health(False, {"status": "stopped"}, {}) == ("offline", "stopped")
    assert st.health(True, {"status": "error", "error": "model x: cannot prepare this model"}, {}) == (
        "error", "model x: cannot prepare this model")
    assert st.health(True, {"status": "running"}, {"last_error": "boom"}, errors_rising=True) == (
        "error", "inference failing: boom")
    level, reason = st.health(True, {"status": "running"}, {"source": {"state": "down", "last_error": "refused"}})
    assert level == "warning" and "refused" in reason
    assert st.health(True, {"status": "running"}, {"throttled": {"under_voltage": True}}) == ("warning", "under voltage")
    assert st.health(True, {"status": "running"}, {"fps": 5}) == ("ok", "running")


def test_rows_carry_health_tags_last_seen_and_a_short_sparkline():
    fleet, client, clock, _ = _fleet()
    client.infos["cam"] = {"status": "running", "tags": ["site-a"], "started_at": clock.t - 60}
    for i in range(120):
        clock.t += 5
        _send(client, "cam", "timings", json.dumps({"interval_s": 5, "fps": 4.0, "stages": {
            "inference": {"mean": 50.0}, "end_to_end": {"mean": 80.0}}}).encode())
    row = fleet.row("cam")
    assert row["level"] == "ok" and row["tags"] == ["site-a"] and row["last_seen"] == clock.t
    assert len(row["history"]) <= st.HISTORY_S / st.ROW_STEP_S + 1
    history = fleet.history("cam")
    assert history["metrics"]["fps"][-1] == 4.0 and len(history["metrics"]["t"]) <= st.HISTORY_S / st.HISTORY_STEP_S + 1


def test_job_outcome_summarises_the_devices():
    progress = lambda *s: {f"d{i}": {"status": x} for i, x in enumerate(s)}
    assert outcome("running", progress("sent")) == "running"
    assert outcome("done", progress("done", "done")) == "done"
    assert outcome("done", progress("done", "rejected")) == "partly failed"
    assert outcome("done", progress("failed", "rejected")) == "failed"
    assert outcome("failed", progress("done")) == "failed"


def test_the_page_works_offline_with_its_shipped_chart_library():
    """No CDN: every script and stylesheet the page loads is served from the package (vendor: uPlot, MIT)."""
    import re
    from edge_agent.console.app import STATIC
    html = (STATIC / "index.html").read_text()
    refs = [r for r in re.findall(r'(?:src|href)="([^"]+)"', html) if r != "#"]
    assert refs and all(r.startswith("/static/") for r in refs), refs
    for ref in refs:
        assert (STATIC / ref[len("/static/"):]).is_file(), ref
    assert "MIT" in (STATIC / "vendor" / "uPlot.LICENSE").read_text()


def test_coverage_and_events_follow_the_watched_classes():
    """info.cameras[i].watched (the agent's rule) picks the coverage series and the events; an agent
    that does not say gets the classes seen most."""
    fleet, client, clock, _ = _fleet()
    seen = {"background": 0.5, "bird": 0.3, "sheep": 0.15, "person": 0.05}
    for dev in ("new", "old"):
        cameras = [{"id": "", "kind": "folder", "watched": ["person", "car"]}] if dev == "new" else [{"id": ""}]
        client.infos[dev] = info = {"status": "running", "started_at": 1.0, "cameras": cameras}
        _send(client, dev, "info", json.dumps(info).encode())
        for seq in range(1, 4):
            clock.t += 1
            _send(client, dev, "result", _messages(seq, seen)["result"])
    new, old = fleet.history("new"), fleet.history("old")
    assert new["watched"] == ["person", "car"] and old["watched"] is None
    assert [k for k in new["coverage"] if k != "t"] == ["person", "car"]
    assert new["coverage"]["person"][-1] == 0.05 and new["coverage"]["car"][-1] is None  # never seen: no value
    assert [e["class"] for e in new["events"]] == ["person"]
    assert sorted(k for k in old["coverage"] if k != "t") == ["bird", "person", "sheep"]
    assert sorted(e["class"] for e in old["events"]) == ["bird", "person", "sheep"]


def test_several_cameras_health_and_facts():
    """A camera whose source is down makes the device a warning that names it; each camera's fps and
    source state reach the row (the device page's facts for the camera shown)."""
    cams = {"door": {"fps": 2.0, "source": {"state": "open"}},
            "yard": {"fps": 0.0, "source": {"state": "down", "last_error": "connection refused"}}}
    assert st.health(True, {"status": "running"}, {"fps": 2.0, "cameras": cams}) == (
        "warning", "camera yard: source down, reopening: connection refused")
    fleet, client, clock, _ = _fleet()
    client.infos["cam"] = {"status": "running", "cameras": [{"id": "door"}, {"id": "yard"}]}
    _send(client, "cam", "stats", json.dumps({"fps": 2.0, "cameras": cams}).encode())
    row = fleet.row("cam")
    assert row["level"] == "warning" and row["camera_stats"] == {
        "door": {"fps": 2.0, "source_state": "open", "source_error": None},
        "yard": {"fps": 0.0, "source_state": "down", "source_error": "connection refused"}}
    _send(client, "cam", "stats", json.dumps({"fps": 2.0, "cameras": {"": cams["door"]}}).encode())
    assert fleet.row("cam")["camera_stats"] is None  # one camera: the device's own facts


def test_the_offline_backlog_reaches_the_row():
    """stats.outbox (store-and-forward) is in the row while enabled: what waits, replayed, dropped."""
    fleet, client, clock, _ = _fleet()
    client.infos["cam"] = {"status": "running"}
    _send(client, "cam", "stats", json.dumps({"fps": 2.0, "outbox": {
        "enabled": True, "messages": 1143, "bytes": 2_400_000, "masks": 571, "oldest_s": 61.5,
        "stored": 1200, "dropped": 3, "replayed": 57, "errors": 0}}).encode())
    assert fleet.row("cam")["outbox"] == {"messages": 1143, "bytes": 2_400_000, "oldest_s": 61.5,
                                          "dropped": 3, "replayed": 57}
    _send(client, "cam", "stats", json.dumps({"fps": 2.0, "outbox": {"enabled": False}}).encode())
    assert fleet.row("cam")["outbox"] is None
