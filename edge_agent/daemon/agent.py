"""The daemon: config -> source + segmenter + pipeline -> MQTT, under systemd.

``edge-agent run --config /etc/edge-agent/config.toml``. The agent keeps serving what it can: a
broker that is down is retried in the background, a camera that disappears is reopened, a model
that cannot load leaves the agent online (reporting the error in ``info``/``stats``) so that a
fixed config (SIGHUP) or a deployment can bring it back.

sd_notify: ``READY=1`` once the model is loaded and the first frame is processed (or at once when
the agent is up but cannot run a pipeline), ``WATCHDOG=1`` only while frames make progress (or
while idle by design), ``STATUS=`` with fps, ``RELOADING=1`` on SIGHUP, ``STOPPING=1`` on SIGTERM.
The watchdog is fed from ONE place, the main loop, when :meth:`Pipeline.healthy` says so.

Who owns what: the running model and the store are the :class:`ModelManager`'s; MQTT commands
are served by the handlers of the table given to the constructor (:data:`edge_agent.remote.HANDLERS`
by default), each built with a narrow :class:`~edge_agent.remote.context.HandlerContext`.
"""

from __future__ import annotations

import dataclasses
import logging
import signal
import threading
import time
from typing import Any, Dict, List, Optional, Sequence

from edge_agent import __version__
from edge_agent.config import Config, mask_url_secrets
from edge_agent import system
from edge_agent.daemon import sdnotify
from edge_agent.daemon.model_manager import ModelManager
from edge_agent.daemon.pipeline import CameraSource, Pipeline, PipelineSettings
from edge_agent.errors import ConfigError, EdgeAgentError
from edge_agent.inference import layout as inference_layout
from edge_agent.inference.segmenter import Segmenter
from edge_agent.models.classes import watched_classes
from edge_agent.remote import HANDLERS
from edge_agent.remote.context import CommandHandler, HandlerContext, HandlerTable, PipelineControl, Route
from edge_agent.sources import open_source

log = logging.getLogger(__name__)

STARTUP_GRACE_S = 60.0


def _source_state(source: Any) -> Optional[str]:
    """``open``/``down``/... of a reopening source (None for one without stats)."""
    stats = getattr(source, "stats", None)
    return stats().get("state") if callable(stats) else None


class NullSink:
    """Where results go when MQTT is disabled (``mqtt.enabled = false``): counted, not sent."""

    def __init__(self) -> None:
        self.published = 0

    def publish(self, suffix: str, payload: Any, qos: Optional[int] = None, retain: bool = False) -> bool:
        self.published += 1
        return True

    def set_info(self, info: Dict[str, Any]) -> None:
        pass

    def add_command_handler(self, *args: Any, **kwargs: Any) -> None:
        pass

    def start(self) -> None:
        pass

    def stop(self, timeout: float = 0) -> None:
        pass

    def stats(self) -> Dict[str, Any]:
        return {"enabled": False}

    def outbox_stats(self) -> Dict[str, Any]:
        return {"enabled": False}


def make_comms(config: Config):
    if not config.mqtt.enabled:
        return NullSink()
    from edge_agent.comms.mqtt import MqttComms
    from edge_agent.comms.outbox import open_outbox

    comms = MqttComms(config.mqtt, config.agent.device_id, outbox=open_outbox(config))
    if config.homeassistant.enabled:  # HOOK: Home Assistant discovery wraps the comms (all logic there)
        from edge_agent.comms.homeassistant import HomeAssistantBridge

        comms = HomeAssistantBridge(comms, config)
    return comms


def tls_material(config: Config) -> tuple:
    """What the comms' TLS context was built from (the files' contents; () without TLS)."""
    if not config.mqtt.enabled or not config.mqtt.tls:
        return ()
    from edge_agent.comms.tls import tls_material as material  # paho only when MQTT is on

    return material(config.mqtt)


class Agent:
    def __init__(self, config: Config, install_signals: bool = True, handlers: HandlerTable = HANDLERS,
                 config_path: Optional[str] = None, config_overrides: Sequence[str] = ()) -> None:
        config, self.layout = inference_layout.apply(config)  # model.interpreters/threads 0 = chosen
        self.config = config
        self.config_path = config_path  # what a reload (SIGHUP) reads again
        self.config_overrides = tuple(config_overrides)
        self.install_signals = install_signals
        self.comms = make_comms(config)
        self._tls_material = tls_material(config)  # the TLS files' contents the comms were built with
        self.pipeline: Optional[Pipeline] = None
        self.models = ModelManager(config, self)
        self.error: Optional[str] = None
        self._stop = threading.Event()
        self._reload = threading.Event()
        self._ready_sent = False
        self._stopped = False  # after a clean stop: info says "stopped"
        self._started_at = time.time()
        # Model load and the first frame may take long on a Pi Zero: ping during a grace period.
        self.watchdog = sdnotify.Watchdog(startup_grace_s=STARTUP_GRACE_S)
        self._handler_table = handlers
        self.handlers: Dict[str, CommandHandler] = {}
        self._routes: List[Route] = []
        self.exit_code = 0

    @property
    def segmenter(self) -> Optional[Segmenter]:
        """The running model (the model manager's)."""
        return self.models.running

    # -- lifecycle ------------------------------------------------------------------------------
    def request_stop(self, *_: Any) -> None:
        self._stop.set()

    def request_reload(self, *_: Any) -> None:
        self._reload.set()

    def start_handlers(self) -> None:
        """Build every handler of the table and subscribe its routes (kept across comms reloads)."""
        ctx = HandlerContext(config=lambda: self.config, comms=lambda: self.comms, models=self.models,
                             pipeline=PipelineControl(lambda: self.pipeline), info=self.info)
        for name, factory in self._handler_table.items():
            handler = factory(ctx)
            if handler is None:
                log.info("command handler %s is disabled", name)
                continue
            self.handlers[name] = handler
            for route in handler.routes():
                self._routes.append(route)
                self.comms.add_command_handler(route.command, route.callback, subtree=route.subtree)

    def _stop_handlers(self, reason: str) -> None:
        """Each handler gets its final answers out: before the comms stop."""
        for name, handler in self.handlers.items():
            try:
                handler.shutdown(reason)
            except Exception:  # stopping must go on
                log.exception("command handler %s: shutdown failed", name)

    def run(self) -> int:
        if self.install_signals:
            signal.signal(signal.SIGTERM, self.request_stop)
            signal.signal(signal.SIGINT, self.request_stop)
            signal.signal(signal.SIGHUP, self.request_reload)
        self.models.open_store()  # repairs it: an unconfirmed deployment is rolled back first
        self.start_handlers()  # before connecting: the first CONNACK subscribes every route
        self.comms.start()
        self.watchdog.start()
        try:
            self.start_pipeline()
            self._main_loop()
        finally:
            sdnotify.stopping("stopping")
            self._stop_handlers("agent stopping")
            if self.pipeline is not None:
                log.info("pipeline totals: %s", self.pipeline.stats())
            self.stop_pipeline()
            self.watchdog.stop()
            self._stopped = True
            self.publish_info()  # the retained info says "stopped" (before the comms' offline)
            self.comms.stop()
        return self.exit_code

    def _main_loop(self) -> None:
        last_status = 0.0
        while not self._stop.wait(0.5):
            if self._reload.is_set():
                self._reload.clear()
                self._do_reload()
            pipeline = self.pipeline
            if pipeline is None:
                self.watchdog.progress()  # idle by design (no model/source): alive, not stuck
            elif pipeline.finished:
                log.info("the source has ended: exiting")
                break
            elif pipeline.healthy(self.config.model.inference_timeout_s):
                self.watchdog.progress()  # waiting for frames, paused, or inferring in time
            elif pipeline.stuck_for():
                log.error("inference stuck for %.0f s: withholding the watchdog", pipeline.stuck_for())
            now = time.monotonic()
            if now - last_status >= 5.0:
                last_status = now
                sdnotify.status(self.status_text())

    def status_text(self) -> str:
        if self.pipeline is None:
            return f"idle: {self.error or 'no pipeline'}"
        cameras = self.pipeline.cameras
        down = [(cid, src) for cid, src in cameras if _source_state(src) == "down"]
        if len(cameras) == 1 and down:
            return f"waiting for the source: {mask_url_secrets(down[0][1].stats().get('last_error', ''))}"
        waiting = f", waiting for camera {', '.join(cid for cid, _ in down)}" if down else ""
        return f"{self.pipeline.fps:.1f} fps, dropped {sum(self.pipeline.dropped().values())}{waiting}"

    def start_pipeline(self, segmenter: Optional[Segmenter] = None) -> None:
        """Open the source and run ``segmenter`` (default: the model manager loads the start-up
        model); on failure stay up and report the error."""
        self.error = None
        try:
            if segmenter is None:
                segmenter = self.models.load()
            # The model size lets picamera2 size its lores stream so the ISP does the downscale.
            # Not strict: a source that cannot be opened now (camera not plugged in, stream or
            # folder not there yet) is retried with the same backoff as one lost mid-run, and
            # stats say so; only settings that can never work are refused here.
            cameras = self._open_cameras(segmenter)
        except EdgeAgentError as exc:
            self.error = mask_url_secrets(str(exc))  # published in info: no URL password
            log.error("cannot start the pipeline: %s", self.error)
            self.publish_info()
            self._notify_ready()  # up, serving what it can (MQTT, commands); STATUS says why idle
            return
        settings = PipelineSettings.from_config(self.config)
        settings.lossless = bool(cameras[0].lossless)
        self.pipeline = Pipeline(cameras, segmenter, self.comms, settings, on_first_frame=self._notify_ready,
                                 extra_stats=lambda: {"mqtt": self.comms.stats(), "outbox": self.comms.outbox_stats()})
        info = self.info()
        self.comms.set_info(info)
        self.pipeline.start()
        # the model's name as info shows it (the store's name: a stored file is <sha256>.tflite)
        interpreters = settings.interpreters
        names = [f"{c.id}: " * bool(c.id) + mask_url_secrets(getattr(c.source, "name", "?")) for c in cameras]
        log.info("running %s (%s) on %s with %s%s", info["model"]["name"], info["model"]["sha256"][:12],
                 ", ".join(names), segmenter.describe_runtime(),
                 f", {interpreters} interpreters side by side" if interpreters > 1 else "")
        if all(_source_state(c.source) == "down" for c in cameras):
            self._notify_ready()  # up and retrying the source: STATUS says so, the watchdog is fed

    def _open_cameras(self, segmenter: Segmenter) -> List[CameraSource]:
        """Every camera's source, opened (not strict: one that cannot be opened now is retried
        with backoff while the others run). Cameras and streams run in real time, as the opened
        source declares (``live``); files, folders and the test pattern at fps 0 frame by frame."""
        opened: List[CameraSource] = []
        try:
            for cam in self.config.camera_list():
                try:
                    # The model size lets picamera2 size its lores stream so the ISP does the downscale.
                    source = open_source({**dataclasses.asdict(cam), "model_input": segmenter.model.input_size},
                                         strict=False)
                except EdgeAgentError as exc:
                    if not cam.id:
                        raise
                    raise EdgeAgentError(f"camera {cam.id}: {exc}") from None
                opened.append(CameraSource(cam.id, source, lossless=cam.fps == 0 and not source.live))
        except BaseException:
            for done in opened:
                done.source.close()
            raise
        return opened

    def stop_pipeline(self, reason: Optional[str] = None) -> None:
        """Stop the pipeline; ``reason`` (why the agent is idle now) goes to ``info.error``."""
        if self.pipeline is not None:
            self.pipeline.stop()
            self.pipeline = None
        if reason is not None:
            self.error = mask_url_secrets(reason)

    def _notify_ready(self) -> None:
        if not self._ready_sent:
            self._ready_sent = True
            sdnotify.ready(self.status_text())

    def _do_reload(self) -> None:
        from edge_agent.config import load_config

        sdnotify.reloading("reloading config")
        try:
            new = load_config(self.config_path, self.config_overrides)
        except EdgeAgentError as exc:
            log.error("reload refused, keeping the running config: %s", "; ".join(
                exc.errors if isinstance(exc, ConfigError) else [str(exc)]))
            sdnotify.ready(self.status_text())
            return
        log.info("reloading the configuration")
        new, self.layout = inference_layout.apply(new)
        self.stop_pipeline()
        material = tls_material(new)  # same paths, new files (a renewed certificate) count too
        if material != self._tls_material and new.mqtt == self.config.mqtt:
            log.info("the MQTT TLS files changed: reconnecting with them")
        if (new.mqtt != self.config.mqtt or new.agent.device_id != self.config.agent.device_id
                or new.homeassistant != self.config.homeassistant or material != self._tls_material
                or new.outbox != self.config.outbox):
            self._tls_material = material
            self.comms.stop()
            self.config = new
            self.comms = make_comms(new)
            for route in self._routes:
                self.comms.add_command_handler(route.command, route.callback, subtree=route.subtree)
            self.comms.start()
        self.config = new
        self.models.set_config(new)
        self.start_pipeline()
        sdnotify.ready(self.status_text())

    # -- what the agent tells the world ---------------------------------------------------------
    def info(self) -> Dict[str, Any]:
        cams = self.config.camera_list()
        doc: Dict[str, Any] = {
            "agent_version": __version__,
            "device_id": self.config.agent.device_id,
            "tags": list(self.config.agent.tags),
            "started_at": round(self._started_at, 3),
            "status": "stopped" if self._stopped else "running" if self.pipeline is not None else "error",
            "error": self.error,
            "source": {"kind": cams[0].kind, "uri": mask_url_secrets(cams[0].uri)},
            "cameras": [{"id": c.id, "kind": c.kind, "uri": mask_url_secrets(c.uri), "width": c.width,
                         "height": c.height, "fps": c.fps, "classes": list(c.classes)} for c in cams],
            "host": system.host_info(),
            "publish": {"mask_resolution": self.config.publish.mask_resolution,
                        "timings": self.config.publish.timings},
        }
        segmenter = self.segmenter
        if segmenter is not None:
            i = segmenter.info()
            doc["model"] = {k: i[k] for k in ("name", "sha256", "size_bytes", "input_size", "input_dtype",
                                              "output_kind", "output_dtype", "labels", "preprocess",
                                              "fallback_reason", "classes", "normalization", "output")}
            doc.update(runtime=i["runtime"], runtime_version=i["runtime_version"],
                       delegate=i["delegate"], threads=i["threads"], interpreters=self.config.model.interpreters,
                       layout=self.layout.to_dict())
        # per camera the classes it watches: its own, else [homeassistant] classes, else the default
        labels = (doc.get("model") or {}).get("labels")
        for cam, entry in zip(cams, doc["cameras"]):
            entry["watched"] = watched_classes(labels, cam.classes or self.config.homeassistant.classes)[0]
        doc = self.models.info(doc)
        for handler in self.handlers.values():
            doc = handler.info(doc)
        return doc

    def publish_info(self) -> None:
        self.comms.set_info(self.info())
