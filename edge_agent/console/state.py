"""What the console knows about each device, fed by the broker messages a :class:`FleetClient` hears.

Online state and ``info`` are the fleet client's (its retained availability/info bookkeeping);
this module keeps the rest, bounded per device:

* the latest ``stats`` and ``timings``; the device's health (:func:`health`: error / warning / ok /
  offline, with the reason in words);
* per camera ("" for the legacy ``[source]``), the parts of the last :data:`FRAMES_KEPT` frames
  keyed by their ``seq`` (result, mask PNG, overlay JPEG, per-frame timings: the agent labels every
  one, docs/asyncapi.yaml "Frame label"), and the newest COMPLETE frame with a mask (``shown``) and
  with an overlay (``photo``): the page shows the parts of one frame together, never the newest of
  each (overlays come at most once a second, masks every frame). Unlabelled masks (older agents)
  are shown as the newest one;
* a history of :data:`HISTORY_S` (fps, inference and end-to-end latency, the classes' coverage,
  one point per :data:`HISTORY_STEP_S`) and an event timeline of the classes seen (:class:`Timeline`):
  of the classes each camera watches (``info.cameras[i].watched``: the agent's rule, the one Home
  Assistant follows), else of the classes seen most (older agents, labels not known).

``on_change(kind, device)`` tells the web layer what changed (``device``: the fleet row;
``frame``: a new complete frame; ``forget``: the device is gone), from paho's thread.

Devices are forgotten (their row, images, history) when not online and not heard from for
``forget_after_s`` (:meth:`FleetState.sweep`, called periodically by the web app), and at once
when their retained availability or info is cleared (an empty retained message).
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any, Callable, Deque, Dict, List, Optional, Tuple

from edge_agent.console.settings import FORGET_AFTER_S
from edge_agent.fleet.client import FleetClient, json_object
from edge_agent.output.encode import read_frame_label

HISTORY_S = 600.0  # the device charts: the last 10 minutes ...
HISTORY_STEP_S = 2.0  # ... one point per 2 s (300 points a device at most)
ROW_STEP_S = 30.0  # the fleet row's sparkline: one point per 30 s (20 points)
ROW_TIMINGS_MIN_S = 1.0  # per-frame timings refresh the fleet row at most once a second
FRAMES_KEPT = 12  # frames whose parts are kept per camera, to pair them by seq
FRAME_TIMINGS_FRESH_S = 10.0  # per-frame timings seen this recently: a frame waits for its own
TIMELINE_GAP_S = 4.0  # a class unseen this long ends its event
TIMELINE_KEEP = 50  # events kept per camera
MIN_COVERAGE = 0.005  # a class on fewer pixels than this does not count as seen
HOT_C = 80.0  # CPU temperature from which a device is "warning"
BACKGROUND = "background"
TOPICS = ("availability", "info", "stats", "timings", "result", "mask", "overlay")
FRAME_TOPICS = ("timings", "result", "mask", "overlay")

ChangeCallback = Callable[[str, str], None]


# -- pure pieces (unit-tested) -------------------------------------------------------------------------

def stage_means(timings: Optional[Dict[str, Any]]) -> Dict[str, float]:
    """Stage -> ms from either timings shape: interval (``stages.<s>.mean``) or frame (``ms.<s>``)."""
    if not timings:
        return {}
    if isinstance(timings.get("stages"), dict):
        return {k: v["mean"] for k, v in timings["stages"].items() if isinstance(v, dict) and "mean" in v}
    if isinstance(timings.get("ms"), dict):
        return {k: v for k, v in timings["ms"].items() if isinstance(v, (int, float))}
    return {}


def _cameras(stats: Dict[str, Any]) -> Dict[str, Dict[str, Any]]:
    """``stats.cameras`` (camera id -> its counters), the well-formed entries only."""
    cams = stats.get("cameras") if isinstance(stats.get("cameras"), dict) else {}
    return {c: v for c, v in cams.items() if isinstance(v, dict)}


def _camera_facts(stats: Dict[str, Any]) -> Optional[Dict[str, Dict[str, Any]]]:
    """With several cameras, each one's fps and source state (None with one camera)."""
    cams = _cameras(stats)
    if len(cams) < 2:
        return None
    out = {}
    for cam, v in cams.items():
        source = v.get("source") if isinstance(v.get("source"), dict) else {}
        out[cam] = {"fps": v.get("fps"), "source_state": source.get("state"),
                    "source_error": source.get("last_error") or None}
    return out


def _outbox(stats: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    """The store-and-forward backlog (``stats.outbox``): what waits for the broker, and what was lost."""
    box = stats.get("outbox")
    if not isinstance(box, dict) or not box.get("enabled"):
        return None
    return {k: box.get(k) for k in ("messages", "bytes", "oldest_s", "dropped", "replayed")}


def health(online: Optional[bool], info: Dict[str, Any], stats: Dict[str, Any],
           errors_rising: bool = False) -> Tuple[str, str]:
    """(level, reason): ``error`` / ``warning`` / ``ok`` / ``offline`` / ``unknown`` and why, in words."""
    if online is False:
        return "offline", "stopped" if info.get("status") == "stopped" else "connection lost"
    if online is None:
        return "unknown", "no availability message yet"
    if info.get("status") == "error":
        return "error", info.get("error") or "no pipeline runs"
    if errors_rising:
        return "error", f"inference failing: {stats.get('last_error') or 'errors rising'}"
    sources = [("", stats.get("source"))] + [(f"camera {c}: ", v.get("source")) for c, v in _cameras(stats).items() if c]
    for where, source in sources:
        source = source if isinstance(source, dict) else {}
        if source.get("state") == "down":
            return "warning", f"{where}source down, reopening: {source.get('last_error') or 'no frames'}"
        if source.get("state") == "ended":
            return "warning", f"{where}source ended"
    if stats.get("paused"):
        return "warning", "paused (a benchmark is running)"
    flags = stats.get("throttled") if isinstance(stats.get("throttled"), dict) else {}
    now = [k.replace("_", " ") for k in ("under_voltage", "freq_capped", "throttled", "soft_temp_limit") if flags.get(k)]
    if now:
        return "warning", ", ".join(now)
    temp = stats.get("cpu_temp_c")
    if isinstance(temp, (int, float)) and temp >= HOT_C:
        return "warning", f"CPU at {temp:.0f} °C"
    if stats.get("last_error"):
        return "ok", f"running (earlier: {stats['last_error']})"
    return "ok", "running"


def watched_of(info: Dict[str, Any]) -> Dict[str, List[str]]:
    """camera id -> the classes it watches, from ``info.cameras[i].watched`` (an agent that says so;
    an empty list, e.g. no model loaded, is not a choice and counts as not said)."""
    out: Dict[str, List[str]] = {}
    for cam in info.get("cameras") if isinstance(info.get("cameras"), list) else []:
        watched = cam.get("watched") if isinstance(cam, dict) else None
        if isinstance(watched, list) and watched and isinstance(cam.get("id", ""), str):
            out[cam.get("id", "")] = [str(c) for c in watched]
    return out


class Timeline:
    """Events from results: "person from 16:49:03 to 16:49:40" (``t``: the frames' capture times).

    A class seen (>= ``min_fraction`` of the pixels, not background) opens an event; seen again
    within ``gap_s`` it extends it, else the event ends at its last sighting. Bounded: the newest
    ``keep`` ended events plus the open ones."""

    def __init__(self, gap_s: float = TIMELINE_GAP_S, keep: int = TIMELINE_KEEP,
                 min_fraction: float = MIN_COVERAGE) -> None:
        self.gap_s, self.min_fraction = gap_s, min_fraction
        self.open: Dict[str, Dict[str, Any]] = {}
        self.ended: Deque[Dict[str, Any]] = deque(maxlen=keep)

    def add(self, t: float, classes: Dict[str, float], only: Optional[List[str]] = None) -> None:
        """``only``: the classes that make events (None: any but background)."""
        self._close(t)
        for name, fraction in classes.items():
            if name == BACKGROUND or not isinstance(fraction, (int, float)) or fraction < self.min_fraction:
                continue
            if only is not None and name not in only:
                continue
            event = self.open.get(name)
            if event is None:
                self.open[name] = {"class": name, "start": t, "end": t, "peak": fraction, "frames": 1}
            else:
                event["end"] = max(event["end"], t)
                event["peak"] = max(event["peak"], fraction)
                event["frames"] += 1

    def _close(self, now: float) -> None:
        for name in [n for n, e in self.open.items() if now - e["end"] > self.gap_s]:
            self.ended.append(self.open.pop(name))

    def events(self, now: Optional[float] = None) -> List[Dict[str, Any]]:
        """Newest first; ``open`` is True for an event still going on at ``now``."""
        if now is not None:
            self._close(now)
        out = [dict(e, open=True) for e in self.open.values()] + [dict(e, open=False) for e in self.ended]
        return sorted(out, key=lambda e: (e["start"], e["end"]), reverse=True)


class History:
    """Points of at most ``HISTORY_S``, one per ``step_s`` (the mean of what arrived in that step)."""

    def __init__(self, span_s: float = HISTORY_S, step_s: float = HISTORY_STEP_S, dense: bool = False) -> None:
        self.span_s, self.step_s = span_s, step_s
        self.dense = dense  # a key missing from an add() counts as 0 (coverage: a class absent from a frame)
        self._adds = 0
        self.points: Deque[Tuple[float, Dict[str, float]]] = deque()
        self._bucket: Optional[float] = None
        self._sums: Dict[str, float] = {}
        self._counts: Dict[str, int] = {}

    def add(self, t: float, values: Dict[str, Optional[float]]) -> None:
        bucket = t - t % self.step_s
        if self._bucket is not None and bucket != self._bucket:
            self._flush()
        self._bucket = bucket
        self._adds += 1
        for key, value in values.items():
            if isinstance(value, (int, float)):
                self._sums[key] = self._sums.get(key, 0.0) + value
                self._counts[key] = self._counts.get(key, 0) + 1
        while self.points and t - self.points[0][0] > self.span_s:
            self.points.popleft()

    def _flush(self) -> None:
        if self._bucket is not None and self._counts:
            self.points.append((self._bucket, self._means()))
        self._sums, self._counts, self._adds = {}, {}, 0

    def _means(self) -> Dict[str, float]:
        return {k: self._sums[k] / (self._adds if self.dense else self._counts[k]) for k in self._counts}

    def series(self, keys: Optional[List[str]] = None) -> Dict[str, Any]:
        """``{"t": [...], key: [... or None]}``, the step in progress included (uPlot's data shape)."""
        points = list(self.points)
        if self._bucket is not None and self._counts:
            points.append((self._bucket, self._means()))
        if keys is None:
            keys = sorted({k for _, values in points for k in values})
        out: Dict[str, Any] = {"t": [round(t, 1) for t, _ in points]}
        for key in keys:
            out[key] = [None if v.get(key) is None else round(v[key], 4) for _, v in points]
        return out


@dataclass
class Part:
    """What arrived of one frame (one seq of one camera)."""

    seq: int
    result: Optional[Dict[str, Any]] = None
    mask: Optional[bytes] = None
    mask_n: int = 0
    overlay: Optional[bytes] = None
    overlay_n: int = 0
    ms: Optional[Dict[str, float]] = None

    def describe(self) -> Dict[str, Any]:
        result = self.result or {}
        return {"seq": self.seq, "classes": result.get("classes") or {}, "capture_ts": result.get("capture_ts"),
                "ms": self.ms, "mask": self.mask is not None, "overlay": self.overlay is not None,
                "n": self.mask_n or self.overlay_n, "labelled": True}


@dataclass
class Camera:
    frames: "OrderedDict[int, Part]" = field(default_factory=OrderedDict)
    shown: Optional[Part] = None  # newest complete frame with a mask
    photo: Optional[Part] = None  # newest complete frame with an overlay
    legacy_mask: Optional[bytes] = None  # an unlabelled mask (older agent): the newest is shown
    legacy_n: int = 0
    legacy_overlay: Optional[bytes] = None
    legacy_overlay_n: int = 0
    last_result: Optional[Dict[str, Any]] = None
    last_result_at: float = 0.0
    results_seen: bool = False
    frame_timings_at: float = float("-inf")
    coverage: History = field(default_factory=lambda: History(dense=True))
    timeline: Timeline = field(default_factory=Timeline)


@dataclass
class Telemetry:
    """The last messages of one device (whatever ``info``/availability say, which the client owns)."""

    stats: Optional[Dict[str, Any]] = None
    stats_at: Optional[float] = None
    timings: Optional[Dict[str, Any]] = None  # {"stages": {stage: {mean,p50,p90,max}} } or {"ms": {stage: v}}
    timings_at: Optional[float] = None
    mask_n: int = 0  # masks received so far (all cameras)
    overlay_n: int = 0
    cameras: Dict[str, Camera] = field(default_factory=dict)
    metrics: History = field(default_factory=History)
    spark: History = field(default_factory=lambda: History(HISTORY_S, ROW_STEP_S))
    errors_rising: bool = False
    row_pushed_at: float = 0.0
    heard_at: float = 0.0  # the device's last message (any topic): forgetting counts from it
    started_at: Optional[float] = None  # info.started_at: a new one (a restart) resets the frames
    watched: Dict[str, List[str]] = field(default_factory=dict)  # camera -> info.cameras[i].watched

    def camera(self, cam: str) -> Camera:
        found = self.cameras.get(cam)
        if found is None:
            found = self.cameras[cam] = Camera()
        return found


class FleetState:
    """Live per-device state from one fleet client's subscriptions (see the module docstring)."""

    def __init__(self, client: FleetClient, on_change: Optional[ChangeCallback] = None,
                 forget_after_s: float = FORGET_AFTER_S, clock: Callable[[], float] = time.time) -> None:
        self.client = client
        self.on_change = on_change or (lambda kind, device: None)
        self.forget_after_s = forget_after_s
        self.clock = clock
        self._lock = threading.Lock()
        self._tele: Dict[str, Telemetry] = {}  # the known devices (the fleet rows)

    def start(self) -> "FleetState":
        prefix = self.client.prefix
        self.client.listen([f"{prefix}/+/{t}" for t in TOPICS]
                           + [f"{prefix}/+/camera/+/{t}" for t in FRAME_TOPICS], self._on_message)
        now = self.clock()
        with self._lock:  # retained states the client had before we listened
            for dev in self.client.devices():
                self._tele.setdefault(dev, Telemetry(heard_at=now))
        return self

    # -- forgetting ------------------------------------------------------------------------------
    def forget(self, device: str) -> bool:
        """Drop the device (row, images, history); True if it was known."""
        with self._lock:
            known = self._tele.pop(device, None) is not None
        if known:
            self.on_change("forget", device)
        return known

    def sweep(self, now: Optional[float] = None) -> List[str]:
        """Forget the devices not online and silent for ``forget_after_s``; returns their ids."""
        now = self.clock() if now is None else now
        online = {dev for dev, d in self.client.devices().items() if d.online}
        with self._lock:
            stale = [dev for dev, tele in self._tele.items()
                     if dev not in online and now - tele.heard_at >= self.forget_after_s]
            for dev in stale:
                del self._tele[dev]
        for dev in stale:
            self.on_change("forget", dev)
        return stale

    def known(self, device: str) -> bool:
        with self._lock:
            return device in self._tele

    # -- messages (paho's thread) ----------------------------------------------------------------
    def _on_message(self, topic: str, payload: bytes) -> None:
        parts = topic[len(self.client.prefix) + 1:].split("/")
        if len(parts) == 2:
            device, kind, cam = parts[0], parts[1], ""
        elif len(parts) == 4 and parts[1] == "camera" and parts[3] in FRAME_TOPICS:
            device, kind, cam = parts[0], parts[3], parts[2]
        else:
            return
        if device == "all":
            return
        if kind in ("availability", "info") and not payload:  # its retained state was cleared
            self.forget(device)
            return
        now = self.clock()
        changes: List[str] = []
        with self._lock:
            tele = self._tele.setdefault(device, Telemetry())
            tele.heard_at = now
            if kind in ("mask", "overlay", "result") or (kind == "timings" and b'"seq"' in payload):
                if self._on_frame_part(tele, cam, kind, payload, now):
                    changes.append("frame")
            if kind == "info":
                info = json_object(payload) or {}
                tele.watched = watched_of(info)
                if info.get("started_at") != tele.started_at:
                    tele.started_at = info.get("started_at")
                    for camera in tele.cameras.values():  # a restarted agent counts seqs from the start
                        camera.frames.clear()
                        camera.shown = camera.photo = None
                changes.append("device")
            elif kind == "availability":
                changes.append("device")
            elif kind == "stats":
                stats = json_object(payload)
                old = tele.stats or {}
                errors = stats.get("inference_errors")
                tele.errors_rising = bool(old) and isinstance(errors, int) and errors > (old.get("inference_errors") or 0)
                tele.stats, tele.stats_at = stats, now
                if tele.timings is None:  # no timings (yet): the stats' fps feed the chart
                    tele.metrics.add(now, {"fps": stats.get("fps")})
                changes.append("device")
            elif kind == "timings":
                tele.timings, tele.timings_at = json_object(payload), now
                self._add_history(tele, now)
                if now - tele.row_pushed_at >= ROW_TIMINGS_MIN_S:
                    changes.append("device")
            if "device" in changes:
                tele.row_pushed_at = now
        for change in changes:
            self.on_change(change, device)

    def _on_frame_part(self, tele: Telemetry, cam_id: str, kind: str, payload: bytes, now: float) -> bool:
        """File one part of a frame of camera ``cam_id``; True when a new complete frame is there to show."""
        cam = tele.camera(cam_id)
        if kind in ("mask", "overlay"):
            label = read_frame_label(payload)
            if kind == "mask":
                tele.mask_n += 1
            else:
                tele.overlay_n += 1
            if label is None:  # an older agent: the newest unlabelled image is shown as it is
                if kind == "mask":
                    cam.legacy_mask, cam.legacy_n = payload, tele.mask_n
                else:
                    cam.legacy_overlay, cam.legacy_overlay_n = payload, tele.overlay_n
                return True
            seq = label["seq"]
        else:
            doc = json_object(payload)
            seq = doc.get("seq") if isinstance(doc, dict) else None
            if not isinstance(seq, int):
                return False
            if kind == "result":
                cam.results_seen = True
                cam.last_result = doc
                classes = doc.get("classes") if isinstance(doc.get("classes"), dict) else {}
                t = doc.get("capture_ts") if isinstance(doc.get("capture_ts"), (int, float)) else now
                cam.timeline.add(t, classes, tele.watched.get(cam_id))
                cam.coverage.add(now, {k: v for k, v in classes.items() if k != BACKGROUND})
                cam.last_result_at = now
            else:
                cam.frame_timings_at = now
        part = cam.frames.get(seq)
        if part is None:
            if cam.frames and seq < min(cam.frames) and seq > min(cam.frames) - 4 * FRAMES_KEPT:
                return False  # a straggler from frames already let go
            part = cam.frames[seq] = Part(seq)
            while len(cam.frames) > FRAMES_KEPT:
                cam.frames.popitem(last=False)
        if kind == "mask":
            part.mask, part.mask_n = payload, tele.mask_n
        elif kind == "overlay":
            part.overlay, part.overlay_n = payload, tele.overlay_n
        elif kind == "result":
            part.result = doc
        else:
            part.ms = {k: v for k, v in (doc.get("ms") or {}).items() if isinstance(v, (int, float))}
        complete = ((part.result is not None or not cam.results_seen)
                    and (part.ms is not None or now - cam.frame_timings_at > FRAME_TIMINGS_FRESH_S))
        if not complete:
            return False
        changed = False
        if part.mask is not None and (cam.shown is None or cam.shown is part or seq > cam.shown.seq
                                      or cam.shown.seq - seq > 4 * FRAMES_KEPT):
            changed = changed or cam.shown is not part or kind != "mask"
            cam.shown = part
        if part.overlay is not None and (cam.photo is None or cam.photo is part or seq > cam.photo.seq
                                         or cam.photo.seq - seq > 4 * FRAMES_KEPT):
            changed = changed or cam.photo is not part or kind != "overlay"
            cam.photo = part
        return changed

    @staticmethod
    def _add_history(tele: Telemetry, now: float) -> None:
        timings = tele.timings or {}
        means = stage_means(timings)
        fps = timings.get("fps", (tele.stats or {}).get("fps"))
        values = {"fps": fps, "inference": means.get("inference"), "end_to_end": means.get("end_to_end")}
        tele.metrics.add(now, values)
        tele.spark.add(now, values)

    # -- what the web layer reads ----------------------------------------------------------------
    def rows(self) -> List[Dict[str, Any]]:
        devices = self.client.devices()  # one copy for all rows (a fleet of 1,000)
        return [self._row(dev, devices.get(dev)) for dev in self.device_ids()]

    def device_ids(self) -> List[str]:
        with self._lock:
            return sorted(self._tele)

    def row(self, device: str) -> Dict[str, Any]:
        """The fleet table row (and device view header) of one device; JSON-ready."""
        return self._row(device, self.client.devices().get(device))

    def _row(self, device: str, state: Any) -> Dict[str, Any]:
        info = (state.info if state else None) or {}
        online = state.online if state else None
        with self._lock:
            tele = self._tele.get(device) or Telemetry()
            stats, timings = tele.stats or {}, tele.timings
            spark = tele.spark.series(["inference", "end_to_end"])
            stats_at, heard_at, errors_rising = tele.stats_at, tele.heard_at, tele.errors_rising
            frame = self._frame(device, tele)
        model = info.get("model") or {}
        means = stage_means(timings)
        dropped = stats.get("dropped") if isinstance(stats.get("dropped"), dict) else (timings or {}).get("dropped")
        mqtt = stats.get("mqtt") or {}
        level, reason = health(online, info, stats, errors_rising)
        source = stats.get("source") if isinstance(stats.get("source"), dict) else {}
        return {
            "device": device,
            "online": online,
            "level": level, "reason": reason,
            "status": info.get("status"), "error": info.get("error"),
            "tags": info.get("tags") if isinstance(info.get("tags"), list) else [],
            "model": model.get("name"), "labels": model.get("labels"),
            "model_sha256": model.get("sha256"), "model_size": model.get("size_bytes"),
            "runtime": " ".join(str(x) for x in (info.get("runtime"), info.get("runtime_version")) if x) or None,
            "delegate": (info.get("delegate") or "cpu") if info.get("runtime") else None,
            "threads": info.get("threads"),
            "source": (info.get("source") or {}).get("kind"),
            "source_state": source.get("state"), "source_error": source.get("last_error") or None,
            "cameras": info.get("cameras") if isinstance(info.get("cameras"), list) else None,
            # several cameras: each one's fps and source state (the device page's facts for the one shown)
            "camera_stats": _camera_facts(stats),
            "timings_mode": (info.get("publish") or {}).get("timings"),
            "started_at": info.get("started_at"), "uptime_s": stats.get("uptime_s"),
            "last_seen": round(heard_at, 3) if heard_at else None,
            "fps": (timings or {}).get("fps", stats.get("fps")),
            "inference_ms": means.get("inference"), "end_to_end_ms": means.get("end_to_end"),
            "stages": means,
            "stages_per": "frame" if (timings or {}).get("ms") else "interval" if timings else None,
            "timings_interval_s": (timings or {}).get("interval_s"),
            "cpu_temp_c": stats.get("cpu_temp_c"), "throttled": stats.get("throttled"),
            "cpu_percent": stats.get("cpu_percent"), "rss_mb": stats.get("rss_mb"),
            "dropped": sum(v for v in (dropped or {}).values() if isinstance(v, int)) if dropped else None,
            "reconnects": mqtt.get("reconnects"),
            "outbox": _outbox(stats),
            "paused": stats.get("paused"), "stats_at": stats_at,
            "history": [[t, a, b] for t, a, b in zip(spark["t"], spark["inference"], spark["end_to_end"])],
            "frame": frame,
        }

    @staticmethod
    def _frame(device: str, tele: Telemetry) -> Dict[str, Any]:
        """The ``frame`` event: per camera, the newest complete frame with a mask (``shown``) and with
        an overlay (``photo``); ``mask``/``overlay``/``seq``/``classes`` for the first camera."""
        cams: Dict[str, Any] = {}
        for name, cam in sorted(tele.cameras.items()):
            shown = cam.shown.describe() if cam.shown else None
            photo = cam.photo.describe() if cam.photo else None
            if cam.legacy_mask is not None and (shown is None or cam.legacy_n > shown["n"]):
                shown = {"seq": None, "labelled": False, "n": cam.legacy_n, "mask": True, "overlay": False,
                         "ms": None, "capture_ts": None,
                         "classes": (cam.last_result or {}).get("classes") or {}}
            if cam.legacy_overlay is not None and (photo is None or cam.legacy_overlay_n > photo["n"]):
                photo = {"seq": None, "labelled": False, "n": cam.legacy_overlay_n, "mask": False,
                         "overlay": True, "ms": None, "capture_ts": None,
                         "classes": (cam.last_result or {}).get("classes") or {}}
            cams[name] = {"shown": shown, "photo": photo}
        first = cams[sorted(cams)[0]] if cams else {"shown": None, "photo": None}
        newest = first["shown"] or first["photo"] or {}
        return {"device": device, "mask": tele.mask_n, "overlay": tele.overlay_n, "seq": newest.get("seq"),
                "classes": newest.get("classes") or {}, "cameras": cams}

    def frame(self, device: str) -> Dict[str, Any]:
        with self._lock:
            return self._frame(device, self._tele.get(device) or Telemetry())

    def image(self, device: str, what: str, seq: Optional[int] = None,
              camera: str = "") -> Tuple[Optional[bytes], int]:
        """The ``mask`` PNG or ``overlay`` JPEG of frame ``seq`` (None: the newest shown) and its
        number; ``None, 0`` when it is not (or no longer) here."""
        with self._lock:
            tele = self._tele.get(device)
            cam = tele.cameras.get(camera) if tele else None
            if cam is None:
                return None, 0
            if seq is None:
                part = cam.shown if what == "mask" else cam.photo
                legacy = (cam.legacy_mask, cam.legacy_n) if what == "mask" else (cam.legacy_overlay, cam.legacy_overlay_n)
                if legacy[0] is not None and (part is None or legacy[1] > (part.mask_n if what == "mask" else part.overlay_n)):
                    return legacy
            else:
                part = cam.frames.get(seq)
                for kept in (cam.shown, cam.photo):
                    if part is None and kept is not None and kept.seq == seq:
                        part = kept
            if part is None:
                return None, 0
            return (part.mask, part.mask_n) if what == "mask" else (part.overlay, part.overlay_n)

    def history(self, device: str, camera: str = "") -> Dict[str, Any]:
        """The device page's charts and timeline: metrics, and the coverage and events of the
        camera's watched classes (``watched``; None: not said, then the 6 classes seen most)."""
        now = self.clock()
        with self._lock:
            tele = self._tele.get(device)
            if tele is None:
                return {"device": device, "metrics": {"t": []}, "coverage": {"t": []}, "events": [], "watched": None}
            cam = tele.cameras.get(camera) or Camera()
            metrics = tele.metrics.series(["fps", "inference", "end_to_end"])
            watched = tele.watched.get(camera)
            coverage = cam.coverage.series(watched)
            last = cam.last_result or {}
            # the device's clock now (events carry capture times): its last frame's, plus the time since
            device_now = (last["capture_ts"] + now - cam.last_result_at
                          if isinstance(last.get("capture_ts"), (int, float)) else now)
            events = cam.timeline.events(device_now)
        if watched:  # the classes the camera watches (in the agent's order), their events only
            keep = watched
            events = [e for e in events if e["class"] in watched]
        else:  # an agent that does not say: the classes seen most
            peaks = {k: max((v for v in vs if v is not None), default=0.0) for k, vs in coverage.items() if k != "t"}
            keep = sorted(peaks, key=lambda k: -peaks[k])[:6]
        return {"device": device, "camera": camera, "now": now, "metrics": metrics, "watched": watched,
                "coverage": {"t": coverage["t"], **{k: coverage[k] for k in keep}}, "events": events}
