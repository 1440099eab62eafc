"""Several cameras in one agent (issue 26 item 1): ``[[cameras]]``, one pool of inference workers
shared fairly, per-camera topics, and real RTSP cameras.

RTSP: a real GStreamer RTSP server (tests/rtsp_server.py, Debian's gir1.2-gst-rtsp-server-1.0,
run with the system Python) serving videotestsrc at 720p as H.264 (x264enc) and MJPEG, behind
RTSP Basic authentication; the agent reads it through OpenCV's FFmpeg backend.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import time
import urllib.parse
from collections import Counter
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional

import pytest

from edge_agent.config import ConfigError, load_config, to_toml
from edge_agent.daemon.pipeline import CameraSource, FrameSlots, Pipeline, PipelineSettings
from edge_agent.inference.segmenter import Segmenter
from edge_agent.sources import open_source
from tests.broker import Recorder
from tests.data import DM05, IMAGES, LABELS, REPO
from tests.helpers import ListSink, stop_agent, wait_until

PREFIX = "edge-agent"
SYSTEM_PYTHON = "/usr/bin/python3"
USER, PASSWORD = "admin", "s3:cr@t!"  # ':' and '@' in the password: percent-encoded in the URL
QUOTED = urllib.parse.quote(PASSWORD, safe="")


# -- config ------------------------------------------------------------------------------------------

def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "agent.toml"
    path.write_text(text)
    return str(path)


def test_cameras_config_and_the_legacy_source(tmp_path):
    cfg = load_config(write(tmp_path, f"""
        [[cameras]]
        id = "door"
        kind = "opencv"
        uri = "rtsp://{USER}:{QUOTED}@cam1/stream"
        fps = 15
        classes = ["person"]
        [[cameras]]
        id = "yard"
        uri = "{IMAGES}"
    """.replace("\n        ", "\n")), env={})
    door, yard = cfg.camera_list()
    assert (door.id, door.kind, door.fps, door.classes) == ("door", "opencv", 15.0, ("person",))
    assert (yard.id, yard.kind, yard.width, yard.stall_timeout_s) == ("yard", "folder", 640, 5.0)  # [source] defaults
    shown = to_toml(cfg)
    assert QUOTED not in shown and PASSWORD not in shown and "rtsp://admin:***@cam1/stream" in shown
    legacy = load_config(None, env={}).camera_list()
    assert len(legacy) == 1 and legacy[0].id == "" and legacy[0].kind == "folder"


def test_cameras_config_mistakes_are_named(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, """
            [source]
            fps = 3.0
            [[cameras]]
            id = "door"
            fsp = 2
            [[cameras]]
            id = "door"
            [[cameras]]
            kind = "folder"
            [[cameras]]
            id = "has space"
        """.replace("\n            ", "\n")), env={})
    lines = err.value.errors
    assert any(line.startswith("cameras[0].fsp: unknown key (did you mean 'fps'?)") for line in lines), lines
    assert any(line.startswith("cameras[1].id: 'door' is already the id of cameras[0]") for line in lines), lines
    assert any(line.startswith("cameras[2].id: required") for line in lines), lines
    assert any(line.startswith("cameras[3].id:") for line in lines), lines
    assert any(line.startswith("cameras: [[cameras]] and [source] are both set (fps)") for line in lines), lines


def test_config_check_names_the_camera(tmp_path):
    path = write(tmp_path, f"""
        [[cameras]]
        id = "ok"
        uri = "{IMAGES}"
        [[cameras]]
        id = "gone"
        uri = "{tmp_path / 'no-such-folder'}"
        [model]
        path = "{DM05}"
    """.replace("\n        ", "\n"))
    run = subprocess.run([sys.executable, "-m", "edge_agent", "config", "check", "--config", path, "--no-model"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2, run.stdout + run.stderr
    assert "cameras[1]" in run.stderr and "cameras[0]" not in run.stderr, run.stderr
    assert "Traceback" not in run.stderr


# -- the shared pool: fairness, newest wins, a failing camera ----------------------------------------

def test_frame_slots_take_round_robin_newest_wins():
    dropped: List[Any] = []
    slots = FrameSlots(3, on_drop=dropped.append)
    slots.put(0, "a1")
    slots.put(0, "a2")  # newest wins
    slots.put(2, "c1")
    assert dropped == ["a1"] and slots.dropped == [1, 0, 0]
    assert slots.take(0) == (0, "a2")
    slots.put(0, "a3")
    assert slots.take(0) == (2, "c1")  # camera 2's turn comes before camera 0's second frame
    slots.put(1, "b1")
    assert slots.take(0) == (0, "a3")
    assert slots.take(0) == (1, "b1")
    assert slots.take(0) == (-1, None)
    slots.close(0), slots.close(1)
    assert not slots.exhausted
    slots.close(2)
    assert slots.exhausted


def _result_counts(sink: ListSink) -> Counter:
    return Counter(json.loads(p)["camera"] for s, p in list(sink.messages) if s.endswith("/result"))


def test_one_pool_serves_every_camera_its_share_and_a_failing_one_stops_none(tmp_path):
    """Three folder cameras read at full speed saturate one interpreter: each gets about a third
    of the frames (counts, not timing); a fourth camera whose folder is missing stays down."""
    segmenter = Segmenter(str(DM05), threads=1, labels=str(LABELS))
    cameras = [CameraSource(cid, open_source({"kind": "folder", "uri": str(IMAGES), "loop": True}), lossless=True)
               for cid in ("a", "b", "c")]
    broken = open_source({"kind": "folder", "uri": str(tmp_path / "missing"), "reopen_backoff_max_s": 0.5},
                         strict=False)
    cameras.append(CameraSource("broken", broken, lossless=True))
    sink = ListSink()
    pipeline = Pipeline(cameras, segmenter, sink, PipelineSettings(stats_interval_s=0.5, interpreters=1)).start()
    try:
        wait_until(lambda: sum(_result_counts(sink).values()) >= 60, timeout=240, what="60 results")
        stats = pipeline.stats()
    finally:
        pipeline.stop()
    counts = _result_counts(sink)
    fair = sum(counts.values()) / 3
    assert set(counts) == {"a", "b", "c"}, counts
    for cid in ("a", "b", "c"):
        assert 0.7 * fair <= counts[cid] <= 1.3 * fair, counts  # round-robin: within one or two frames
    assert stats["cameras"]["broken"]["source"]["state"] == "down"
    assert stats["cameras"]["broken"]["frames"]["processed"] == 0
    assert stats["frames"]["processed"] == sum(stats["cameras"][c]["frames"]["processed"] for c in "abc")
    suffixes = {s for s, _ in sink.messages}
    assert {"camera/a/result", "camera/a/mask", "camera/b/mask", "camera/c/result"} <= suffixes
    assert not any(s in ("result", "mask") for s in suffixes)  # a camera of [[cameras]] has its own topics


# -- real RTSP cameras ---------------------------------------------------------------------------------

class RtspServer:
    """tests/rtsp_server.py as a process (system Python: gi), output to files."""

    def __init__(self, workdir: Path, port: int = 0, user: str = USER, password: str = PASSWORD) -> None:
        self.workdir = workdir
        self.args = ["--width", "1280", "--height", "720", "--fps", "15"]
        if user:
            self.args += ["--user", user, "--password", password]
        self.port = port
        self.proc: Optional[subprocess.Popen] = None
        self.start()

    def start(self) -> None:
        out = self.workdir / "rtsp.out"
        out.write_text("")
        with out.open("w") as fh, (self.workdir / "rtsp.err").open("a") as err:
            self.proc = subprocess.Popen([SYSTEM_PYTHON, str(REPO / "tests" / "rtsp_server.py"),
                                          "--port", str(self.port), *self.args], stdout=fh, stderr=err)
        line = wait_until(lambda: out.read_text().strip() or self.proc.poll() is not None, 30, "the RTSP server")
        assert isinstance(line, str) and line.startswith("READY"), (self.workdir / "rtsp.err").read_text()[-2000:]
        self.port = int(line.split()[1])

    def url(self, path: str, credentials: bool = True) -> str:
        auth = f"{USER}:{QUOTED}@" if credentials else ""
        return f"rtsp://{auth}127.0.0.1:{self.port}/{path}"

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


def _rtsp_available() -> bool:
    probe = subprocess.run([SYSTEM_PYTHON, "-c", "import gi; gi.require_version('GstRtspServer', '1.0'); "
                            "from gi.repository import GstRtspServer"], capture_output=True)
    return probe.returncode == 0


needs_rtsp = pytest.mark.skipif(not Path(SYSTEM_PYTHON).exists() or not _rtsp_available(),
                                reason="needs gir1.2-gst-rtsp-server-1.0 + python3-gi (tools/test.sh installs them)")


@pytest.fixture
def rtsp(tmp_path: Path) -> Iterator[RtspServer]:
    server = RtspServer(tmp_path)
    try:
        yield server
    finally:
        server.stop()


def _schemas() -> Dict[str, Any]:
    """docs/asyncapi.yaml's components, closed-world (an undocumented key is an error)."""
    yaml = pytest.importorskip("yaml")
    doc = yaml.safe_load((REPO / "docs" / "asyncapi.yaml").read_text())

    def closed(node: Any) -> Any:
        if isinstance(node, dict):
            out = {k: (v if k == "examples" else closed(v)) for k, v in node.items()}
            if "properties" in out and "additionalProperties" not in out:
                out["additionalProperties"] = False
            return out
        return [closed(v) for v in node] if isinstance(node, list) else node
    return closed(copy.deepcopy(doc["components"]))


def _validate(components: Dict[str, Any], message: str, doc: Any) -> None:
    jsonschema = pytest.importorskip("jsonschema")
    schema = dict(components["messages"][message]["payload"], components=components)
    errors = list(jsonschema.Draft202012Validator(schema).iter_errors(doc))
    assert not errors, f"{message}: {[e.message for e in errors[:3]]}"


def _write_cameras_config(path: Path, device: str, port: int, cameras: List[Dict[str, Any]]) -> Path:
    lines = [f'[agent]\ndevice_id = "{device}"\nlog_level = "debug"\nstate_dir = "{path.parent / "state"}"',
             f'[model]\npath = "{DM05}"\nlabels = "{LABELS}"\ninterpreters = 2\nthreads = 1',
             f'[mqtt]\nhost = "127.0.0.1"\nport = {port}\nreconnect_min_s = 0.1\nreconnect_max_s = 0.5',
             '[publish]\nstats_interval_s = 1.0\ntimings_interval_s = 1.0']
    for cam in cameras:
        lines.append("[[cameras]]\n" + "\n".join(f"{k} = {json.dumps(v)}" for k, v in cam.items()))
    path.write_text("\n\n".join(lines) + "\n")
    return path


@needs_rtsp
@pytest.mark.broker
@pytest.mark.slow
@pytest.mark.parametrize("count", [2, 3])
def test_rtsp_and_folder_cameras_in_one_agent(mosquitto, rtsp, tmp_path, count):
    """Two (folder + H.264) and three (+ MJPEG) cameras, plus one RTSP camera whose server is not
    there: every working camera publishes on its own topics, the dead one is "down" in stats and
    stops none; payloads match docs/asyncapi.yaml; the RTSP password is in no message and no log."""
    broker = mosquitto()
    device = f"cams{count}"
    cameras = [{"id": "shelf", "kind": "folder", "uri": str(IMAGES), "fps": 4.0},
               {"id": "door", "kind": "opencv", "uri": rtsp.url("h264"), "fps": 15.0}]
    if count == 3:
        cameras.append({"id": "yard", "kind": "opencv", "uri": rtsp.url("mjpeg"), "fps": 15.0})
    dead = f"rtsp://{USER}:{QUOTED}@127.0.0.1:{_free_port()}/h264"
    cameras.append({"id": "dead", "kind": "opencv", "uri": dead, "stall_timeout_s": 1.0, "reopen_backoff_max_s": 1.0})
    config = _write_cameras_config(tmp_path / "agent.toml", device, broker.port, cameras)
    rec = Recorder("127.0.0.1", broker.port, f"{PREFIX}/#")
    log_path = tmp_path / "agent.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "edge_agent", "run", "--config", str(config)],
                                stdout=log, stderr=subprocess.STDOUT)
    working = [c["id"] for c in cameras if c["id"] != "dead"]
    base = f"{PREFIX}/{device}"
    try:
        for cid in working:
            rec.wait_for(f"{base}/camera/{cid}/result", count=3, timeout=120)
        stats = wait_until(lambda: [json.loads(m.payload) for m in rec.matching(f"{base}/stats")
                                    if set(json.loads(m.payload).get("cameras", {})) == {*working, "dead"}
                                    and all(json.loads(m.payload)["cameras"][c]["frames"]["processed"] > 0
                                            for c in working)],
                           timeout=60, what="stats counting every working camera")[-1]
        rec.wait_for(f"{base}/camera/door/timings", timeout=30)
    finally:
        stop_agent(proc)
        rec.close()
    log_text = log_path.read_text(errors="replace")
    assert stats["cameras"]["dead"]["source"]["state"] == "down", stats["cameras"]["dead"]
    assert stats["cameras"]["dead"]["frames"]["processed"] == 0
    assert "source" not in stats  # several cameras: per camera only
    components = _schemas()
    _validate(components, "stats", stats)
    info = json.loads(rec.matching(f"{base}/info")[-1].payload)
    _validate(components, "info", info)
    assert [c["id"] for c in info["cameras"]] == [c["id"] for c in cameras]
    assert info["cameras"][1]["uri"] == f"rtsp://{USER}:***@127.0.0.1:{rtsp.port}/h264"
    for cid in working:
        results = [json.loads(m.payload) for m in rec.matching(f"{base}/camera/{cid}/result")]
        for doc in results:
            _validate(components, "result", doc)
            assert doc["camera"] == cid
        seqs = [d["seq"] for d in results]
        assert seqs == sorted(seqs), f"{cid}: results out of capture order"
        assert rec.matching(f"{base}/camera/{cid}/mask")
    door = json.loads(rec.matching(f"{base}/camera/door/result")[-1].payload)
    assert door["frame"] == {"w": 1280, "h": 720}
    timings = json.loads(rec.matching(f"{base}/camera/door/timings")[-1].payload)
    _validate(components, "timingsInterval", timings)
    assert timings["camera"] == "door"
    assert not rec.matching(f"{base}/result") and not rec.matching(f"{base}/mask")
    for secret in (PASSWORD, QUOTED):
        assert not [m.topic for m in rec.messages if secret.encode() in bytes(m.payload)], "password published"
        assert secret not in log_text, "password logged"
    assert "Traceback" not in log_text


@needs_rtsp
@pytest.mark.broker
@pytest.mark.slow
def test_rtsp_source_resumes_after_the_server_restarts(mosquitto, rtsp, tmp_path):
    """A [source] RTSP camera (legacy topics): the server goes away and comes back on the same
    port; the agent reopens the stream and publishes again, and says so in stats."""
    broker = mosquitto()
    device = "rtsp-resume"
    lines = [f'[agent]\ndevice_id = "{device}"\nstate_dir = "{tmp_path / "state"}"',
             f'[source]\nkind = "opencv"\nuri = "{rtsp.url("h264")}"\nfps = 15.0\nstall_timeout_s = 2.0\n'
             'reopen_backoff_max_s = 1.0',
             f'[model]\npath = "{DM05}"\nlabels = "{LABELS}"',
             f'[mqtt]\nhost = "127.0.0.1"\nport = {broker.port}\nreconnect_min_s = 0.1\nreconnect_max_s = 0.5',
             '[publish]\nstats_interval_s = 1.0']
    config = tmp_path / "agent.toml"
    config.write_text("\n\n".join(lines) + "\n")
    rec = Recorder("127.0.0.1", broker.port, f"{PREFIX}/{device}/#")
    base = f"{PREFIX}/{device}"
    log_path = tmp_path / "agent.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "edge_agent", "run", "--config", str(config)],
                                stdout=log, stderr=subprocess.STDOUT)
    try:
        rec.wait_for(f"{base}/result", count=5, timeout=120)
        rtsp.stop()
        wait_until(lambda: any(json.loads(m.payload).get("source", {}).get("state") == "down"
                               for m in rec.matching(f"{base}/stats")), 60, "the source down in stats")
        stopped_at = len(rec.matching(f"{base}/result"))
        rtsp.start()  # same port
        restarted = time.monotonic()
        wait_until(lambda: len(rec.matching(f"{base}/result")) >= stopped_at + 5, 120, "results after the restart")
        resumed_s = time.monotonic() - restarted
        stats = wait_until(lambda: [json.loads(m.payload) for m in rec.matching(f"{base}/stats")
                                    if json.loads(m.payload)["source"]["reopens"] >= 1], 30, "reopens counted")[-1]
    finally:
        stop_agent(proc)
        rec.close()
    assert stats["source"]["state"] == "open" and stats["cameras"][""]["source"]["reopens"] >= 1
    assert "camera" not in json.loads(rec.matching(f"{base}/result")[-1].payload)  # legacy payload
    print(f"results resumed {resumed_s:.1f} s after the RTSP server came back")
    assert PASSWORD not in log_path.read_text(errors="replace")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
