"""Model deployment over MQTT: real mosquitto, real models, real agents (in-process and killed subprocesses)."""

from __future__ import annotations

import base64
import functools
import hashlib
import http.client
import http.server
import json
import os
import signal
import threading
import urllib.parse
import urllib.request
import time
from pathlib import Path
from typing import Dict, List

import pytest

from edge_agent.remote import deploy as dep
from edge_agent.remote import deploy_request as dreq
from edge_agent.remote import transfer
from edge_agent.remote import sanity
from edge_agent.models import signing
from edge_agent.daemon.agent import Agent
from edge_agent.cli import main as cli_main
from edge_agent.comms.commands import RequestError, validate
from edge_agent.config import load_config
from edge_agent.errors import InferenceError
from edge_agent.fleet import deploy as host
from edge_agent.fleet.client import FleetClient
from edge_agent.output.encode import decode_mask_png
from edge_agent.inference.segmenter import Segmenter
from edge_agent.models.store import ModelStore
from tests.broker import Recorder
from tests.data import BIRD, BIRD_MASK, CLASSIFIER, DM05, DM05_EDGETPU, DM10, LABELS, bird_mask
from tests.helpers import start_agent, stop_agent, write_config

PREFIX = "edge-agent"
SHA = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in (DM05, DM10)}

needs_crypto = pytest.mark.skipif(not signing.available(), reason="cryptography not installed")


# -- units ---------------------------------------------------------------------------------------

def parse(doc: Dict, max_size: int = 1 << 20) -> dreq.DeployRequest:
    return dreq.deploy_request("r1", validate(doc, dreq.DEPLOY_SCHEMA), max_size)


def test_request_validation():
    base = {"name": "m", "sha256": "ab" * 32, "size": 1000}
    req = parse({**base, "chunks": 4, "chunk_size": 256})
    assert (req.chunks, req.chunk_size, req.confirm_frames) == (4, 256, dreq.DEFAULT_CONFIRM_FRAMES)
    assert parse({**base, "chunks": 1}).chunk_size == 1000  # one binary payload
    assert parse({**base, "url": "https://h/m.tflite"}).url == "https://h/m.tflite"
    cases = [
        ({**base, "chunks": 3, "chunk_size": 256}, "do not fit"),
        ({**base}, "exactly one of"),
        ({**base, "chunks": 4, "chunk_size": 256, "url": "http://h/x"}, "exactly one of"),
        ({**base, "size": 2 << 20, "chunks": 1}, "too large"),
        ({**base, "chunks": 1, "golden_mask": "AAAA"}, "needs the 'sample'"),
        ({**base, "chunks": 1, "url2": 1}, "unknown field"),
        ({**base, "chunks": 1, "sha256": "xyz"}, "sha256"),
        ({**base, "chunks": 1, "name": "../evil"}, "name"),
        ({**base, "url": "file:///etc/passwd"}, "url"),
        ({**base, "chunks": 1, "labels": [1, 2]}, "labels"),
        ({**base, "chunks": True}, "chunks"),
    ]
    for doc, reason in cases:
        with pytest.raises(RequestError, match=reason):
            parse(doc)


def test_chunk_assembler_order_duplicates_and_errors(tmp_path):
    data = os.urandom(1000)
    asm = transfer.ChunkAssembler(tmp_path / "f", 1000, 4, 300)
    for n in (3, 1, 0, 1, 2):
        asm.add(n, data[n * 300:(n + 1) * 300])
    asm.wait(1.0, lambda _: None)
    asm.close()
    assert asm.duplicates == 1 and (tmp_path / "f").read_bytes() == data

    asm = transfer.ChunkAssembler(tmp_path / "g", 1000, 4, 300)
    asm.add(0, data[:300])
    asm.add(2, data[600:900])
    with pytest.raises(dreq.DeployFailed, match=r"2 of 4 chunks missing \(1, 3\)"):
        asm.wait(0.3, lambda _: None)
    asm.close()

    asm = transfer.ChunkAssembler(tmp_path / "h", 1000, 4, 300)
    asm.add(3, data[:300])  # the last chunk must be the 100-byte remainder
    with pytest.raises(dreq.DeployFailed, match="chunk 3 has 300 bytes, expected 100"):
        asm.wait(1.0, lambda _: None)
    asm.close()
    asm = transfer.ChunkAssembler(tmp_path / "i", 1000, 4, 300)
    asm.add(7, b"x")
    with pytest.raises(dreq.DeployFailed, match="out of range"):
        asm.wait(1.0, lambda _: None)
    asm.close()


@needs_crypto
def test_signing_keys_and_signatures(tmp_path):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    key = ed25519.Ed25519PrivateKey.generate()
    pem = tmp_path / "key.pem"
    pem.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption()))
    pub_pem = tmp_path / "pub.pem"
    pub_pem.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                      serialization.PublicFormat.SubjectPublicKeyInfo))
    loaded = signing.load_private_key(str(pem))
    document = signing.deployment_document(SHA[DM05], "dm05", ["a", "b"], b"sample")
    sig = base64.b64decode(signing.sign_deployment(loaded, document))
    for spec in (str(pub_pem), signing.public_key_base64(loaded)):
        signing.verify_deployment(signing.load_public_key(spec), document, sig)
        for changed in ({"sha256": SHA[DM10]}, {"name": "other"}, {"labels": ["a", "c"]},
                        {"sample_sha256": hashlib.sha256(b"other").hexdigest()}):
            with pytest.raises(signing.SigningError, match="bad signature"):
                signing.verify_deployment(signing.load_public_key(spec), {**document, **changed}, sig)
    # the canonical document: sorted keys, no spaces, the scheme named
    assert signing.canonical(document).startswith(b'{"golden_mask_sha256":null,"labels":["a","b"],"name":"dm05"')
    # a signature of the raw digest alone (older agents): refused, saying to re-sign
    old_style = loaded.sign(bytes.fromhex(SHA[DM05]))
    with pytest.raises(signing.SigningError, match="re-sign the deployment with this version"):
        signing.verify_deployment(signing.load_public_key(signing.public_key_base64(loaded)), document, old_style)
    with pytest.raises(signing.SigningError, match="32"):
        signing.load_public_key(base64.b64encode(b"short").decode())
    with pytest.raises(signing.SigningError, match="neither a PEM"):
        signing.load_public_key("not a key!")


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def http_dir(tmp_path):
    """A real HTTP server on 127.0.0.1 serving a temporary directory."""
    root = tmp_path / "www"
    root.mkdir()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


class _Proxy(http.server.BaseHTTPRequestHandler):
    """A forward proxy for plain http (absolute-URI requests), recording what it relayed."""

    def do_GET(self):
        self.server.seen.append((self.path, self.headers.get("Proxy-Authorization")))
        target = urllib.parse.urlsplit(self.path)  # upstream directly: never back through a proxy
        upstream = http.client.HTTPConnection(target.hostname, target.port, timeout=10)
        upstream.request("GET", target.path)
        body = upstream.getresponse().read()
        upstream.close()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_fetch_url_goes_through_the_proxy_the_environment_names(http_dir, tmp_path, monkeypatch):
    root, url = http_dir
    (root / "m.bin").write_bytes(b"p" * 3000)
    proxy = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Proxy)
    proxy.seen = []
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    monkeypatch.setattr(urllib.request, "getproxies", lambda: {"http": f"http://ops:s3cret@127.0.0.1:{proxy.server_address[1]}"})
    try:
        out = tmp_path / "via-proxy"
        with monkeypatch.context() as m:
            m.setattr(urllib.request, "proxy_bypass", lambda host: False)
            transfer.fetch_url(f"{url}/m.bin", out, 5000, 5.0, lambda _: None)
        assert out.read_bytes() == b"p" * 3000
        assert proxy.seen == [(f"{url}/m.bin", "Basic " + base64.b64encode(b"ops:s3cret").decode())]
        monkeypatch.setattr(urllib.request, "proxy_bypass", lambda host: host == "127.0.0.1")  # no_proxy
        transfer.fetch_url(f"{url}/m.bin", tmp_path / "direct", 5000, 5.0, lambda _: None)
        assert len(proxy.seen) == 1 and (tmp_path / "direct").read_bytes() == b"p" * 3000
    finally:
        proxy.shutdown()
        proxy.server_close()


def test_fetch_url_size_cap_and_errors(http_dir, tmp_path):
    root, url = http_dir
    (root / "m.bin").write_bytes(b"x" * 5000)
    out = tmp_path / "out"
    transfer.fetch_url(f"{url}/m.bin", out, 5000, 5.0, lambda _: None)
    assert out.read_bytes() == b"x" * 5000
    with pytest.raises(dreq.DeployFailed, match="has 5000 bytes, more than the 4000"):
        transfer.fetch_url(f"{url}/m.bin", out, 4000, 5.0, lambda _: None)
    with pytest.raises(dreq.DeployFailed, match="cannot download .*HTTP 404"):
        transfer.fetch_url(f"{url}/missing", out, 4000, 5.0, lambda _: None)


def test_sanity_check_with_golden_mask():
    seg = Segmenter(str(DM05), labels=str(LABELS), threads=2)
    report = sanity.sanity_check(seg, BIRD.read_bytes(), BIRD_MASK.read_bytes(), 0.5)
    assert report["agreement"] > 0.5
    wrong = (bird_mask() * 0 + 15).astype("uint8")  # "person" everywhere
    import cv2

    with pytest.raises(dreq.DeployFailed, match="agreement"):
        sanity.sanity_check(seg, BIRD.read_bytes(), cv2.imencode(".png", wrong)[1].tobytes(), 0.5)
    # The palette PNG the agent publishes (and `segment` writes) works as a golden mask too.
    from edge_agent.output.encode import encode_mask_png

    palette = sanity.sanity_check(seg, BIRD.read_bytes(), encode_mask_png(bird_mask()), 0.5)
    assert palette["agreement"] == report["agreement"]


# -- a real agent in this process, a real broker -------------------------------------------------------

class Env:
    """mosquitto + one in-process agent (dm1.0 on a synthetic camera) + a recorder + the host client."""

    def __init__(self, mosquitto, tmp_path: Path, device: str = "dev-1", **deploy_cfg) -> None:
        self.broker = mosquitto()
        self.device = device
        self.base = f"{PREFIX}/{device}"
        self.state = tmp_path / "state"
        config = write_config(tmp_path / f"{device}.toml", device, self.broker.port,
                              {"kind": "synthetic", "width": 320, "height": 240, "fps": 6.0},
                              model={"path": str(DM10), "threads": 2},
                              publish={"stats_interval_s": 60.0},
                              deploy={"max_size_mb": 4, **deploy_cfg})
        self.rec = Recorder("127.0.0.1", self.broker.port, f"{self.base}/#")
        self.agent = Agent(load_config(str(config), env={}), install_signals=False)
        self.thread = threading.Thread(target=self.agent.run, daemon=True)
        self.thread.start()
        self.rec.wait_for(f"{self.base}/mask", count=2, timeout=30)
        mqtt = load_config(str(config), env={}).mqtt
        self.client = FleetClient(mqtt).connect()
        self.client.discover(0.5)

    def store(self) -> ModelStore:
        return ModelStore(self.state / "models")

    def info(self) -> Dict:
        return json.loads(self.rec.matching(f"{self.base}/info")[-1].payload)

    def results(self) -> List[Dict]:
        return [json.loads(m.payload) for m in self.rec.matching(f"{self.base}/result")]

    def masks_keep_coming(self, count: int = 2) -> None:
        have = len(self.rec.matching(f"{self.base}/mask"))
        self.rec.wait_for(f"{self.base}/mask", count=have + count, timeout=20)

    def deploy(self, data: bytes, timeout: float = 60.0, **params):
        chunk = params.pop("chunk_size", 200_000)
        doc = host.deploy_params(data, params.pop("name", "m"), chunk_size=chunk, **params)
        answers = host.deploy(self.client, doc, data, devices=[self.device], timeout=timeout)
        return answers[self.device]

    def close(self) -> None:
        self.client.close()
        self.agent.request_stop()
        self.thread.join(20)
        self.rec.close()


@pytest.fixture
def env_factory(mosquitto, tmp_path):
    envs: List[Env] = []

    def make(**kwargs) -> Env:
        envs.append(Env(mosquitto, tmp_path, **kwargs))
        return envs[-1]

    yield make
    for env in envs:
        env.close()


def store_is_clean(env: Env, allowed: set) -> None:
    names = {p.name for p in env.store().root.iterdir()}
    assert not [n for n in names if n.startswith(".")], names  # no half-written file
    assert {n.split(".")[0] for n in names if n.endswith((".tflite", ".json")) and n != "pending.json"} <= allowed
    assert "pending.json" not in names


@needs_crypto
@pytest.mark.broker
def test_chunked_deploy_swaps_without_gap_then_rollback(env_factory, http_dir, tmp_path, capsys):
    from cryptography.hazmat.primitives.asymmetric import ed25519

    key = ed25519.Ed25519PrivateKey.generate()
    env = env_factory(public_key=signing.public_key_base64(key))
    assert env.info()["model"]["sha256"] == SHA[DM10] and env.info()["deploy"]["signing"] == "required"
    progress: List[Dict] = []
    doc = host.deploy_params(DM05.read_bytes(), "dm05", chunk_size=100_000, sign_key=key,
                             labels=(LABELS.read_text().split("\n"))[:21])
    answer = host.deploy(env.client, doc, DM05.read_bytes(), devices=[env.device], timeout=60,
                         on_message=lambda dev, d: progress.append(d))[env.device]
    assert answer.status == "done", answer
    assert answer.final["state"] == "active" and answer.final["running"] == SHA[DM05]
    stages = [d.get("stage") for d in progress if d["status"] == "progress"]
    assert {"verifying", "checking", "activating"} <= set(stages)
    info = env.info()
    assert info["model"]["sha256"] == SHA[DM05] and info["model"]["name"] == "dm05"
    assert info["deploy"]["current"] == SHA[DM05] and info["deploy"]["previous"] == SHA[DM10]
    assert env.agent.segmenter.model.file.sha256 == SHA[DM05]
    # masks continue across the swap: no more than two frames missing around it
    env.masks_keep_coming(3)
    results = env.results()
    models = [r["model"] for r in results]
    first_new = models.index(SHA[DM05][:12])
    assert models[first_new - 1] == SHA[DM10][:12] and set(models[first_new:]) == {SHA[DM05][:12]}
    # Only the swap is the deployment's doing: drops elsewhere (a camera outpacing a loaded CPU,
    # newest frame wins) say how busy the machine is, not how the swap went.
    seqs = [r["seq"] for r in results]
    assert seqs[first_new] - seqs[first_new - 1] <= 3, seqs
    mask = decode_mask_png(bytes(env.rec.matching(f"{env.base}/mask")[-1].payload))
    assert mask.shape == (385, 513)  # model resolution, letterbox padding cropped
    store = env.store()
    assert store.current() == SHA[DM05] and store.pending() is None
    assert store.get(SHA[DM10]).manifest["source"].startswith("config:")  # adopted for rollback
    store_is_clean(env, {SHA[DM05], SHA[DM10]})

    # rollback to the configured model, then the store listing
    answers = env.client.request("rollback", {}, devices=[env.device], kind="deploy", timeout=60)
    assert answers[env.device].status == "done", answers
    assert answers[env.device].final["state"] == "rolled_back"
    assert env.info()["model"]["sha256"] == SHA[DM10]
    listing = env.client.request("models", {}, devices=[env.device], timeout=10)[env.device].final
    roles = {m["sha256"]: m["role"] for m in listing["models"]}
    assert roles == {SHA[DM10]: "current", SHA[DM05]: "previous"} and listing["running"] == SHA[DM10]

    # the CLI, fleet-wide: chunks go once to the fleet topic after the device accepted
    key_file = tmp_path / "sign.key"
    key_file.write_text(base64.b64encode(key.private_bytes_raw()).decode())
    broker = ["--host", "127.0.0.1", "--port", str(env.broker.port), "--discover-s", "0.5"]
    assert cli_main(["remote", "deploy", str(DM05), "--all", "--sign-key", str(key_file),
                     "--chunk-size", "300000", "--name", "dm05-fleet", *broker]) == 0
    table = capsys.readouterr().out
    assert "dev-1" in table and "active" in table and SHA[DM05][:12] in table, table
    assert env.info()["model"]["name"] == "dm05-fleet"
    assert cli_main(["remote", "models", "-d", env.device, *broker]) == 0
    listing = capsys.readouterr().out
    assert "current" in listing and "previous" in listing and "dm05-fleet" in listing, listing

    # a model by URL (already in the store: no second copy)
    root, url = http_dir
    (root / "dm10.tflite").write_bytes(DM10.read_bytes())
    doc = host.deploy_params(DM10.read_bytes(), "dm10-url", url=f"{url}/dm10.tflite", sign_key=key)
    answer = host.deploy(env.client, doc, None, devices=[env.device], timeout=60)[env.device]
    assert answer.status == "done", answer
    assert env.info()["model"]["sha256"] == SHA[DM10] and env.info()["model"]["name"] == "dm10-url"
    store_is_clean(env, {SHA[DM05], SHA[DM10]})

    # the CLI rollback: back to the previous model (dm05), reported in the table
    assert cli_main(["remote", "rollback", "-d", env.device, *broker]) == 0
    table = capsys.readouterr().out
    assert "dev-1" in table and "rolled_back" in table, table
    assert env.info()["model"]["sha256"] == SHA[DM05]


@needs_crypto
@pytest.mark.broker
def test_every_bad_deployment_is_refused_and_the_old_model_keeps_serving(env_factory, http_dir):
    from cryptography.hazmat.primitives.asymmetric import ed25519

    key, other = ed25519.Ed25519PrivateKey.generate(), ed25519.Ed25519PrivateKey.generate()
    env = env_factory(public_key=signing.public_key_base64(key), url_timeout_s=5.0)
    dm05 = DM05.read_bytes()
    truncated_model = dm05[: len(dm05) // 2]
    corrupt = bytearray(dm05)
    corrupt[8:4000] = os.urandom(3992)  # flatbuffer header and tables garbled
    cases = [
        # (what, data sent, deploy_params overrides, expected status, reason fragment)
        ("wrong sha256", dm05, {"sha256": hashlib.sha256(b"other").hexdigest()}, "failed", "sha256 mismatch"),
        ("truncated file", truncated_model, {}, "failed", "model refused"),
        ("corrupt file", bytes(corrupt), {}, "failed", "model refused"),
        ("classifier", CLASSIFIER.read_bytes(), {}, "failed", "not a segmentation model"),
        ("edge tpu model", DM05_EDGETPU.read_bytes(), {}, "failed", "Edge TPU"),
        ("oversized", os.urandom(5 << 20), {}, "rejected", "too large"),
        ("unsigned", dm05, {"sign": None}, "rejected", "unsigned deployment refused"),
        ("bad signature", dm05, {"sign": other}, "rejected", "bad signature"),
    ]
    for what, data, overrides, status, reason in cases:
        signer = overrides.pop("sign", key)
        doc = host.deploy_params(data, what.replace(" ", "-"), chunk_size=300_000)
        doc.update(overrides)
        if signer is not None:
            doc["signature"] = signing.sign_deployment(signer, signing.deployment_document(doc["sha256"], doc["name"]))
        answer = host.deploy(env.client, doc, data, devices=[env.device], timeout=60)[env.device]
        assert answer.status == status and reason in (answer.reason or ""), (what, answer)
        assert answer.final["running"] == SHA[DM10], what
        env.masks_keep_coming(2)
        assert env.info()["model"]["sha256"] == SHA[DM10], what
        store_is_clean(env, set())

    # a transfer that stops (the last chunk never comes): refused after transfer_timeout_s
    doc = host.deploy_params(dm05, "truncated-transfer", chunk_size=300_000, sign_key=key, transfer_timeout_s=1.0)
    sender_chunks = host.chunks_of(dm05, 300_000)[:-1]
    rid = "truncated-1"
    sender = host.ChunkSender(env.client, rid, sender_chunks, fleet=False)
    answers = env.client.request("deploy", doc, devices=[env.device], timeout=30, request_id=rid,
                                 on_message=sender.on_message)
    sender.close()
    answer = answers[env.device]
    assert answer.status == "failed" and "1 of 3 chunks missing (2)" in answer.reason, answer
    # a chunk larger than announced, and a URL that serves more than announced
    doc = host.deploy_params(dm05, "big-chunk", chunk_size=300_000, sign_key=key)
    sender = host.ChunkSender(env.client, "big-1", [dm05[:300_001]], fleet=False)
    answer = env.client.request("deploy", doc, devices=[env.device], timeout=30, request_id="big-1",
                                on_message=sender.on_message)[env.device]
    sender.close()
    assert answer.status == "failed" and "chunk 0 has 300001 bytes" in answer.reason, answer
    root, url = http_dir
    (root / "big.tflite").write_bytes(dm05 + b"tail")
    doc = host.deploy_params(dm05, "url-too-long", url=f"{url}/big.tflite", sign_key=key)
    answer = host.deploy(env.client, doc, None, devices=[env.device], timeout=30)[env.device]
    assert answer.status == "failed" and "more than the" in answer.reason, answer
    doc = host.deploy_params(dm05, "url-missing", url=f"{url}/nothing.tflite", sign_key=key)
    answer = host.deploy(env.client, doc, None, devices=[env.device], timeout=30)[env.device]
    assert answer.status == "failed" and "HTTP 404" in answer.reason, answer
    env.masks_keep_coming(2)
    assert env.info()["model"]["sha256"] == SHA[DM10]
    store_is_clean(env, set())
    assert env.agent.pipeline is not None and env.agent.pipeline.counters.inference_errors == 0


@pytest.mark.broker
def test_a_model_failing_on_live_frames_is_swapped_back(env_factory, monkeypatch):
    """Passes the sanity invoke, then fails on every live frame: rolled back during confirmation."""
    env = env_factory()
    real_activate = dep.Deployer._activate

    def activate_then_break(self, job, segmenter, final):
        def fail():  # what the runtime wrapper raises when invoke() fails
            raise InferenceError("injected invoke failure")
        segmenter.model.invoke = fail
        return real_activate(self, job, segmenter, final)

    monkeypatch.setattr(dep.Deployer, "_activate", activate_then_break)
    answer = env.deploy(DM05.read_bytes(), name="dm05", confirm_frames=3)
    assert answer.status == "failed" and "rolled back after the swap" in answer.reason, answer
    assert "injected invoke failure" in answer.reason
    env.masks_keep_coming(2)
    info = env.info()
    assert info["model"]["sha256"] == SHA[DM10] and info["deploy"]["pending"] is None
    store = env.store()
    assert store.current() == SHA[DM10] and store.pending() is None
    assert "injected" in store.get(SHA[DM05]).manifest["rolled_back_reason"]


# -- SIGKILL during a deployment, real subprocesses ---------------------------------------------------

@pytest.mark.broker
def test_sigkill_mid_deployment_comes_back_on_the_old_model(mosquitto, tmp_path):
    broker = mosquitto()
    device = "kill-1"
    base = f"{PREFIX}/{device}"
    config = write_config(tmp_path / "agent.toml", device, broker.port,
                          {"kind": "synthetic", "width": 320, "height": 240, "fps": 5.0},
                          model={"path": str(DM10), "threads": 2})
    models = tmp_path / "state" / "models"
    rec = Recorder("127.0.0.1", broker.port, f"{base}/#")
    mqtt = load_config(str(config), env={}).mqtt
    dm05 = DM05.read_bytes()

    def start_and_wait():
        proc = start_agent(config)
        rec.messages.clear()
        rec.wait_for(f"{base}/mask", count=2, timeout=30)
        return proc

    def running_sha() -> str:
        return json.loads(rec.matching(f"{base}/info")[-1].payload)["model"]["sha256"]

    proc = start_and_wait()
    client = FleetClient(mqtt).connect()
    try:
        # 1) killed while the chunks arrive: a half-written incoming file is left behind
        doc = host.deploy_params(dm05, "dm05", chunk_size=100_000)
        sender = host.ChunkSender(client, "kill-a", host.chunks_of(dm05, 100_000)[:3], fleet=False)
        client.request("deploy", doc, devices=[device], timeout=3, request_id="kill-a",
                       on_message=sender.on_message)  # times out: the transfer never completes
        sender.close()
        assert [p.name for p in models.glob(".incoming-*")], list(models.iterdir())
        proc.kill()
        proc.wait(10)
        proc = start_and_wait()
        assert running_sha() == SHA[DM10]
        assert not list(models.glob(".*")) and not list(models.glob("*.tflite"))

        # 2) killed after the swap, before the new model was confirmed: rolled back at restart
        doc = host.deploy_params(dm05, "dm05", chunk_size=400_000, confirm_frames=100_000,
                                 confirm_timeout_s=600.0)
        sender = host.ChunkSender(client, "kill-b", host.chunks_of(dm05, 400_000), fleet=False)
        done = threading.Event()
        threading.Thread(target=lambda: (client.request("deploy", doc, devices=[device], timeout=60,
                                                        request_id="kill-b", on_message=sender.on_message),
                                         done.set()), daemon=True).start()
        deadline = time.monotonic() + 60
        while not (models / "pending.json").exists() or running_sha() != SHA[DM05]:
            assert time.monotonic() < deadline, "the swap never happened"
            time.sleep(0.1)
        rec.wait_for(f"{base}/result", count=len(rec.matching(f"{base}/result")) + 2, timeout=20)
        assert json.loads(rec.matching(f"{base}/result")[-1].payload)["model"] == SHA[DM05][:12]
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        sender.close()
        proc = start_and_wait()
        assert running_sha() == SHA[DM10]
        store = ModelStore(models)
        assert store.pending() is None and store.current() == SHA[DM10]
        assert "not confirmed" in store.get(SHA[DM05]).manifest["rolled_back_reason"]
        assert not list(models.glob(".*"))
        assert store.recover() == []  # consistent: nothing left to repair
    finally:
        client.close()
        out = stop_agent(proc)
        rec.close()
    assert "Traceback" not in out, out


def test_unusable_state_dir_leaves_the_agent_on_its_configured_model(tmp_path):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the state directory should be")
    cfg = load_config(None, ["agent.device_id=nostore", "source.kind=synthetic", "source.fps=20",
                             "mqtt.enabled=false", f"model.path={DM05}", f"agent.state_dir={blocker}"], env={})
    agent = Agent(cfg, install_signals=False)
    runner = threading.Thread(target=agent.run, daemon=True)
    runner.start()
    try:
        deadline = time.monotonic() + 30
        while agent.pipeline is None or agent.pipeline.counters.processed < 2:
            assert time.monotonic() < deadline and runner.is_alive(), agent.error
            time.sleep(0.05)
        assert agent.models.store is None and agent.segmenter.model.file.sha256 == SHA[DM05]
        # cmd/deploy is rejected with it (test_faults): the setting, not the device's paths
        assert "agent.state_dir" in agent.models.store_problem and "not-a-dir" not in agent.models.store_problem
    finally:
        agent.request_stop()
        runner.join(15)


@pytest.mark.broker
def test_malformed_commands_and_stray_chunks_are_answered_not_fatal(env_factory):
    env = env_factory(device="fuzz-1")
    rng = __import__("random").Random(6)
    good = host.deploy_params(DM05.read_bytes(), "dm05")
    payloads = [os.urandom(rng.randint(0, 64)) for _ in range(60)]
    for i in range(120):
        doc = {"request_id": f"f{i}", **good}
        key = rng.choice(sorted(doc))
        doc[key] = rng.choice([None, True, -1, 1e300, "x" * 300, [1], {"a": 1}, "../../x", 2 ** 70])
        payloads.append(json.dumps(doc).encode())
    for i, payload in enumerate(payloads):
        topic = rng.choice(["cmd/deploy", "cmd/rollback", "cmd/models", f"cmd/deploy/f{i}/chunk/{i}",
                            "cmd/deploy/nobody/chunk/x"])
        env.rec.publish(f"{env.base}/{topic}", payload)
    answers = env.client.request("models", {}, devices=[env.device], timeout=20)  # still answering, in order
    assert answers[env.device].status == "done"
    finals = [json.loads(m.payload) for m in env.rec.messages
              if m.topic.startswith(f"{env.base}/deploy/") or m.topic.startswith(f"{env.base}/models/")]
    finals = [d for d in finals if d.get("final")]
    assert finals and all(d["status"] in ("rejected", "done", "failed") for d in finals)
    env.masks_keep_coming(2)
    assert env.info()["model"]["sha256"] == SHA[DM10] and env.agent.pipeline.healthy(10.0)
    store_is_clean(env, set())
