"""What the console knows about each device, fed by the broker messages a :class:`FleetClient` hears.

Online state and ``info`` are the fleet client's (its retained availability/info bookkeeping);
this module keeps the rest: the latest ``stats``, ``timings`` and ``result``, the latest mask PNG
and overlay JPEG (newest wins, numbered as they arrive), and a per-second latency history for
the fleet chart.  ``on_change(kind, device)`` tells the web layer what changed
(``device``: the fleet row; ``frame``: a new mask, overlay or result; ``forget``: the device is
gone), from paho's thread.

Devices are forgotten (their row, masks and overlays dropped) when not online and not heard from
for ``forget_after_s`` (:meth:`FleetState.sweep`, called periodically by the web app), and at once
when their retained availability or info is cleared (an empty retained message): ids that
anything may publish under the prefix do not pile up.  A forgotten device comes back with its
next message.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Deque, Dict, List, Optional, Tuple

from edge_agent.console.settings import FORGET_AFTER_S
from edge_agent.fleet.client import FleetClient, json_object

HISTORY_S = 600.0  # the latency chart: the last 10 minutes, one point a second at most
ROW_TIMINGS_MIN_S = 1.0  # per-frame timings refresh the fleet row at most once a second
TOPICS = ("availability", "info", "stats", "timings", "result", "mask", "overlay")

ChangeCallback = Callable[[str, str], None]


@dataclass
class Telemetry:
    """The last messages of one device (whatever ``info``/availability say, which the client owns)."""

    stats: Optional[Dict[str, Any]] = None
    stats_at: Optional[float] = None
    timings: Optional[Dict[str, Any]] = None  # {"stages": {stage: {mean,p50,p90,max}} } or {"ms": {stage: v}}
    timings_at: Optional[float] = None
    result: Optional[Dict[str, Any]] = None
    mask: Optional[bytes] = None
    mask_n: int = 0  # masks received so far (the page asks for the newest)
    mask_at: Optional[float] = None
    overlay: Optional[bytes] = None
    overlay_n: int = 0
    history: Deque[Tuple[float, Optional[float], Optional[float]]] = field(default_factory=deque)
    row_pushed_at: float = 0.0
    heard_at: float = 0.0  # the device's last message (any topic): forgetting counts from it


def stage_means(timings: Optional[Dict[str, Any]]) -> Dict[str, float]:
    """Stage -> ms from either timings shape: interval (``stages.<s>.mean``) or frame (``ms.<s>``)."""
    if not timings:
        return {}
    if isinstance(timings.get("stages"), dict):
        return {k: v["mean"] for k, v in timings["stages"].items() if isinstance(v, dict) and "mean" in v}
    if isinstance(timings.get("ms"), dict):
        return {k: v for k, v in timings["ms"].items() if isinstance(v, (int, float))}
    return {}


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
        self.client.listen([f"{prefix}/+/{t}" for t in TOPICS], self._on_message)
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
        if len(parts) != 2 or parts[0] == "all":
            return
        device, kind = parts
        if kind in ("availability", "info") and not payload:  # its retained state was cleared
            self.forget(device)
            return
        now = self.clock()
        change = "device"
        with self._lock:
            tele = self._tele.setdefault(device, Telemetry())
            tele.heard_at = now
            if kind == "mask":
                tele.mask, tele.mask_at = payload, now
                tele.mask_n += 1
                change = "frame"
            elif kind == "overlay":
                tele.overlay = payload
                tele.overlay_n += 1
                change = "frame"
            elif kind == "result":
                tele.result = json_object(payload)
                change = "frame"
            elif kind == "stats":
                tele.stats, tele.stats_at = json_object(payload), now
            elif kind == "timings":
                tele.timings, tele.timings_at = json_object(payload), now
                self._add_history(tele, now)
                if now - tele.row_pushed_at < ROW_TIMINGS_MIN_S:
                    return
            if change == "device":
                tele.row_pushed_at = now
        self.on_change(change, device)

    @staticmethod
    def _add_history(tele: Telemetry, now: float) -> None:
        means = stage_means(tele.timings)
        point = (now, means.get("inference"), means.get("end_to_end"))
        if tele.history and now - tele.history[-1][0] < 1.0:
            return  # per-frame timings: one point a second is plenty for a chart of minutes
        tele.history.append(point)
        while tele.history and now - tele.history[0][0] > HISTORY_S:
            tele.history.popleft()

    # -- what the web layer reads ----------------------------------------------------------------
    def rows(self) -> List[Dict[str, Any]]:
        return [self.row(dev) for dev in self.device_ids()]

    def device_ids(self) -> List[str]:
        with self._lock:
            return sorted(self._tele)

    def row(self, device: str) -> Dict[str, Any]:
        """The fleet table row (and device view header) of one device; JSON-ready."""
        state = self.client.devices().get(device)
        info = (state.info if state else None) or {}
        with self._lock:
            tele = self._tele.get(device) or Telemetry()
            stats, timings, result = tele.stats or {}, tele.timings, tele.result
            history = [[round(t, 1), a, b] for t, a, b in tele.history]
            mask_n, overlay_n, stats_at = tele.mask_n, tele.overlay_n, tele.stats_at
        model = info.get("model") or {}
        means = stage_means(timings)
        dropped = stats.get("dropped") if isinstance(stats.get("dropped"), dict) else (timings or {}).get("dropped")
        mqtt = stats.get("mqtt") or {}
        return {
            "device": device,
            "online": state.online if state else None,
            "status": info.get("status"), "error": info.get("error"),
            "model": model.get("name"), "labels": model.get("labels"),
            "runtime": " ".join(str(x) for x in (info.get("runtime"), info.get("runtime_version")) if x) or None,
            "delegate": (info.get("delegate") or "cpu") if info.get("runtime") else None,
            "threads": info.get("threads"),
            "source": (info.get("source") or {}).get("kind"),
            "fps": (timings or {}).get("fps", stats.get("fps")),
            "inference_ms": means.get("inference"), "end_to_end_ms": means.get("end_to_end"),
            "stages": means,
            "cpu_temp_c": stats.get("cpu_temp_c"), "throttled": stats.get("throttled"),
            "cpu_percent": stats.get("cpu_percent"),
            "dropped": sum(v for v in (dropped or {}).values() if isinstance(v, int)) if dropped else None,
            "reconnects": mqtt.get("reconnects"),
            "paused": stats.get("paused"), "stats_at": stats_at,
            "history": history,
            "frame": self._frame(device, mask_n, overlay_n, result),
        }

    @staticmethod
    def _frame(device: str, mask_n: int, overlay_n: int, result: Optional[Dict[str, Any]]) -> Dict[str, Any]:
        result = result or {}
        return {"device": device, "mask": mask_n, "overlay": overlay_n, "seq": result.get("seq"),
                "mask_seq": result.get("mask_seq"), "classes": result.get("classes") or {}}

    def frame(self, device: str) -> Dict[str, Any]:
        """The ``frame`` event: which mask/overlay is newest, and the latest result's classes."""
        with self._lock:
            tele = self._tele.get(device) or Telemetry()
            return self._frame(device, tele.mask_n, tele.overlay_n, tele.result)

    def image(self, device: str, what: str) -> Tuple[Optional[bytes], int]:
        """The newest ``mask`` PNG or ``overlay`` JPEG and its number (``None, 0`` before the first)."""
        with self._lock:
            tele = self._tele.get(device)
            if tele is None:
                return None, 0
            return (tele.mask, tele.mask_n) if what == "mask" else (tele.overlay, tele.overlay_n)
