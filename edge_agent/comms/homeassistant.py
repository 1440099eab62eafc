"""Home Assistant MQTT discovery: the agent appears in Home Assistant as one device with entities.

Opt-in with ``[homeassistant] enabled = true``. :class:`HomeAssistantBridge` wraps the agent's
:class:`~edge_agent.comms.mqtt.MqttComms` (same interface, so the agent and pipeline do not
change) and, from what already flows through it, keeps Home Assistant informed:

* On every (re)connect, and whenever Home Assistant announces ``online`` on
  ``<discovery_prefix>/status``, it publishes retained discovery configs on
  ``<discovery_prefix>/<component>/edge-agent-<device_id>/<object_id>/config``: sensors (fps,
  inference ms, end-to-end ms, CPU temperature, dropped frames, running model, last benchmark
  p50), per exposed class a sensor (pixel %) and a binary_sensor (present at >=
  ``min_fraction``), an ``image`` fed by the ``overlay`` JPEG topic, and a button that sends a
  default ``cmd/benchmark`` request. All share the agent's ``availability`` topic.
* Entity states come from ONE small retained JSON topic, ``<prefix>/<device>/ha/state``,
  refreshed at most every ``state_interval_s`` from the latest result/timings/stats: Home
  Assistant does not re-render ~40 templates at the frame rate, and a retained state is there
  when it subscribes (~5 s after the last discovery message). The last finished benchmark goes
  to the retained ``<prefix>/<device>/ha/benchmark``.
* Configs under this device's node id that it no longer announces (classes of a previous model)
  are cleared when seen; :func:`remove_entities` clears them all (``edge-agent homeassistant
  --remove``, ``edge-agent service uninstall``).

The agent publishes nothing outside its own topics except its own discovery configs; Home
Assistant, not the agent, publishes the button's command. Object ids of class entities come from
class names in their own namespace, so entity ids are stable across models and never collide with
the device-level ones (``sensor.<device>_class_person``, a class ``fps`` is
``sensor.<device>_class_fps``, not ``sensor.<device>_fps``). Unique ids are distinct for distinct
device ids (:func:`device_key`), and the state templates use bracket access (a class ``3d_object``:
``value_json['classes']['3d_object']``, which the dotted form cannot spell).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import threading
import time
from typing import Any, Dict, Iterable, List, Optional, Sequence, Set, Tuple

from edge_agent import __version__
from edge_agent.config import Config
from edge_agent.errors import EdgeAgentError

log = logging.getLogger(__name__)

STATE = "ha/state"
BENCHMARK = "ha/benchmark"
MANUFACTURER = "edge-agent"
# A benchmark with the request's defaults; HA renders the template at each press, so every press
# has its own request id (the agent ignores a repeated id as an MQTT retransmission).
BUTTON_COMMAND_TEMPLATE = '{"request_id": "ha-{{ (now().timestamp() * 1000) | int }}"}'
ANNOUNCE_TIMEOUT_S = 30.0  # waiting for room in the in-flight window, per message
REMOVE_QUIET_S = 0.5  # after the retained configs stop arriving, they are all in
REMOVE_TIMEOUT_S = 10.0


def jinja_string(text: str) -> str:
    """``text`` as a single-quoted Jinja string literal (backslashes and quotes escaped)."""
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def value_template(*path: str) -> str:
    """``{{ value_json['classes']['3d_object'] }}``: bracket access, valid for any key (a dotted
    ``value_json.classes.3d_object`` is a Jinja syntax error)."""
    return "{{ value_json%s }}" % "".join(f"[{jinja_string(key)}]" for key in path)


# key -> (component, name, state template, extra config): the device-level entities.
METRICS: Dict[str, Tuple[str, str, Optional[str], Dict[str, Any]]] = {
    "fps": ("sensor", "Frame rate", value_template("fps"),
            {"unit_of_measurement": "fps", "state_class": "measurement", "icon": "mdi:speedometer"}),
    "inference_time": ("sensor", "Inference time", value_template("inference_ms"),
                       {"unit_of_measurement": "ms", "device_class": "duration", "state_class": "measurement",
                        "suggested_display_precision": 1}),
    "end_to_end_time": ("sensor", "End-to-end time", value_template("end_to_end_ms"),
                        {"unit_of_measurement": "ms", "device_class": "duration", "state_class": "measurement",
                         "suggested_display_precision": 1}),
    "cpu_temperature": ("sensor", "CPU temperature", value_template("cpu_temp_c"),
                        {"unit_of_measurement": "°C", "device_class": "temperature", "state_class": "measurement",
                         "entity_category": "diagnostic"}),
    "dropped_frames": ("sensor", "Dropped frames", value_template("dropped"),
                       {"state_class": "total_increasing", "icon": "mdi:image-off", "entity_category": "diagnostic"}),
    "model": ("sensor", "Model", value_template("model"), {"icon": "mdi:brain", "entity_category": "diagnostic"}),
    "benchmark_p50": ("sensor", "Benchmark p50", value_template("p50_ms"),
                      {"unit_of_measurement": "ms", "device_class": "duration", "state_class": "measurement",
                       "entity_category": "diagnostic", "suggested_display_precision": 2}),
    "overlay": ("image", "Overlay", None, {"content_type": "image/jpeg"}),
    "run_benchmark": ("button", "Run benchmark", None, {"icon": "mdi:timer-play", "entity_category": "diagnostic"}),
}


def slug(name: str) -> str:
    """A class or device name as an object id part: lower case, [a-z0-9_] (``dining table`` -> ``dining_table``)."""
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_") or "class"


def node_id(device_id: str) -> str:
    return f"edge-agent-{device_id}"


# Device ids whose unique ids keep their original spelling: lower-case words of letters and digits
# joined by single '-', no word after the first being "class" (see device_key).
_PLAIN_DEVICE_ID = re.compile(r"[a-z0-9]+(-(?!class(-|$))[a-z0-9]+)*")
DEVICE_HASH_CHARS = 10


def device_key(device_id: str) -> str:
    """The device part of every unique id: distinct for distinct device ids.

    ``pi-1`` -> ``pi_1`` (the slug, as before: hostname-style ids keep their unique ids); any other
    id (``pi_1``, ``Pi-1``, ``a--b``, ``cam-class``) -> its slug, ``-`` and the first 10 hex digits of
    the SHA-256 of the exact id (``pi_1-8e2a...``). A slug has no ``-``, so the two forms never meet;
    a plain id's slug maps back to the id (``_`` -> ``-``); and no unique id ``<plain slug>_<key>``
    equals another ``<plain slug>_<key>``, because that needs one id to be another plus a word
    ``class`` (``cam`` + ``class_fps`` = ``cam-class`` + ``fps``), which is not plain.
    """
    if _PLAIN_DEVICE_ID.fullmatch(device_id):
        return slug(device_id)
    return f"{slug(device_id)}-{hashlib.sha256(device_id.encode()).hexdigest()[:DEVICE_HASH_CHARS]}"


def class_slugs(names: Sequence[str]) -> List[Tuple[str, str]]:
    """(class name, unique slug) in label order; a slug taken by an earlier class gets ``_<n>``."""
    out: List[Tuple[str, str]] = []
    taken: Set[str] = set()
    for name in names:
        base = candidate = slug(name)
        n = 2
        while candidate in taken:
            candidate, n = f"{base}_{n}", n + 1
        taken.add(candidate)
        out.append((name, candidate))
    return out


def exposed_classes(labels: Optional[Sequence[str]], wanted: Sequence[str]) -> Tuple[List[str], List[str]]:
    """(classes to expose, configured names the model does not have): ``wanted`` empty = all labels."""
    if not labels:
        return [], list(wanted)
    if not wanted:
        return list(labels), []
    known = set(labels)
    return [c for c in wanted if c in known], [c for c in wanted if c not in known]


class Discovery:
    """The discovery configs of one device: pure data, built from config + the info document."""

    def __init__(self, config: Config, device_id: str, info: Optional[Dict[str, Any]]) -> None:
        self.ha = config.homeassistant
        self.device_id = device_id
        self.node = node_id(device_id)
        self.base = f"{config.mqtt.topic_prefix}/{device_id}"
        self.info = info or {}
        model = self.info.get("model") or {}
        names, self.unknown = exposed_classes(model.get("labels"), self.ha.classes)
        self.classes = class_slugs(names)

    def topic(self, component: str, object_id: str) -> str:
        return f"{self.ha.discovery_prefix}/{component}/{self.node}/{object_id}/config"

    def device(self) -> Dict[str, Any]:
        host = self.info.get("host") or {}
        return {"identifiers": [self.node], "name": self.device_id, "manufacturer": MANUFACTURER,
                "model": host.get("board") or host.get("machine") or "edge-agent",
                "sw_version": str(self.info.get("agent_version") or __version__)}

    def _common(self, key: str, name: str) -> Dict[str, Any]:
        """``key`` is unique within the device and names the unique id, the topic and the entity id:
        a class ``person`` is ``class_person`` (``sensor.<device>_class_person``)."""
        return {
            "name": name,
            "unique_id": f"edge_agent_{device_key(self.device_id)}_{key}",
            "object_id": f"{slug(self.device_id)}_{key}",
            "availability_topic": f"{self.base}/availability",
            "device": self.device(),
            "origin": {"name": "edge-agent", "sw_version": __version__},
        }

    def configs(self) -> Dict[str, Dict[str, Any]]:
        """Discovery topic -> config payload, for every entity of this device."""
        out: Dict[str, Dict[str, Any]] = {}
        for key, (component, name, template, extra) in METRICS.items():
            doc = self._common(key, name)
            doc.update(extra)
            if component == "sensor":
                topic = BENCHMARK if key == "benchmark_p50" else STATE
                doc.update(state_topic=f"{self.base}/{topic}", value_template=template)
                if key == "benchmark_p50":
                    doc["json_attributes_topic"] = f"{self.base}/{BENCHMARK}"
            elif component == "image":
                doc["image_topic"] = f"{self.base}/overlay"
            elif component == "button":
                doc.update(command_topic=f"{self.base}/cmd/benchmark",  # commands: QoS 1, not retained
                           command_template=BUTTON_COMMAND_TEMPLATE, retain=False, qos=1)
            out[self.topic(component, key)] = doc
        for name, key in self.classes:
            sensor = self._common(f"class_{key}", name)
            sensor.update(state_topic=f"{self.base}/{STATE}", unit_of_measurement="%",
                          state_class="measurement", suggested_display_precision=1,
                          value_template=value_template("classes", key), icon="mdi:image-filter-center-focus")
            out[self.topic("sensor", f"class_{key}")] = sensor
            present = self._common(f"class_{key}", name)
            present.update(state_topic=f"{self.base}/{STATE}", device_class="occupancy",
                           value_template=value_template("present", key))
            out[self.topic("binary_sensor", f"class_{key}")] = present
        return out

    def state(self, fractions: Dict[str, float], metrics: Dict[str, Any]) -> Dict[str, Any]:
        """The ``ha/state`` document: metrics, class % and presence (ON/OFF) by class slug."""
        classes = {key: round(100.0 * fractions.get(name, 0.0), 2) for name, key in self.classes}
        present = {key: "ON" if fractions.get(name, 0.0) >= self.ha.min_fraction else "OFF"
                   for name, key in self.classes}
        model = (self.info.get("model") or {}).get("name")
        return {**metrics, "model": model, "classes": classes, "present": present}


def config_topic_filter(discovery_prefix: str, device_id: str) -> str:
    """Every discovery config topic of this device."""
    return f"{discovery_prefix}/+/{node_id(device_id)}/+/config"


def _loads(payload: Any) -> Optional[Dict[str, Any]]:
    if payload is None:
        return None
    try:
        doc = json.loads(payload)
    except (TypeError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


def metrics_from(timings: Optional[Dict[str, Any]], stats: Optional[Dict[str, Any]],
                 cpu_temp_c: Optional[float]) -> Dict[str, Any]:
    """fps, inference/end-to-end ms, dropped frames from the agent's latest timings/stats documents."""
    out: Dict[str, Any] = {"fps": None, "inference_ms": None, "end_to_end_ms": None, "dropped": None,
                           "cpu_temp_c": cpu_temp_c}
    for doc in (stats, timings):  # timings (every few s) is fresher than stats (every 30 s)
        if not doc:
            continue
        if doc.get("fps") is not None:
            out["fps"] = doc["fps"]
        if isinstance(doc.get("dropped"), dict):
            out["dropped"] = sum(int(v) for v in doc["dropped"].values())
    if timings:
        stages, ms = timings.get("stages"), timings.get("ms")
        for stage, key in (("inference", "inference_ms"), ("end_to_end", "end_to_end_ms")):
            if isinstance(stages, dict) and isinstance(stages.get(stage), dict):
                out[key] = stages[stage].get("mean")
            elif isinstance(ms, dict) and stage in ms:
                out[key] = ms[stage]
            if out[key] is not None:
                out[key] = round(float(out[key]), 2)
    if stats and out["cpu_temp_c"] is None:
        out["cpu_temp_c"] = stats.get("cpu_temp_c")
    return out


class HomeAssistantBridge:
    """The agent's comms with Home Assistant discovery on top (see the module docstring).

    Everything not defined here is the wrapped comms' own attribute, so the agent, pipeline
    and command plugins use it exactly like ``MqttComms``.
    """

    def __init__(self, comms: Any, config: Config, cpu_temp=None) -> None:
        self._comms = comms
        self.config = config
        self.ha = config.homeassistant
        self._device_id = config.agent.device_id
        if cpu_temp is None:
            from edge_agent.system import cpu_temp_c as cpu_temp
        self._cpu_temp = cpu_temp
        self._lock = threading.Lock()
        self._discovery = Discovery(config, self._device_id, None)
        self._announced: Set[str] = set()
        self._retained: Set[str] = set()  # this node's config topics the broker holds (as seen)
        self._to_clear: Set[str] = set()  # seen, not announced: cleared by the announcer
        self._announce_wanted = False
        self._closing = False
        self._wake = threading.Event()
        self._have_info = False
        self._latest: Dict[str, Any] = {}
        self._next_state = 0.0
        self.announcements = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._comms, name)

    # -- lifecycle (the agent calls these as on MqttComms) ----------------------------------
    def start(self) -> None:
        threading.Thread(target=self._announcer, name="homeassistant-announcer", daemon=True).start()
        self._comms.add_listener(f"{self.ha.discovery_prefix}/status", self._on_ha_status)
        self._comms.add_listener(config_topic_filter(self.ha.discovery_prefix, self._device_id),
                                 self._on_config_seen)
        self._comms.add_connect_callback(self.announce)
        self._comms.start()

    def stop(self, *args: Any, **kwargs: Any) -> None:
        self._closing = True
        self._wake.set()
        self._comms.stop(*args, **kwargs)

    def set_info(self, info: Dict[str, Any]) -> None:
        """The agent's info document: the model and labels decide the class entities."""
        self._comms.set_info(info)
        discovery = Discovery(self.config, self._device_id, info)
        for name in discovery.unknown:
            log.warning("homeassistant.classes: %r is not a class of model %s (its labels: %s)", name,
                        (info.get("model") or {}).get("name"), ", ".join((info.get("model") or {}).get("labels") or []))
        if not discovery.classes and (info.get("model") or {}).get("name"):
            if not (info.get("model") or {}).get("labels"):
                log.warning("homeassistant: model %s has no labels: no class entities (set model.labels)",
                            info["model"]["name"])
        with self._lock:
            changed = not self._have_info or discovery.configs() != self._discovery.configs()
            self._discovery, self._have_info = discovery, True
        if changed and self._comms.connected:
            self.announce()

    # -- announcing ---------------------------------------------------------------------------
    def announce(self) -> None:
        """Have every discovery config (retained) and then the state published, by the announcer
        thread: never on paho's network thread, which must keep reading acknowledgements while
        hundreds of configs (one model of 150 classes: 309) wait for room in the in-flight window."""
        with self._lock:
            self._announce_wanted = True
        self._wake.set()

    def _announcer(self) -> None:
        while True:
            self._wake.wait()
            self._wake.clear()
            if self._closing:
                return
            with self._lock:
                wanted, self._announce_wanted = self._announce_wanted, False
                clear, self._to_clear = sorted(self._to_clear), set()
            if wanted:
                self._announce_now()
            else:
                for topic in clear:
                    self._send(topic, b"")

    def _announce_now(self) -> int:
        with self._lock:
            if not self._have_info:
                return 0  # the model (and so the classes) is not known yet: announced with the info
            discovery = self._discovery
            configs = discovery.configs()
            stale = sorted((self._announced | self._retained | self._to_clear) - set(configs))
            self._announced, self._to_clear = set(configs), set()
            self.announcements += 1
        messages = [(topic, b"") for topic in stale] + list(configs.items())
        for n, (topic, payload) in enumerate(messages):
            if not self._send(topic, payload):
                log.warning("Home Assistant discovery interrupted after %d of %d messages (broker away); "
                            "announcing again at the next connection", n, len(messages))
                return n
        log.info("Home Assistant discovery: %d entities announced under %s/+/%s (%d classes), %d removed",
                 len(configs), self.ha.discovery_prefix, discovery.node, len(discovery.classes), len(stale))
        self._publish_state(force=True)
        return len(configs)

    def _send(self, topic: str, payload: Any) -> bool:
        """Publish one retained config, waiting for room in the in-flight window; False when the
        connection is gone or does not drain within ANNOUNCE_TIMEOUT_S."""
        deadline = time.monotonic() + ANNOUNCE_TIMEOUT_S
        delay = 0.005
        while not self._comms.publish_topic(topic, payload, qos=1, retain=True):
            if self._closing or not self._comms.connected or time.monotonic() > deadline:
                return False
            time.sleep(delay)
            delay = min(2 * delay, 0.2)
        return True

    def _on_ha_status(self, topic: str, payload: bytes, retained: bool) -> None:
        if payload.strip().lower() == b"online":
            log.info("Home Assistant is online: announcing again")
            self.announce()

    def _on_config_seen(self, topic: str, payload: bytes, retained: bool) -> None:
        """A config of this device's node id that is not announced now (a previous model's
        class) is cleared; our own announcements echo back and are left alone."""
        with self._lock:
            if payload:
                self._retained.add(topic)
            else:
                self._retained.discard(topic)
            stale = self._have_info and bool(payload) and topic not in self._announced
        if stale:
            log.info("Home Assistant discovery: removing stale entity %s", topic)
            with self._lock:
                self._to_clear.add(topic)
            self._wake.set()

    # -- state ------------------------------------------------------------------------------
    def publish(self, suffix: str, payload: Any, qos: Optional[int] = None, retain: bool = False) -> bool:
        ok = self._comms.publish(suffix, payload, qos=qos, retain=retain)
        kind = suffix.split("/", 1)[0]
        if kind in ("result", "timings", "stats"):
            with self._lock:
                self._latest[kind] = payload  # parsed only when the state is due
            self._publish_state()
        elif kind == "benchmark" and suffix != "benchmark/_invalid":
            self._benchmark_answer(payload)
        return ok

    def _publish_state(self, force: bool = False) -> None:
        now = time.monotonic()
        with self._lock:
            if not self._have_info or (not force and now < self._next_state):
                return
            self._next_state = now + self.ha.state_interval_s
            latest, discovery = dict(self._latest), self._discovery
        result = _loads(latest.get("result")) or {}
        metrics = metrics_from(_loads(latest.get("timings")), _loads(latest.get("stats")), self._cpu_temp())
        doc = discovery.state(result.get("classes") or {}, metrics)
        self._comms.publish(STATE, doc, qos=1, retain=True)

    def _benchmark_answer(self, payload: Any) -> None:
        doc = _loads(payload)
        if not doc or doc.get("status") != "done" or not isinstance(doc.get("result"), dict):
            return
        result = doc["result"]
        invoke = result.get("invoke") or {}
        model = result.get("model") or {}
        summary = {"p50_ms": invoke.get("p50"), "p90_ms": invoke.get("p90"), "runs": invoke.get("count"),
                   "fps": result.get("fps"), "model": model.get("name") if isinstance(model, dict) else model,
                   "runtime": result.get("runtime"), "request_id": doc.get("request_id"), "ts": doc.get("ts")}
        self._comms.publish(BENCHMARK, summary, qos=1, retain=True)


def remove_entities(config: Config, timeout: float = REMOVE_TIMEOUT_S) -> List[str]:
    """Clear (empty retained payload) every discovery config of this device; returns the topics."""
    return list(retained_configs(config, clear=True, timeout=timeout))


def retained_configs(config: Config, clear: bool = False, timeout: float = REMOVE_TIMEOUT_S) -> Dict[str, bytes]:
    """The discovery configs the broker holds for this device (topic -> payload); ``clear``
    replaces each by an empty retained payload, which removes the entity from Home Assistant.

    Connects with the agent's ``[mqtt]`` settings and collects the retained configs under this
    device's node id (all of them, whatever model announced them); with ``clear`` waits for the
    broker's acknowledgements. EdgeAgentError with the reason when the broker is unusable.
    """
    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion

    from edge_agent.comms.tls import apply_credentials

    m = config.mqtt
    found: Dict[str, float] = {}
    payloads: Dict[str, bytes] = {}
    subscribed = threading.Event()
    errors: List[str] = []
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"{m.client_id}-ha-remove",
                         protocol=paho.MQTTv311)
    apply_credentials(client, m)
    topic_filter = config_topic_filter(config.homeassistant.discovery_prefix, config.agent.device_id)

    def on_connect(c, userdata, flags, reason, props) -> None:
        if reason.is_failure:
            errors.append(f"broker refused the connection: {reason}")
            subscribed.set()
        else:
            c.subscribe(topic_filter, qos=1)

    def on_message(c, userdata, msg) -> None:
        if msg.retain and msg.payload:
            found[msg.topic] = time.monotonic()
            payloads[msg.topic] = bytes(msg.payload)

    client.on_connect = on_connect
    client.on_subscribe = lambda *a: subscribed.set()
    client.on_message = on_message
    try:
        client.connect(m.host, m.port, m.keepalive)
    except OSError as exc:
        raise EdgeAgentError(f"cannot reach the MQTT broker {m.host}:{m.port} (mqtt.host/mqtt.port): {exc}") from None
    client.loop_start()
    try:
        if not subscribed.wait(timeout) or errors:
            raise EdgeAgentError(errors[0] if errors else f"no answer from the MQTT broker {m.host}:{m.port}")
        deadline = time.monotonic() + timeout
        quiet_since = time.monotonic()
        while time.monotonic() < deadline:
            last = max(found.values(), default=quiet_since)
            if time.monotonic() - last >= REMOVE_QUIET_S:
                break
            time.sleep(0.05)
        topics = sorted(payloads)
        infos = [client.publish(topic, b"", qos=1, retain=True) for topic in topics] if clear else []
        for info in infos:
            info.wait_for_publish(max(0.1, deadline - time.monotonic()))
        return {topic: payloads[topic] for topic in topics}
    finally:
        client.disconnect()
        client.loop_stop()


def removal_note(topics: Iterable[str], config: Config) -> str:
    topics = list(topics)
    where = f"{config.homeassistant.discovery_prefix}/+/{node_id(config.agent.device_id)}"
    if not topics:
        return f"no Home Assistant entities under {where} (nothing to remove)"
    return f"removed {len(topics)} Home Assistant entities under {where}"
