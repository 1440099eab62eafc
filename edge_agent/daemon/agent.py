"""The daemon: config -> source + segmenter + pipeline -> MQTT, under systemd.

``edge-agent run --config /etc/edge-agent/config.toml``. The agent keeps serving what it can: a
broker that is down is retried in the background, a camera that disappears is reopened, a model
that cannot load leaves the agent online (reporting the error in ``info``/``stats``) so that a
fixed config (SIGHUP) or a deployment can bring it back.

sd_notify: ``READY=1`` once the model is loaded and the first frame is processed (or at once when
the agent is up but cannot run a pipeline), ``WATCHDOG=1`` only while frames make progress (or
while idle by design), ``STATUS=`` with fps, ``RELOADING=1`` on SIGHUP, ``STOPPING=1`` on SIGTERM.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import signal
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

from edge_agent import __version__

from edge_agent.models import catalog

from edge_agent.daemon import sdnotify

from edge_agent.daemon import system
from edge_agent.config import Config, add_config_arguments, config_from_args
from edge_agent.errors import EdgeAgentError
from edge_agent.daemon.pipeline import Pipeline, PipelineSettings
from edge_agent.inference.segmenter import Segmenter
from edge_agent.sources import build_source, open_source

log = logging.getLogger(__name__)

STARTUP_GRACE_S = 60.0

# Modules that add MQTT command handlers: each has ``install(agent)``.
COMMAND_PLUGINS: Tuple[str, ...] = ("edge_agent.remote.bench", "edge_agent.remote.deploy")


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


def make_comms(config: Config):
    if not config.mqtt.enabled:
        return NullSink()
    from edge_agent.comms.mqtt import MqttComms

    comms = MqttComms(config.mqtt, config.agent.device_id)
    if config.homeassistant.enabled:  # HOOK: Home Assistant discovery wraps the comms (all logic there)
        from edge_agent.comms.homeassistant import HomeAssistantBridge

        comms = HomeAssistantBridge(comms, config)
    return comms


def resolve_model(config: Config) -> Tuple[str, Optional[List[str]]]:
    """The model file and labels to run: ``model.path``, else ``model.name`` from the manifest
    (fetched and verified into ``<state_dir>/catalog`` if needed)."""
    m = config.model
    if not (m.path or m.name):
        raise EdgeAgentError("no model configured: set model.path or model.name")
    if m.path:
        resolved = catalog.resolve(m.path)
    else:  # a manifest name: fetched into the state directory on first start, then offline
        dest = os.environ.get(catalog.ENV_MODELS_DIR) or os.path.join(config.agent.state_dir, "catalog")
        resolved = catalog.ensure(m.name, dest)
    labels: Any = m.labels or resolved.labels
    if labels is None:
        entry = catalog.entry_for_file(resolved.path)
        labels = entry.labels if entry else None
    return resolved.path, labels


def build_segmenter(config: Config, path: str, labels) -> Segmenter:
    m = config.model
    return Segmenter(
        path, labels=labels, runtime=m.runtime, threads=m.threads or None,
        edgetpu=m.edgetpu or None, cpu_fallback=m.cpu_fallback or None, mode=m.preprocess,
    )


def is_live(config: Config) -> bool:
    """Cameras and streams run in real time; files, folders and the test pattern do not."""
    try:
        return bool(getattr(build_source(config.source), "live", config.source.kind == "picamera2"))
    except EdgeAgentError:
        return True


class Agent:
    def __init__(self, config: Config, install_signals: bool = True) -> None:
        self.config = config
        self.install_signals = install_signals
        self.comms = make_comms(config)
        self.pipeline: Optional[Pipeline] = None
        self.segmenter: Optional[Segmenter] = None
        self.error: Optional[str] = None
        self._stop = threading.Event()
        self._reload = threading.Event()
        self._ready_sent = False
        self._started_at = time.time()
        # Model load and the first frame may take long on a Pi Zero: ping during a grace period.
        self.watchdog = sdnotify.Watchdog(startup_grace_s=STARTUP_GRACE_S)
        self.model_resolver: Callable[[Config], Tuple[str, Any]] = resolve_model
        # Plugins add fields to the retained info document (e.g. the model store's pointers).
        self.info_extras: List[Callable[[Dict[str, Any]], Dict[str, Any]]] = []
        self.plugins: List[Any] = []
        self._handlers: List[Tuple[str, Callable[..., None], bool]] = []
        self.exit_code = 0

    # -- lifecycle ------------------------------------------------------------------------------
    def add_command_handler(self, name: str, callback: Callable[..., None], subtree: bool = False) -> None:
        """Subscribe ``cmd/<name>`` (device and fleet); kept across a reload that replaces comms."""
        self._handlers.append((name, callback, subtree))
        self.comms.add_command_handler(name, callback, subtree=subtree)

    def request_stop(self, *_: Any) -> None:
        self._stop.set()

    def request_reload(self, *_: Any) -> None:
        self._reload.set()

    def run(self) -> int:
        if self.install_signals:
            signal.signal(signal.SIGTERM, self.request_stop)
            signal.signal(signal.SIGINT, self.request_stop)
            signal.signal(signal.SIGHUP, self.request_reload)
        self.comms.start()
        for name in COMMAND_PLUGINS:
            plugin = __import__(name, fromlist=["install"]).install(self)
            if plugin is not None:
                self.plugins.append(plugin)
        self.watchdog.start()
        try:
            self.start_pipeline()
            self._main_loop()
        finally:
            sdnotify.stopping("stopping")
            for plugin in self.plugins:  # each running command gets its final answer
                shutdown = getattr(plugin, "shutdown", None)
                if callable(shutdown):
                    try:
                        shutdown()
                    except Exception:  # stopping must go on
                        log.exception("plugin %s shutdown failed", type(plugin).__name__)
            if self.pipeline is not None:
                log.info("pipeline totals: %s", self.pipeline.stats())
            self.stop_pipeline()
            self.watchdog.stop()
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
        return f"{self.pipeline.fps:.1f} fps, dropped {sum(self.pipeline.dropped().values())}"

    def start_pipeline(self) -> None:
        """Load the model and open the source; on failure stay up and report the error."""
        self.error = None
        try:
            self.segmenter = self._load_segmenter()
            # The model size lets picamera2 size its lores stream so the ISP does the downscale.
            source = open_source({**dataclasses.asdict(self.config.source),
                                  "model_input": self.segmenter.model.input_size})
        except EdgeAgentError as exc:
            self.error = str(exc)
            log.error("cannot start the pipeline: %s", exc)
            self.publish_info()
            self._notify_ready()  # up, serving what it can (MQTT, commands); STATUS says why idle
            return
        settings = PipelineSettings.from_config(self.config)
        settings.lossless = self.config.source.fps == 0 and not is_live(self.config)
        self.pipeline = Pipeline(
            source, self.segmenter, self.comms, settings,
            on_progress=self.watchdog.progress, on_first_frame=self._notify_ready,
        )
        self.pipeline.extra_stats = lambda: {"mqtt": self.comms.stats()}
        self.publish_info()
        self.pipeline.start()
        log.info("running %s on %s with %s", self.segmenter.model.file.name,
                 getattr(source, "name", self.config.source.kind), self.segmenter.describe_runtime())

    def _load_segmenter(self) -> Segmenter:
        """The resolver's model (e.g. the model store's current one); if that cannot run any more
        (a runtime upgrade, a lost delegate), the configured model instead of no model at all."""
        path, labels = self.model_resolver(self.config)
        try:
            return build_segmenter(self.config, path, labels)
        except EdgeAgentError as exc:
            if self.model_resolver is resolve_model:
                raise
            fallback_path, fallback_labels = resolve_model(self.config)
            if os.path.realpath(fallback_path) == os.path.realpath(path):
                raise
            log.error("%s; falling back to the configured model %s", exc, fallback_path)
            return build_segmenter(self.config, fallback_path, fallback_labels)

    def stop_pipeline(self) -> None:
        if self.pipeline is not None:
            self.pipeline.stop()
            self.pipeline = None

    def _notify_ready(self) -> None:
        if not self._ready_sent:
            self._ready_sent = True
            sdnotify.ready(self.status_text())

    def _do_reload(self) -> None:
        from edge_agent.config import load_config

        sdnotify.reloading("reloading config")
        source_path = getattr(self, "config_path", None)
        overrides = getattr(self, "config_overrides", ())
        try:
            new = load_config(source_path, overrides)
        except EdgeAgentError as exc:
            log.error("reload refused, keeping the running config: %s", exc)
            sdnotify.ready(self.status_text())
            return
        log.info("reloading the configuration")
        self.stop_pipeline()
        if (new.mqtt != self.config.mqtt or new.agent.device_id != self.config.agent.device_id
                or new.homeassistant != self.config.homeassistant):
            self.comms.stop()
            self.config = new
            self.comms = make_comms(new)
            for name, callback, subtree in self._handlers:
                self.comms.add_command_handler(name, callback, subtree=subtree)
            self.comms.start()
        self.config = new
        self.start_pipeline()
        sdnotify.ready(self.status_text())

    # -- what the agent tells the world ---------------------------------------------------------
    def info(self) -> Dict[str, Any]:
        doc: Dict[str, Any] = {
            "agent_version": __version__,
            "device_id": self.config.agent.device_id,
            "started_at": round(self._started_at, 3),
            "status": "running" if self.pipeline is not None else "error",
            "error": self.error,
            "source": {"kind": self.config.source.kind, "uri": self.config.source.uri},
            "host": system.host_info(),
            "publish": {"mask_resolution": self.config.publish.mask_resolution,
                        "timings": self.config.publish.timings},
        }
        if self.segmenter is not None:
            i = self.segmenter.info()
            doc["model"] = {k: i[k] for k in ("name", "sha256", "size_bytes", "input_size", "input_dtype",
                                              "output_kind", "output_dtype", "labels", "preprocess",
                                              "fallback_reason")}
            doc.update(runtime=i["runtime"], runtime_version=i["runtime_version"],
                       delegate=i["delegate"], threads=i["threads"])
        return doc

    def publish_info(self) -> None:
        doc = self.info()
        for extra in self.info_extras:
            doc = extra(doc)
        self.comms.set_info(doc)


# -- CLI ---------------------------------------------------------------------------------------

def add_parser(subparsers) -> None:
    p = subparsers.add_parser("run", help="run the agent daemon (camera -> segmentation -> MQTT)")
    add_config_arguments(p)
    p.set_defaults(func=_cmd_run)


def _cmd_run(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    if not args.verbose:
        logging.getLogger().setLevel(config.agent.log_level.upper())
    agent = Agent(config)
    agent.config_path = args.config
    agent.config_overrides = args.overrides
    log.info("edge-agent %s starting as device '%s'", __version__, config.agent.device_id)
    return agent.run()
