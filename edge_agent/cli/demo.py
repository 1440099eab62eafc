"""``edge-agent demo``: the whole agent in one command, on embedded defaults.

Starts a loopback broker (mosquitto, else amqtt), fetches the default model (from a local mirror
when one is given or found beside the checkout, else from its public URL, sha256-verified), runs
the real agent on a folder of images, and shows what a subscriber receives: one line per frame
with classes and timings, and the overlay JPEGs written to ``--out``.
"""

from __future__ import annotations

import json
import logging
import tempfile
import threading
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from edge_agent.models import catalog
from edge_agent.daemon.agent import Agent
from edge_agent.comms.broker import EmbeddedBroker
from edge_agent.cli.segment import add_runtime_option
from edge_agent.config import load_config
from edge_agent.errors import EdgeAgentError
from edge_agent.output.encode import decode_mask_png
from edge_agent.sources.images import list_images, read_rgb

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]
# Sample images and a model mirror come with a checkout (../shared/test_data beside it); an
# installed package has none and asks for --images (the model is then fetched from its source).
SHARED = REPO.parent / "shared" / "test_data" if (REPO / "pyproject.toml").is_file() else None
DEVICE = "demo"


class Viewer:
    """A plain MQTT subscriber: prints results with their timings, saves overlays.

    An overlay is named after its source frame (``<image name>_overlay.jpg``): the folder source
    reads ``frames`` (the readable images, sorted) once, in order, so frame ``seq`` is
    ``frames[seq - 1]``; the overlay is published right after its frame's result.
    """

    def __init__(self, host: str, port: int, prefix: str, out: Path, frames: Sequence[str] = ()) -> None:
        import paho.mqtt.client as paho
        from paho.mqtt.enums import CallbackAPIVersion

        self.out = out
        self.frames = list(frames)
        self.base = f"{prefix}/{DEVICE}"
        self.results: Dict[int, dict] = {}
        self.timings: Dict[int, dict] = {}
        self.masks = 0
        self.overlays: List[Path] = []
        self.info: Optional[dict] = None
        self.bytes = 0
        self._subscribed = threading.Event()
        self._lock = threading.Lock()
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id="edge-agent-demo-viewer")
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe(f"{self.base}/#", qos=1)
        self.client.on_subscribe = lambda *a: self._subscribed.set()
        self.client.on_message = self._on_message
        self.client.connect(host, port, 30)
        self.client.loop_start()
        if not self._subscribed.wait(10):
            raise EdgeAgentError("demo viewer could not subscribe to the embedded broker")

    def _on_message(self, client, userdata, msg) -> None:
        kind = msg.topic.rsplit("/", 1)[-1]
        with self._lock:
            self.bytes += len(msg.payload)
            if kind == "info":
                self.info = json.loads(msg.payload)
            elif kind == "result":
                doc = json.loads(msg.payload)
                self.results[doc["seq"]] = doc
                self._last_seq = doc["seq"]
            elif kind == "mask":
                decode_mask_png(bytes(msg.payload))  # what any consumer would do
                self.masks += 1
            elif kind == "overlay":
                path = self.out / f"{self.frame_name(getattr(self, '_last_seq', 0))}_overlay.jpg"
                path.write_bytes(msg.payload)
                self.overlays.append(path)
            elif kind == "timings":
                doc = json.loads(msg.payload)
                if "seq" in doc:
                    self.timings[doc["seq"]] = doc["ms"]
                    self._print(doc["seq"])

    def frame_name(self, seq: int) -> str:
        if 1 <= seq <= len(self.frames):
            return Path(self.frames[seq - 1]).stem
        return f"frame_{seq:04d}"

    def _print(self, seq: int) -> None:
        r, t = self.results.get(seq), self.timings.get(seq)
        if not r or not t:
            return
        classes = ", ".join(f"{k} {v * 100:.1f}%" for k, v in list(r["classes"].items())[:4])
        print(f"frame {seq:3d} {r['frame']['w']}x{r['frame']['h']}: {classes:45s} | "
              f"inference {t['inference']:6.1f} ms, end-to-end {t['end_to_end']:6.1f} ms", flush=True)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("demo", help="run the agent on sample images with an embedded broker")
    p.add_argument("--images", help="folder of images (default: the checkout's ../shared/test_data/images)")
    p.add_argument("--model", help="manifest model name (default: the manifest's default)")
    p.add_argument("--mirror", help="local folder holding the model files (default: ../shared when present)")
    p.add_argument("--out", default="demo-out", help="where overlays are written (default: ./demo-out)")
    add_runtime_option(p)
    p.add_argument("--set", dest="overrides", metavar="SECTION.KEY=VALUE", action="append", default=[],
                   help="override a key of the demo's agent config, e.g. homeassistant.enabled=true "
                        "with mqtt.host/mqtt.port of the broker Home Assistant uses")
    p.set_defaults(func=run)


def run(args) -> int:
    if args.images:
        images = Path(args.images)
    elif SHARED is not None and (SHARED / "images").is_dir():
        images = SHARED / "images"
    else:
        raise EdgeAgentError("no sample images here (they come with a checkout's ../shared/test_data): "
                             "pass --images DIR")
    if not images.is_dir():
        raise EdgeAgentError(f"{images}: no such image folder (pass --images DIR)")
    manifest = catalog.load_manifest()
    entry = manifest.get(args.model or manifest.default)
    mirror = args.mirror or (str(SHARED / "models") if SHARED is not None and (SHARED / "models").is_dir() else None)
    model_path = catalog.fetch(entry, mirror=mirror)
    print(f"model   {entry.name} ({model_path}, sha256 verified)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # The demo's agent keeps no state: its model store lives and dies with the run.
    with EmbeddedBroker() as broker, tempfile.TemporaryDirectory(prefix="edge-agent-demo-") as state:
        print(f"broker  {broker.kind} on {broker.host}:{broker.port}")
        config = load_config(None, [
            f"agent.device_id={DEVICE}", f"agent.state_dir={state}", "source.kind=folder", f"source.uri={images}",
            "source.loop=false", f"model.path={model_path}", f"model.runtime={args.runtime}",
            f"mqtt.host={broker.host}", f"mqtt.port={broker.port}",
            "mqtt.protocol=auto", "publish.timings=frame", "publish.overlay=true",
            "publish.overlay_max_hz=0", "publish.mask_resolution=model",
            *args.overrides,  # e.g. homeassistant.enabled=true + the broker Home Assistant uses
        ], env={})
        readable = [p for p in list_images(str(images)) if read_rgb(p) is not None]  # what the source reads
        viewer = Viewer(config.mqtt.host, config.mqtt.port, config.mqtt.topic_prefix, out, readable)
        try:
            agent = Agent(config)  # model.path is the fetched file; its labels come from the manifest
            code = agent.run()
            if agent.error:
                raise EdgeAgentError(agent.error)
            import time
            time.sleep(0.5)  # let the last messages arrive
        finally:
            viewer.close()
    info = viewer.info or {}
    frames = len(viewer.timings)
    inference = [t["inference"] for t in viewer.timings.values()]
    mean = sum(inference) / len(inference) if inference else float("nan")
    print(f"\n{frames} frames, {viewer.masks} masks received over MQTT ({viewer.bytes / 1e3:.0f} kB); "
          f"runtime {info.get('runtime')} {info.get('runtime_version')}, mean inference {mean:.1f} ms")
    print(f"overlays written to {out}/ ({len(viewer.overlays)} files)")
    return code if frames else 1
