"""Fault injection against the REAL agent process and a REAL mosquitto (issue 14, items 2-7).

SIGTERM in the middle of a deployment, a URL that trickles, models in the store that are not
signed, a read-only state directory, a full disk, sources that are not there when the agent
starts. The read-only and full-disk cases run the agent alone in a private mount namespace
(``unshare -m``: a read-only bind mount, a small tmpfs) so nothing outside it is touched; root
ignores permission bits, so a mode-0500 directory would prove nothing here.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import http.server
import json
import os
import shutil
import signal
import socket
import threading
import time
from pathlib import Path
from typing import Dict, List, Optional

import pytest

from edge_agent.config import load_config
from edge_agent.fleet import deploy as host
from edge_agent.fleet.client import FleetClient
from edge_agent.models import signing
from edge_agent.models.store import ModelStore
from tests.broker import Recorder
from tests.data import DM05, DM10, IMAGES, LABELS
from tests.helpers import (NotifySocket, can_unshare_mounts, start_agent, stop_agent, wait_until, write_clip,
                           write_config)

PREFIX = "edge-agent"
SHA = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in (DM05, DM10)}
VOC_LABELS = LABELS.read_text().split("\n")[:21]

needs_crypto = pytest.mark.skipif(not signing.available(), reason="cryptography not installed")
needs_mount_ns = pytest.mark.skipif(not can_unshare_mounts(),
                                    reason="needs a private mount namespace (root, unshare -m)")


class Device:
    """One agent config on a real mosquitto, a recorder of its topics and a fleet client."""

    def __init__(self, broker, tmp_path: Path, device: str, source: Optional[dict] = None, **sections) -> None:
        self.device = device
        self.base = f"{PREFIX}/{device}"
        self.state = tmp_path / "state"
        self.models = self.state / "models"
        sections.setdefault("model", {"path": str(DM10), "threads": 2})
        self.config = write_config(tmp_path / f"{device}.toml", device, broker.port,
                                   source or {"kind": "synthetic", "width": 320, "height": 240, "fps": 5.0},
                                   **sections)
        self.rec = Recorder("127.0.0.1", broker.port, f"{self.base}/#")
        self.client = FleetClient(load_config(str(self.config), env={}).mqtt).connect()
        self.proc = None

    def start(self, mounts=(), wait_masks: bool = True, env=None):
        self.rec.messages.clear()
        self.proc = start_agent(self.config, mounts=mounts, env=env)
        if wait_masks:
            self.rec.wait_for(f"{self.base}/mask", count=2, timeout=40)
        else:
            self.rec.wait_for(f"{self.base}/availability", b"online", timeout=40)
        return self.proc

    def stop(self, sig=signal.SIGTERM) -> str:
        out = stop_agent(self.proc, sig)
        assert "Traceback" not in out, out
        return out

    def info(self) -> Dict:
        return json.loads(self.rec.matching(f"{self.base}/info")[-1].payload)

    def answers(self, rid: str) -> List[Dict]:
        return [json.loads(m.payload) for m in self.rec.matching(f"{self.base}/deploy/{rid}")]

    def final(self, rid: str, timeout: float = 20.0) -> Dict:
        return wait_until(lambda: next((a for a in self.answers(rid) if a["final"]), None), timeout,
                          f"the final answer of {rid}")

    def request(self, command: str, params: Dict, timeout: float = 15.0, kind: Optional[str] = None):
        return self.client.request(command, params, devices=[self.device], timeout=timeout,
                                   kind=kind)[self.device]

    def deploy(self, data: bytes, timeout: float = 60.0, **params):
        chunk = params.pop("chunk_size", 200_000)
        doc = host.deploy_params(data, params.pop("name", "m"), chunk_size=chunk, **params)
        return host.deploy(self.client, doc, data, devices=[self.device], timeout=timeout)[self.device]

    def start_transfer(self, rid: str, data: bytes, chunks: int, **params) -> host.ChunkSender:
        """A chunked deploy whose first ``chunks`` chunks only are sent (the transfer stays open)."""
        doc = host.deploy_params(data, "dm05", chunk_size=100_000, labels=VOC_LABELS, **params)
        sender = host.ChunkSender(self.client, rid, host.chunks_of(data, 100_000)[:chunks], fleet=False)
        threading.Thread(target=self.client.request, args=("deploy", doc),
                         kwargs={"devices": [self.device], "timeout": 60, "request_id": rid,
                                 "on_message": sender.on_message}, daemon=True).start()
        return sender

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            stop_agent(self.proc, signal.SIGKILL)
        self.client.close()
        self.rec.close()


@pytest.fixture
def device(mosquitto, tmp_path):
    made: List[Device] = []
    broker = mosquitto()

    def make(name: str = "fault-1", **kwargs) -> Device:
        made.append(Device(broker, tmp_path, name, **kwargs))
        return made[-1]

    yield make
    for d in made:
        d.close()


def final_then_offline(dev: Device, rid: str) -> Dict:
    """The request's final answer, asserting it reached the broker before the agent's ``offline``."""
    msgs = list(dev.rec.messages)
    topics = [(m.topic, bytes(m.payload)) for m in msgs]
    offline = max(i for i, t in enumerate(topics) if t == (f"{dev.base}/availability", b"offline"))
    finals = [i for i, m in enumerate(msgs)
              if m.topic == f"{dev.base}/deploy/{rid}" and json.loads(m.payload)["final"]]
    assert finals, f"no final answer for {rid}: {[t for t, _ in topics if '/deploy/' in t]}"
    assert len(finals) == 1 and finals[0] < offline, (finals, offline)
    return json.loads(msgs[finals[0]].payload)


# -- item 2: SIGTERM during a deployment ---------------------------------------------------------------

@pytest.mark.broker
@pytest.mark.slow
def test_sigterm_mid_deployment_answers_every_request_before_offline(device):
    """Three SIGTERMs mid-transfer and one during confirmation: each time the request's final
    answer (``failed``, why) is published before ``offline``, and the old model is what runs next."""
    dev = device()
    dm05 = DM05.read_bytes()
    for i in range(3):
        dev.start()
        rid = f"term-{i}"
        sender = dev.start_transfer(rid, dm05, chunks=3)
        wait_until(lambda: any(a["status"] == "progress" and a.get("received", 0) > 0 for a in dev.answers(rid)),
                   20, "chunks arriving")
        out = dev.stop()
        sender.close()
        final = final_then_offline(dev, rid)
        assert final["status"] == "failed" and "agent stopping" in final["reason"], final
        assert final["running"] == SHA[DM10]
        assert dev.proc.returncode == 0 and "dropped (broker unavailable)" not in out, out
        assert not list(dev.models.glob(".incoming-*"))  # the partial file went with the job

    # during confirmation: the new model runs, unconfirmed; SIGTERM swaps back and says so
    dev.start()
    rid = "term-confirm"
    sender = dev.start_transfer(rid, dm05, chunks=99, confirm_frames=100_000, confirm_timeout_s=600.0)
    wait_until(lambda: any(a.get("stage") == "activating" for a in dev.answers(rid)), 60, "the swap")
    dev.rec.wait_for(f"{dev.base}/result", count=len(dev.rec.matching(f"{dev.base}/result")) + 2, timeout=20)
    dev.stop()
    sender.close()
    final = final_then_offline(dev, rid)
    assert final["status"] == "failed" and "agent stopping" in final["reason"], final
    assert "rolled back" in final["reason"] and final["running"] == SHA[DM10], final
    store = ModelStore(dev.models)
    assert store.pending() is None and store.current() == SHA[DM10]
    dev.start()
    assert dev.info()["model"]["sha256"] == SHA[DM10]
    dev.stop()


# -- item 3: deploy.url_timeout_s is a deadline --------------------------------------------------------

class _Trickle(http.server.BaseHTTPRequestHandler):
    """Announces 10,000 bytes and sends one every 0.5 s (each read succeeds; the whole never ends)."""

    def do_GET(self):  # noqa: N802 (http.server's name)
        self.send_response(200)
        self.send_header("Content-Length", "10000")
        self.end_headers()
        try:
            for _ in range(10000):
                self.wfile.write(b"x")
                self.wfile.flush()
                if self.server.stop.wait(0.5):
                    return
        except OSError:  # the agent hung up: what it should do at its deadline
            self.server.hangups += 1

    def log_message(self, *args):
        pass


@pytest.fixture
def trickle_server():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Trickle)
    server.stop, server.hangups = threading.Event(), 0
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server, f"http://127.0.0.1:{server.server_address[1]}/slow.tflite"
    server.stop.set()
    server.shutdown()
    server.server_close()


@pytest.mark.broker
def test_url_timeout_is_an_overall_deadline_and_frees_the_slot(device, trickle_server):
    server, url = trickle_server
    dev = device(deploy={"url_timeout_s": 2.0})
    dev.start()
    doc = host.deploy_params(b"x" * 10000, "slow", url=url)
    t0 = time.monotonic()
    # A per-read timeout would hold the slot for 10,000 x 0.5 s; the client waits 15 s at most.
    answer = host.deploy(dev.client, doc, None, devices=[dev.device], timeout=15)[dev.device]
    took = time.monotonic() - t0
    assert answer.status == "failed" and "timed out after 2 s" in answer.reason, answer
    assert "deploy.url_timeout_s" in answer.reason and took < 15
    wait_until(lambda: server.hangups >= 1, 10, "the agent closing the trickling connection")
    # the one deployment slot is free again: a real model deploys at once
    answer = dev.deploy(DM05.read_bytes(), name="dm05", labels=VOC_LABELS, confirm_frames=2)
    assert answer.status == "done" and answer.final["running"] == SHA[DM05], answer
    dev.stop()


# -- item 4: no unsigned model becomes current while a key is configured -----------------------------

def _signature(key, sha: str, name: str = "dm05", labels=None) -> str:
    """A deployment signature of what the store entry says (sha256, name, labels)."""
    return signing.sign_deployment(key, signing.deployment_document(sha, name, labels))


@needs_crypto
@pytest.mark.broker
@pytest.mark.slow
def test_with_a_key_no_path_makes_an_unsigned_model_current(device):
    from cryptography.hazmat.primitives.asymmetric import ed25519

    key, other = ed25519.Ed25519PrivateKey.generate(), ed25519.Ed25519PrivateKey.generate()
    dev = device(deploy={"public_key": signing.public_key_base64(key)})
    # An unsigned DM05 in the store, current (deployed before the key was configured).
    store = ModelStore.open(str(dev.state))
    temp = store.incoming_file("test")
    shutil.copyfile(DM05, temp)
    store.place(temp, SHA[DM05])
    store.write_manifest(SHA[DM05], {"name": "unsigned-dm05", "labels": VOC_LABELS, "source": "mqtt"})
    store.set_pointers(SHA[DM05], None)

    # start-up: the store's unsigned current model is refused, the configured one runs
    dev.start()
    assert dev.info()["model"]["sha256"] == SHA[DM10]
    # rollback to it (by sha256, by name): rejected, nothing moves
    for to in (SHA[DM05], "unsigned-dm05"):
        answer = dev.request("rollback", {"to": to}, kind="deploy")
        assert answer.status == "rejected" and "no signature" in answer.reason, answer
        assert "deploy.public_key" in answer.reason
    assert dev.info()["model"]["sha256"] == SHA[DM10]
    out = dev.stop()
    assert "has no signature" in out

    # start-up recovery: an unconfirmed switch whose pointers lead back to the unsigned model
    store.set_pointers(SHA[DM10], None)
    (dev.models / "pending.json").write_text(json.dumps(
        {"sha256": SHA[DM10], "current": SHA[DM05], "previous": None, "since": time.time(), "reason": "deploy"}))
    dev.start()
    assert store.current() == SHA[DM05] and store.pending() is None  # recovery moved the pointer back...
    assert dev.info()["model"]["sha256"] == SHA[DM10]  # ...but the unsigned model does not run

    # deploy: the same bytes with a valid signature make it current; the signature is kept
    answer = dev.deploy(DM05.read_bytes(), name="dm05", labels=VOC_LABELS, confirm_frames=2, sign_key=key)
    assert answer.status == "done" and answer.final["running"] == SHA[DM05], answer
    manifest = store.get(SHA[DM05]).manifest
    assert base64.b64decode(manifest["signature"]) == base64.b64decode(_signature(key, SHA[DM05], labels=VOC_LABELS))
    assert manifest["signed_document"] == signing.deployment_document(SHA[DM05], "dm05", VOC_LABELS)
    # rollback to the configured model (trusted by the config that holds the key), and back by sha
    answer = dev.request("rollback", {"to": SHA[DM10], "confirm_frames": 2}, kind="deploy", timeout=60)
    assert answer.status == "done" and answer.final["running"] == SHA[DM10], answer
    answer = dev.request("rollback", {"to": SHA[DM05], "confirm_frames": 2}, kind="deploy", timeout=60)
    assert answer.status == "done" and answer.final["running"] == SHA[DM05], answer
    dev.stop()

    # a kept signature that does not verify (made with another key): refused at start-up and rollback
    store.update_manifest(SHA[DM05], signature=_signature(other, SHA[DM05], labels=VOC_LABELS))
    dev.start()
    assert store.current() == SHA[DM05] and dev.info()["model"]["sha256"] == SHA[DM10]
    answer = dev.request("rollback", {"to": SHA[DM05]}, kind="deploy")
    assert answer.status == "rejected" and "does not verify" in answer.reason, answer
    out = dev.stop()
    assert "does not verify with deploy.public_key" in out


# -- item 5: a read-only state directory ---------------------------------------------------------------

@needs_mount_ns
@pytest.mark.broker
def test_read_only_state_dir_rejects_deployments_with_the_reason(device):
    dev = device()
    # (a) nothing there yet: the store cannot even be created
    dev.state.mkdir()
    ro = [f"mount --bind -o ro {dev.state} {dev.state}"]
    dev.start(mounts=ro)
    for command, params in (("deploy", host.deploy_params(DM05.read_bytes(), "dm05")), ("rollback", {})):
        answer = dev.request(command, params, kind="deploy", timeout=10)
        assert answer.status == "rejected", (command, answer)
        assert "deployments disabled" in answer.reason and "Read-only file system" in answer.reason, answer
        assert "agent.state_dir" in answer.reason
    answer = dev.request("models", {}, timeout=10)
    assert answer.status == "rejected" and "Read-only file system" in answer.reason, answer
    dev.rec.wait_for(f"{dev.base}/mask", count=len(dev.rec.matching(f"{dev.base}/mask")) + 2, timeout=20)
    dev.stop()

    # (b) a store with a current model, then made read-only: it still runs, deployments are refused
    dev.start()
    answer = dev.deploy(DM05.read_bytes(), name="dm05", labels=VOC_LABELS, confirm_frames=2)
    assert answer.status == "done", answer
    dev.stop()
    dev.start(mounts=ro)
    assert dev.info()["model"]["sha256"] == SHA[DM05]  # read from the read-only store
    answer = dev.deploy(DM10.read_bytes(), name="dm10", timeout=10)
    assert answer.status == "rejected" and "not writable: Read-only file system" in answer.reason, answer
    answer = dev.request("rollback", {}, kind="deploy", timeout=10)
    assert answer.status == "rejected" and "Read-only file system" in answer.reason, answer
    assert dev.request("models", {}, timeout=10).status == "done"
    dev.stop()


# -- item 6: the disk fills up during a transfer --------------------------------------------------------

@needs_mount_ns
@pytest.mark.broker
def test_disk_full_mid_transfer_fails_at_once_removes_the_file_and_keeps_serving(device):
    dev = device(model={"path": str(DM05), "labels": str(LABELS), "threads": 2})
    dev.state.mkdir()
    proc = dev.start(mounts=[f"mount -t tmpfs -o size=1m,mode=0700 tmpfs {dev.state}"])
    theirs = Path(f"/proc/{proc.pid}/root") / str(dev.models).lstrip("/")  # the agent's view of its store
    assert theirs.is_dir() and not list(dev.models.glob("*"))  # a tmpfs only the agent sees
    dm10 = DM10.read_bytes()  # 2.1 MB into 1 MB
    for attempt in range(2):  # the second proves the slot was freed and nothing leaked
        doc = host.deploy_params(dm10, "dm10", chunk_size=100_000, transfer_timeout_s=120.0)
        answer = host.deploy(dev.client, doc, dm10, devices=[dev.device], timeout=20)[dev.device]
        assert answer.status == "failed", answer
        assert answer.reason.startswith("no space left on the device"), answer
        assert "the partial file removed" in answer.reason
        assert not [p.name for p in theirs.iterdir() if p.name.startswith(".")], list(theirs.iterdir())
    assert dev.request("models", {}).status == "done"
    dev.rec.wait_for(f"{dev.base}/mask", count=len(dev.rec.matching(f"{dev.base}/mask")) + 2, timeout=20)
    assert dev.info()["model"]["sha256"] == SHA[DM05]
    out = dev.stop()  # no traceback (checked by stop); one error line per failed deployment
    assert out.count("no space left on the device") == 2, out


# -- item 7: sources that are not there when the agent starts -------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stats(dev: Device) -> List[Dict]:
    return [json.loads(m.payload) for m in dev.rec.matching(f"{dev.base}/stats")]


def _source_down_and_retried(dev: Device, retries: int = 2) -> Dict:
    """Stats keep coming while the source is down, and show it being retried."""
    return wait_until(lambda: next((s["source"] for s in _stats(dev)
                                    if s["source"]["state"] == "down" and s["source"]["errors"] >= retries), None),
                      30, "stats with the source down and retried")


@pytest.mark.broker
@pytest.mark.slow
def test_sources_missing_at_start_are_retried_until_they_appear(device, tmp_path):
    publish = {"stats_interval_s": 0.5}
    fast = {"fps": 5.0, "reopen_backoff_max_s": 0.5, "stall_timeout_s": 2.0}

    # a folder that does not exist yet: created with images after the start, frames flow
    folder = tmp_path / "incoming"
    dev = device("late-folder", source={"kind": "folder", "uri": str(folder), **fast}, publish=publish)
    notify = NotifySocket(str(tmp_path / "notify.sock"))
    try:
        dev.start(wait_masks=False, env={**os.environ, "NOTIFY_SOCKET": notify.address})
        down = _source_down_and_retried(dev)
        notify.wait_for("READY=1")  # up and serving while it waits for its source
        lines = [line for m in notify.sync() for line in m.splitlines()]
        assert any(line.startswith("STATUS=waiting for the source") for line in lines), lines
    finally:
        notify.close()
    assert "does not exist" in down["last_error"]  # a missing folder says so (not "no images")
    assert dev.info()["status"] == "running" and not dev.rec.matching(f"{dev.base}/mask")
    folder.mkdir()
    for name in ("cat.bmp", "bird.bmp"):
        os.symlink(IMAGES / name, folder / name)
    dev.rec.wait_for(f"{dev.base}/mask", count=2, timeout=20)
    wait_until(lambda: _stats(dev)[-1]["source"]["state"] == "open", 10, "stats saying the source is open")
    assert dev.proc.poll() is None
    dev.stop()

    # http:// to a closed port: retried; once a server listens there, frames flow
    port = _free_port()
    dev = device("late-http", source={"kind": "opencv", "uri": f"http://127.0.0.1:{port}/clip.avi", **fast},
                 publish=publish)
    dev.start(wait_masks=False)
    _source_down_and_retried(dev)
    www = tmp_path / "www"
    www.mkdir()
    write_clip(www / "clip.avi", 200, [(200, 30, 30), (30, 200, 30)])
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(www))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        dev.rec.wait_for(f"{dev.base}/mask", count=2, timeout=30)
    finally:
        dev.stop()
        server.shutdown()
        server.server_close()

    # rtsp:// to a closed port and a camera that is not plugged in: up, retried, stats say why
    for name, uri in (("late-rtsp", f"rtsp://127.0.0.1:{_free_port()}/cam"), ("late-video", "/dev/video99")):
        dev = device(name, source={"kind": "opencv", "uri": uri, **fast}, publish=publish)
        dev.start(wait_masks=False)
        down = _source_down_and_retried(dev, retries=3)
        assert down["last_error"], down
        assert dev.info()["status"] == "running" and dev.proc.poll() is None
        out = dev.stop()
        assert "cannot start the pipeline" not in out, out
