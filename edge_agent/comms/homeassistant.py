"""Home Assistant MQTT discovery: the agent appears in Home Assistant as one device with entities.

Opt-in with ``[homeassistant] enabled = true``. :class:`HomeAssistantBridge` wraps the agent's
:class:`~edge_agent.comms.mqtt.MqttComms` (same interface, so the agent and pipeline do not
change) and, from what already flows through it, keeps Home Assistant informed:

* A curated entity set (:func:`entities`, at most :func:`max_entities` by default: 15 for one
  camera, 6 + 9 per camera): ``Status`` (running / error / stopped, the reason as an attribute),
  ``Problem``, frame rate, inference and end-to-end time, CPU temperature (only where the host has
  a sensor), and per camera its overlay image and per watched class a presence binary sensor
  ("Person") and a coverage sensor ("Person coverage"). A camera with an id prefixes its entities'
  names with its own ("Door overlay", "Door Person"); a camera that is down makes only its own
  entities unavailable.
* Discovery configs are retained on ``<discovery_prefix>/<component>/edge-agent-<device>/<key>/config``,
  announced on every (re)connect and whenever Home Assistant publishes ``online`` on
  ``<discovery_prefix>/status``. Configs under this node that are not announced now (an earlier
  version's 51 entities, a previous model's classes) are cleared with an empty retained payload.
* Entity states come from ONE small retained JSON topic, ``<prefix>/<device>/ha/state``,
  refreshed at most every ``state_interval_s`` and whenever ``info`` changes.

README "Home Assistant" has the entity table and the story for users.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Set, Tuple

from edge_agent import __version__
from edge_agent.config import Config
from edge_agent.errors import EdgeAgentError
from edge_agent.models.classes import DEFAULT_CLASS_COUNT, compact as _compact, watched_classes
from edge_agent.output.topics import camera_suffix, split_camera_suffix

log = logging.getLogger(__name__)

STATE = "ha/state"
MANUFACTURER = "edge-agent"
DEVICE_ENTITIES = 6  # status, problem, fps, inference, end to end, CPU temperature
CAMERA_ENTITIES = 1 + 2 * DEFAULT_CLASS_COUNT  # the overlay, presence + coverage per default class
MAX_ENTITIES = DEVICE_ENTITIES + CAMERA_ENTITIES  # the default set of a one-camera device: 15
STATUSES = ("running", "error", "stopped")
ANNOUNCE_TIMEOUT_S = 30.0  # waiting for room in the in-flight window, per message
REMOVE_QUIET_S = 0.5  # after the retained configs stop arriving, they are all in
REMOVE_TIMEOUT_S = 10.0

# Label spellings datasets run together (PASCAL VOC) or abbreviate: the key is the label
# lower-cased without separators.
KNOWN_NAMES = {"diningtable": "Dining Table", "pottedplant": "Potted Plant", "tvmonitor": "TV Monitor",
               "tv": "TV", "aeroplane": "Aeroplane", "motorbike": "Motorbike", "trafficlight": "Traffic Light",
               "firehydrant": "Fire Hydrant", "stopsign": "Stop Sign", "parkingmeter": "Parking Meter",
               "teddybear": "Teddy Bear", "hairdrier": "Hair Drier", "cellphone": "Cell Phone"}
ACRONYMS = {"tv": "TV", "crt": "CRT", "3d": "3D", "pc": "PC", "led": "LED"}
ICONS = {"person": "mdi:account", "car": "mdi:car", "cat": "mdi:cat", "dog": "mdi:dog", "bird": "mdi:bird",
         "bicycle": "mdi:bicycle", "motorbike": "mdi:motorbike", "motorcycle": "mdi:motorbike", "bus": "mdi:bus",
         "truck": "mdi:truck", "horse": "mdi:horse", "boat": "mdi:sail-boat", "aeroplane": "mdi:airplane",
         "train": "mdi:train"}


def jinja_string(text: str) -> str:
    """``text`` as a single-quoted Jinja string literal (backslashes and quotes escaped)."""
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def value_template(*path: str) -> str:
    """``{{ value_json['classes']['3d_object'] }}``: bracket access, valid for any key (a dotted
    ``value_json.classes.3d_object`` is a Jinja syntax error)."""
    return "{{ value_json%s }}" % "".join(f"[{jinja_string(key)}]" for key in path)


def slug(name: str) -> str:
    """A class or device name as an object id part: lower case, [a-z0-9_] (``dining table`` -> ``dining_table``)."""
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_") or "class"


def display_name(label: str) -> str:
    """A label as people read it: ``diningtable`` -> ``Dining Table``, ``tv/monitor`` -> ``TV Monitor``,
    ``traffic_light`` -> ``Traffic Light``, ``person, individual`` (ADE20K synonyms) -> ``Person``."""
    first = re.split(r"[,;]", label, maxsplit=1)[0].strip() or label.strip() or "?"
    if _compact(first) in KNOWN_NAMES:
        return KNOWN_NAMES[_compact(first)]
    spaced = re.sub(r"(?<=[a-z])(?=[A-Z])", " ", first)  # camelCase
    words = [w for w in re.split(r"[\s_\-./]+", spaced) if w]
    return " ".join(ACRONYMS.get(w.lower(), w[:1].upper() + w[1:] if w.islower() else w) for w in words) or first


def camera_name(camera: str) -> str:
    """A camera id as the prefix of its entities' names: ``front_door`` -> ``Front Door``."""
    return display_name(camera) if camera else ""


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


def camera_key(camera: str) -> str:
    """A camera id in entity keys: its slug when that spells it back (``door``, ``front_door``),
    else slug + hash (``Door`` and ``door`` are different cameras)."""
    if re.fullmatch(r"[a-z0-9]+(_[a-z0-9]+)*", camera):
        return camera
    return f"{slug(camera)}-{hashlib.sha256(camera.encode()).hexdigest()[:DEVICE_HASH_CHARS]}"


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


@dataclass(frozen=True)
class Camera:
    """What the entity builder needs of a camera: its id ("" = the legacy ``[source]``) and its
    configured classes (empty = ``[homeassistant] classes``)."""
    id: str = ""
    classes: Tuple[str, ...] = ()


@dataclass(frozen=True)
class Entity:
    """One Home Assistant entity: ``key`` names its unique id, discovery topic and object id."""
    component: str
    key: str
    name: str
    extra: Dict[str, Any] = field(default_factory=dict, compare=False, hash=False)
    camera: Optional[str] = None  # class entities: the camera id
    label: Optional[str] = None  # class entities: the model's label
    kind: str = "metric"  # status | problem | metric | image | coverage | presence


# key -> (component, name, state key, extra config): the device-level entities ("status" and
# "problem" follow the agent's state; the others only while it runs).
METRICS: Dict[str, Tuple[str, str, Optional[str], Dict[str, Any]]] = {
    "status": ("sensor", "Status", "status",
               {"device_class": "enum", "options": list(STATUSES), "icon": "mdi:list-status"}),
    "problem": ("binary_sensor", "Problem", "problem", {"device_class": "problem"}),
    "fps": ("sensor", "Frame rate", "fps",
            {"unit_of_measurement": "fps", "state_class": "measurement", "icon": "mdi:speedometer",
             "suggested_display_precision": 1}),
    "inference_time": ("sensor", "Inference time", "inference_ms",
                       {"unit_of_measurement": "ms", "device_class": "duration", "state_class": "measurement",
                        "suggested_display_precision": 1}),
    "end_to_end_time": ("sensor", "End-to-end time", "end_to_end_ms",
                        {"unit_of_measurement": "ms", "device_class": "duration", "state_class": "measurement",
                         "suggested_display_precision": 1}),
    "cpu_temperature": ("sensor", "CPU temperature", "cpu_temp_c",
                        {"unit_of_measurement": "°C", "device_class": "temperature", "state_class": "measurement",
                         "entity_category": "diagnostic", "suggested_display_precision": 1}),
    "overlay": ("image", "Overlay", None, {"content_type": "image/jpeg"}),
}
# What earlier versions announced and this one does not: cleared at every announcement.
LEGACY_KEYS = (("sensor", "dropped_frames"), ("sensor", "model"), ("sensor", "benchmark_p50"),
               ("button", "run_benchmark"), ("sensor", "cpu_temperature"),
               ("image", "overlay"))  # with [[cameras]], the first camera's overlay before each had its own


def class_key(camera: str, class_slug: str) -> str:
    """``class_person`` (camera "", the keys earlier versions used: entity ids and history stay) or
    ``class_door__person``: a slug has no ``__``, so camera and class never run into each other."""
    return f"class_{class_slug}" if not camera else f"class_{camera_key(camera)}__{class_slug}"


def overlay_key(camera: str) -> str:
    """``overlay`` (camera "": the key earlier versions used) or ``door_overlay``: no device-level
    key ends with ``_overlay`` and class keys start with ``class_`` and hold ``__``."""
    return "overlay" if not camera else f"{camera_key(camera)}_overlay"


def max_entities(cameras: int = 1) -> int:
    """The most entities the default set has: 6 device-level + 9 per camera (15 for one camera,
    24 for two)."""
    return DEVICE_ENTITIES + CAMERA_ENTITIES * max(1, cameras)


def entities(labels: Optional[Sequence[str]], classes: Sequence[str] = (), cameras: Sequence[Camera] = (Camera(),),
             has_cpu_temp: bool = False, overlay: bool = True) -> List[Entity]:
    """The device's entities, in the order Home Assistant lists them.

    ``labels``: the model's (None: not known, no class entities); ``classes``: ``[homeassistant]
    classes``; ``cameras``: each camera's id and own classes. Each camera gets its overlay image
    and two entities per class it watches (:func:`~edge_agent.models.classes.watched_classes`, the
    rule ``info.cameras[i].watched`` follows: with none configured up to 4 defaults), so with the
    defaults a device has at most :func:`max_entities` entities.
    """
    cameras = list(cameras) or [Camera()]
    out = [Entity(component, key, name, dict(extra), kind=key if key in ("status", "problem") else "metric")
           for key, (component, name, _, extra) in METRICS.items()
           if component != "image" and (key != "cpu_temperature" or has_cpu_temp)]
    image = METRICS["overlay"]
    slugs = dict(class_slugs(list(labels or [])))
    for cam in cameras:
        prefix = f"{camera_name(cam.id)} " if cam.id else ""
        if overlay:
            out.append(Entity(image[0], overlay_key(cam.id), f"{prefix}overlay" if cam.id else image[1],
                              dict(image[3]), camera=cam.id, kind="image"))
        watched, _ = watched_classes(labels, cam.classes or classes)
        for label in watched:
            key = class_key(cam.id, slugs[label])
            name = prefix + display_name(label)
            icon = ICONS.get(_compact(label), "mdi:image-filter-center-focus")
            out.append(Entity("binary_sensor", key, name, {"device_class": "occupancy", "icon": icon},
                              camera=cam.id, label=label, kind="presence"))
            out.append(Entity("sensor", key, f"{name} coverage",
                              {"unit_of_measurement": "%", "state_class": "measurement",
                               "suggested_display_precision": 1, "icon": icon},
                              camera=cam.id, label=label, kind="coverage"))
    return out


def cameras_of(config: Config) -> List[Camera]:
    """The config's cameras as the entity builder sees them (one camera "" without ``[[cameras]]``)."""
    listing = getattr(config, "camera_list", None)
    if not callable(listing):
        return [Camera()]
    return [Camera(getattr(c, "id", ""), tuple(getattr(c, "classes", ()) or ())) for c in listing()] or [Camera()]


# -- the agent's state as Home Assistant shows it ------------------------------------------------

def _source_problem(source: Any, where: str = "") -> Optional[str]:
    if isinstance(source, dict) and source.get("state") == "down":
        return f"{where}source down: {source.get('last_error') or 'no frames'}"
    return None


def camera_problems(stats: Optional[Dict[str, Any]], live: Iterable[str] = ()) -> Dict[str, str]:
    """Camera id -> why it is down (``camera yard: source down: ...``; "" = the legacy ``[source]``,
    the top-level ``source``) from the last stats; a camera in ``live`` published since: not down."""
    live = set(live)
    stats = stats or {}
    out: Dict[str, str] = {}
    legacy = None if "" in live else _source_problem(stats.get("source"))
    if legacy:
        out[""] = legacy
    cams = stats.get("cameras")
    if isinstance(cams, dict):
        for cam, doc in sorted(cams.items()):
            if isinstance(doc, dict) and cam and cam not in live:  # "": the legacy [source], top-level
                src = doc.get("source") if isinstance(doc.get("source"), dict) else doc
                reason = _source_problem(src, f"camera {cam}: ")
                if reason:
                    out[cam] = reason
    return out


def _device_problems(stats: Optional[Dict[str, Any]], previous: Optional[Dict[str, Any]],
                     live: Iterable[str]) -> List[str]:
    """What makes the whole pipeline unwell (not one camera): the model failed on every frame since
    the previous stats, a pipeline thread crashed."""
    stats = stats or {}
    reasons = []
    errors = stats.get("inference_errors") or 0
    inferred = (stats.get("frames") or {}).get("inferred", 0) if isinstance(stats.get("frames"), dict) else 0
    prev = previous or {}
    prev_errors = prev.get("inference_errors") or 0
    prev_inferred = (prev.get("frames") or {}).get("inferred", 0) if isinstance(prev.get("frames"), dict) else 0
    if errors > prev_errors and inferred <= prev_inferred and not set(live):
        reasons.append(f"inference fails: {stats.get('last_error') or 'invoke error'}")
    last = stats.get("last_error")
    if isinstance(last, str) and last.endswith("crashed"):
        reasons.append(last)
    return reasons


def agent_health(info: Optional[Dict[str, Any]], stats: Optional[Dict[str, Any]] = None,
                 previous: Optional[Dict[str, Any]] = None, live: Iterable[str] = (),
                 cameras: Sequence[str] = ("",)) -> Tuple[str, Optional[str], bool, Dict[str, bool]]:
    """(status, reason, metrics available, camera id -> its entities available).

    Status and reason as :func:`agent_status`. The device's metrics are available while the
    pipeline runs and at least one camera is up; a camera's entities while the metrics are and
    that camera is not down: one camera down makes the Status ``error`` (naming it) and only its
    own entities unavailable."""
    live = set(live)
    info = info or {}
    if info.get("status") in ("stopped", "error"):
        status = str(info["status"])
        reason = None if status == "stopped" else str(info.get("error") or "the agent runs no pipeline")
        return status, reason, False, {cam: False for cam in cameras}
    down = camera_problems(stats, live)
    device = _device_problems(stats, previous, live)
    reasons = list(dict.fromkeys(list(down.values()) + device))
    up = [cam for cam in cameras if cam not in down]
    metrics = not device and bool(up)
    status, reason = ("error", "; ".join(reasons)) if reasons else ("running", None)
    return status, reason, metrics, {cam: metrics and cam not in down for cam in cameras}


def agent_status(info: Optional[Dict[str, Any]], stats: Optional[Dict[str, Any]] = None,
                 previous: Optional[Dict[str, Any]] = None, live: Iterable[str] = ()) -> Tuple[str, Optional[str]]:
    """(running | error | stopped, the reason or None) from the agent's info and its last two
    stats documents; ``live``: the cameras that published a result since those stats (they are
    not down, and their model works, whatever the stats said).

    error when: ``info`` says so (no model, the source cannot open: ``info.error``); a source is
    down (being reopened; the reason names the camera); the model failed on every frame since the
    previous stats; a pipeline thread crashed."""
    return agent_health(info, stats, previous, live)[:2]


def _loads(payload: Any) -> Optional[Dict[str, Any]]:
    if payload is None:
        return None
    if isinstance(payload, dict):
        return payload
    try:
        doc = json.loads(payload)
    except (TypeError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


def combine_timings(docs: Sequence[Optional[Dict[str, Any]]]) -> Optional[Dict[str, Any]]:
    """The device's timings from its cameras' latest (the cameras that are up): fps summed, the
    stages' means weighted by each camera's fps (one camera: its document as it is)."""
    docs = [d for d in docs if d]
    if len(docs) <= 1:
        return docs[0] if docs else None
    fps = [d.get("fps") for d in docs]
    weights = [float(f) if isinstance(f, (int, float)) and f > 0 else 0.0 for f in fps]
    if not any(weights):
        weights = [1.0] * len(docs)
    out: Dict[str, Any] = {"fps": round(sum(weights), 2) if all(f is not None for f in fps) else None,
                           "stages": {}}
    for stage in ("inference", "end_to_end"):
        values = []
        for doc, w in zip(docs, weights):
            stages, ms = doc.get("stages"), doc.get("ms")
            if isinstance(stages, dict) and isinstance(stages.get(stage), dict) and stages[stage].get("mean") is not None:
                values.append((float(stages[stage]["mean"]), w))
            elif isinstance(ms, dict) and ms.get(stage) is not None:
                values.append((float(ms[stage]), w))
        if values and sum(w for _, w in values) > 0:
            out["stages"][stage] = {"mean": sum(v * w for v, w in values) / sum(w for _, w in values)}
    return out


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


class Discovery:
    """The discovery configs and state document of one device: pure data, built from the config,
    the info document and whether the host has a CPU temperature."""

    def __init__(self, config: Config, device_id: str, info: Optional[Dict[str, Any]],
                 has_cpu_temp: bool = False) -> None:
        self.ha = config.homeassistant
        self.device_id = device_id
        self.node = node_id(device_id)
        self.base = f"{config.mqtt.topic_prefix}/{device_id}"
        self.info = info or {}
        model = self.info.get("model") or {}
        self.labels: Optional[List[str]] = list(model.get("labels") or []) or None
        self.cameras = cameras_of(config)
        self.unknown: List[str] = []  # configured classes the model does not have
        for cam in self.cameras if self.labels else ():
            missing = watched_classes(self.labels, cam.classes or self.ha.classes)[1]
            self.unknown += [n for n in missing if n not in self.unknown]
        self.entities = entities(self.labels, self.ha.classes, self.cameras, has_cpu_temp)
        self.classes = [e for e in self.entities if e.kind == "presence"]

    def topic(self, component: str, key: str) -> str:
        return f"{self.ha.discovery_prefix}/{component}/{self.node}/{key}/config"

    def device(self) -> Dict[str, Any]:
        host = self.info.get("host") or {}
        doc = {"identifiers": [self.node], "name": self.device_id, "manufacturer": MANUFACTURER,
               "model": host.get("board") or host.get("machine") or "edge-agent",
               "sw_version": str(self.info.get("agent_version") or __version__)}
        if self.ha.console_url:
            doc["configuration_url"] = self.ha.console_url
        return doc

    def _availability(self, kind: str, camera: Optional[str] = None) -> Dict[str, Any]:
        """Metrics: while the agent is online AND its pipeline runs (``available.metrics`` of the
        state: an agent in error shows them "unavailable", its Status says why); a camera's overlay
        and classes: while online and that camera is up (``available.cameras[id]``: one camera down
        leaves the others' entities available). Status and Problem: while online, and after a
        clean stop (its "stopped" stays readable); a dead agent (the Last Will) makes them unavailable."""
        device = {"topic": f"{self.base}/availability"}
        state = f"{self.base}/{STATE}"
        if kind in ("status", "problem"):
            return {"availability": [device, {"topic": state, "value_template":
                                              "{{ 'online' if value_json['status'] == 'stopped' else 'offline' }}"}],
                    "availability_mode": "any"}
        if camera is None:
            template = "{{ value_json.get('available', {}).get('metrics', 'offline') }}"
        else:
            template = ("{{ value_json.get('available', {}).get('cameras', {}).get(%s, 'offline') }}"
                        % jinja_string(camera))
        return {"availability": [device, {"topic": state, "value_template": template}], "availability_mode": "all"}

    def config(self, entity: Entity) -> Dict[str, Any]:
        doc: Dict[str, Any] = {
            "name": entity.name,
            "unique_id": f"edge_agent_{device_key(self.device_id)}_{entity.key}",
            "object_id": f"{slug(self.device_id)}_{entity.key.replace('-', '_')}",
            **self._availability(entity.kind, entity.camera),
            "device": self.device(),
            "origin": {"name": "edge-agent", "sw_version": __version__},
        }
        doc.update(entity.extra)
        state = f"{self.base}/{STATE}"
        state_key = entity.key[len("class_"):]  # class entities' key in the state document
        if entity.kind == "image":
            doc["image_topic"] = f"{self.base}/{camera_suffix(entity.camera or '', 'overlay')}"
        elif entity.kind == "coverage":
            doc.update(state_topic=state, value_template=value_template("classes", state_key))
        elif entity.kind == "presence":
            doc.update(state_topic=state, value_template=value_template("present", state_key))
        else:
            doc.update(state_topic=state, value_template=value_template(METRICS[entity.key][2]))
            if entity.kind in ("status", "problem"):
                doc.update(json_attributes_topic=state, json_attributes_template="{{ value_json['details'] | tojson }}")
        return doc

    def configs(self) -> Dict[str, Dict[str, Any]]:
        """Discovery topic -> config payload, for every entity of this device."""
        return {self.topic(e.component, e.key): self.config(e) for e in self.entities}

    def legacy_topics(self) -> List[str]:
        """Config topics earlier versions announced that this one does not (every label had a
        sensor and a binary sensor; dropped frames, model, benchmark, ...): cleared at each
        announcement. Class topics only when the labels are known."""
        topics = [self.topic(c, k) for c, k in LEGACY_KEYS]
        if self.labels:
            for _, key in class_slugs(self.labels):
                topics += [self.topic("sensor", f"class_{key}"), self.topic("binary_sensor", f"class_{key}")]
        current = self.configs()
        return [t for t in dict.fromkeys(topics) if t not in current]

    def keeps(self, topic: str) -> bool:
        """A retained config not announced now that must stay: class entities while the labels are
        unknown (an agent in error keeps them, unavailable, instead of dropping their history)."""
        return self.labels is None and "/class_" in topic

    def state(self, results: Dict[str, Dict[str, float]], metrics: Dict[str, Any], status: str,
              reason: Optional[str], details: Optional[Dict[str, Any]] = None,
              available: Optional[Tuple[bool, Dict[str, bool]]] = None) -> Dict[str, Any]:
        """The ``ha/state`` document: status, metrics, class % and presence (ON/OFF) by class key,
        which entities are available. ``results``: camera id -> that camera's latest class
        fractions; ``available``: (metrics, camera id -> its entities) as :func:`agent_health`
        says (default: everything while the status is running)."""
        if available is None:
            available = (status == "running", {cam.id: status == "running" for cam in self.cameras})
        online = {True: "online", False: "offline"}
        classes: Dict[str, float] = {}
        present: Dict[str, str] = {}
        for e in self.classes:
            fraction = (results.get(e.camera or "") or {}).get(e.label or "", 0.0)
            key = e.key[len("class_"):]
            classes[key] = round(100.0 * fraction, 2)
            present[key] = "ON" if fraction >= self.ha.min_fraction else "OFF"
        model = self.info.get("model") or {}
        info_details = {"reason": reason, "model": model.get("name"), "runtime": self.info.get("runtime"),
                        "delegate": self.info.get("delegate")}
        return {**metrics, "status": status, "reason": reason, "problem": "ON" if status == "error" else "OFF",
                "classes": classes, "present": present, "details": {**info_details, **(details or {})},
                "available": {"metrics": online[available[0]],
                              "cameras": {cam.id: online[bool(available[1].get(cam.id))] for cam in self.cameras}}}


def config_topic_filter(discovery_prefix: str, device_id: str) -> str:
    """Every discovery config topic of this device."""
    return f"{discovery_prefix}/+/{node_id(device_id)}/+/config"


def _has_cpu_temp(read: Callable[[], Optional[float]]) -> bool:
    try:
        return read() is not None
    except Exception:  # a sensor that cannot be read is no sensor
        return False


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
        self._has_cpu_temp = _has_cpu_temp(cpu_temp)
        self._lock = threading.Lock()
        self._discovery = Discovery(config, self._device_id, None, self._has_cpu_temp)
        self._info: Dict[str, Any] = {}
        self._announced: Set[str] = set()
        self._retained: Set[str] = set()  # this node's config topics the broker holds (as seen)
        self._to_clear: Set[str] = set()  # seen, not announced: cleared by the announcer
        self._announce_wanted = False
        self._closing = False
        self._wake = threading.Event()
        self._have_info = False
        self._timings: Dict[str, Any] = {}  # camera id -> its latest timings payload
        self._results: Dict[str, Any] = {}  # camera id -> its latest result payload
        self._live: Set[str] = set()  # cameras with a result since the last stats
        self._stats: Tuple[Optional[Dict[str, Any]], Optional[Dict[str, Any]]] = (None, None)  # previous, last
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
        """The agent's info document: the model's labels decide the class entities, its status
        the Status entity (published at once)."""
        self._comms.set_info(info)
        model = info.get("model") or {}
        with self._lock:
            if not model.get("labels") and self._discovery.labels:
                # no model now (an error): keep the class entities of the last one, unavailable
                keep = dict(info, model={**model, "labels": self._discovery.labels})
            else:
                keep = info
        discovery = Discovery(self.config, self._device_id, keep, self._has_cpu_temp)
        for name in discovery.unknown:
            log.warning("homeassistant.classes: %r is not a class of model %s (its labels: %s)", name,
                        model.get("name"), ", ".join(model.get("labels") or []))
        if model.get("name") and not model.get("labels") and not discovery.labels:
            log.warning("homeassistant: model %s has no labels: no class entities (set model.labels)", model["name"])
        with self._lock:
            changed = not self._have_info or discovery.configs() != self._discovery.configs()
            if info.get("status") != self._info.get("status"):
                self._stats = (None, None)  # a new pipeline (or none): its counters start again
            self._discovery, self._info, self._have_info = discovery, info, True
        if changed and self._comms.connected:
            self.announce()
        else:
            self._publish_state(force=True)

    # -- announcing ---------------------------------------------------------------------------
    def announce(self) -> None:
        """Have every discovery config (retained) and then the state published, by the announcer
        thread: never on paho's network thread, which must keep reading acknowledgements while
        the configs wait for room in the in-flight window."""
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
            stale = {t for t in (self._announced | self._retained | self._to_clear) - set(configs)
                     if not discovery.keeps(t)}
            stale = sorted(stale | set(discovery.legacy_topics()))
            self._announced, self._to_clear = set(configs), set()
            self.announcements += 1
        messages = [(topic, b"") for topic in stale] + list(configs.items())
        for n, (topic, payload) in enumerate(messages):
            if not self._send(topic, payload):
                log.warning("Home Assistant discovery interrupted after %d of %d messages (broker away); "
                            "announcing again at the next connection", n, len(messages))
                return n
        log.info("Home Assistant discovery: %d entities announced under %s/+/%s (%d classes)",
                 len(configs), self.ha.discovery_prefix, discovery.node, len(discovery.classes))
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
        """A config of this device's node id that is not announced now (an earlier version's or
        a previous model's entity) is cleared; our own announcements echo back and are left alone."""
        with self._lock:
            if payload:
                self._retained.add(topic)
            else:
                self._retained.discard(topic)
            stale = (self._have_info and bool(payload) and topic not in self._announced
                     and not self._discovery.keeps(topic))
        if stale:
            log.info("Home Assistant discovery: removing stale entity %s", topic)
            with self._lock:
                self._to_clear.add(topic)
            self._wake.set()

    # -- state ------------------------------------------------------------------------------
    def publish(self, suffix: str, payload: Any, qos: Optional[int] = None, retain: bool = False) -> bool:
        ok = self._comms.publish(suffix, payload, qos=qos, retain=retain)
        camera, kind = split_camera_suffix(suffix)
        kind = kind.split("/", 1)[0]
        if kind in ("result", "timings", "stats"):
            with self._lock:
                if kind == "result":
                    self._results[camera] = payload  # parsed only when the state is due
                    self._live.add(camera)
                elif kind == "stats":
                    self._stats, self._live = (self._stats[1], _loads(payload)), set()
                else:
                    self._timings[camera] = payload
            self._publish_state(force=kind == "stats")
        return ok

    def _publish_state(self, force: bool = False) -> None:
        now = time.monotonic()
        with self._lock:
            if not self._have_info or (not force and now < self._next_state):
                return
            self._next_state = now + self.ha.state_interval_s
            timings, results, discovery, info = dict(self._timings), dict(self._results), self._discovery, self._info
            previous, stats = self._stats
            live = set(self._live)
        status, reason, metrics_ok, cameras_ok = agent_health(info, stats, previous, live,
                                                              [cam.id for cam in discovery.cameras])
        fractions = {cam: (_loads(p) or {}).get("classes") or {} for cam, p in results.items()}
        metrics = metrics_from(combine_timings([_loads(t) for cam, t in sorted(timings.items())
                                                if cameras_ok.get(cam, True)]), stats, self._cpu_temp())
        details: Dict[str, Any] = {"dropped_frames": metrics.pop("dropped")}
        if stats:
            details.update(uptime_s=stats.get("uptime_s"), inference_errors=stats.get("inference_errors"),
                           source_state=(stats.get("source") or {}).get("state"))
            cams = stats.get("cameras")
            if isinstance(cams, dict) and any(cams):  # [[cameras]]: each camera's source state
                details["source_state"] = {cam: ((doc.get("source") or {}) if isinstance(doc, dict) else {}).get("state")
                                           for cam, doc in sorted(cams.items())}
        doc = discovery.state(fractions, metrics, status, reason, details, (metrics_ok, cameras_ok))
        self._comms.publish(STATE, doc, qos=1, retain=True)


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
