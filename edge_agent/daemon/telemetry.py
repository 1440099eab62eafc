"""Telemetry of the running pipeline: fps, per-stage timing windows, counters, the ``timings`` and
``stats`` documents and when they are published.

Its own unit so the pipeline runner only moves frames: the runner reports what happened
(:meth:`Telemetry.inferred`, :meth:`Telemetry.frame_done`), the publish thread calls
:meth:`Telemetry.tick` and the schedule (``publish.timings``, ``timings_interval_s``,
``stats_interval_s``) lives here. Message shapes: ``docs/asyncapi.yaml`` (timingsFrame,
timingsInterval, stats); stage names: :mod:`edge_agent.output.stages`.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence

from edge_agent import system
from edge_agent.output.stages import Sink, camera_suffix
from edge_agent.output.encode import to_json
from edge_agent.output.timing import StageWindow

TIMINGS, STATS = "timings", "stats"  # topic suffixes
FPS_PERIOD_S = 1.0


@dataclass
class PipelineCounters:
    captured: int = 0
    inferred: int = 0
    processed: int = 0
    published_masks: int = 0
    publish_failed: int = 0
    inference_errors: int = 0
    dropped_publish: int = 0
    last_error: Optional[str] = None


class CameraTelemetry:
    """One camera's counters, fps and stage window; its timings go to its own topic
    (``camera_suffix(camera, "timings")``) and carry ``"camera"`` when it is not ""."""

    def __init__(self, sink: Sink, camera: str = "", timings: str = "interval") -> None:
        self.sink = sink
        self.camera = camera
        self.timings_mode = timings
        self.suffix = camera_suffix(camera, TIMINGS)
        self.counters = PipelineCounters()
        self._window = StageWindow()
        self._fps_frames = 0
        self._fps = 0.0
        self._count_lock = threading.Lock()  # inference workers count side by side

    def inferred(self) -> None:
        with self._count_lock:
            self.counters.inferred += 1
            self._fps_frames += 1

    def inference_failed(self, error: str) -> None:
        with self._count_lock:
            self.counters.inference_errors += 1
            self.counters.last_error = error

    def frame_done(self, seq: int, timings: Dict[str, float]) -> None:
        """A frame was published: into the window, and out at once with ``timings = "frame"``.

        In "frame" mode the window is summarised only at the end of a finite source, so it may
        see millions of frames: :class:`StageWindow` is bounded by construction (a reservoir),
        and nothing else here grows per frame (tests/test_telemetry.py proves it)."""
        self._window.add(timings)
        if self.timings_mode == "frame":
            doc: Dict[str, Any] = {"seq": seq, "ms": {k: round(v, 3) for k, v in timings.items()}}
            if self.camera:
                doc["camera"] = self.camera
            self.sink.publish(self.suffix, to_json(doc))

    def update_fps(self, elapsed: float) -> None:
        with self._count_lock:
            frames, self._fps_frames = self._fps_frames, 0
        current = frames / elapsed if elapsed > 0 else 0.0
        self._fps = current if self._fps == 0 else 0.5 * self._fps + 0.5 * current

    @property
    def fps(self) -> float:
        return self._fps

    def publish_timings_interval(self, interval_s: float, dropped: Dict[str, int]) -> None:
        frames = self._window.frames
        if not frames:
            return
        doc: Dict[str, Any] = {
            "interval_s": interval_s,
            "frames": frames,
            "fps": round(self._fps, 2),
            "dropped": dropped,
            "stages": self._window.flush(),
        }
        if self.camera:
            doc["camera"] = self.camera
        self.sink.publish(self.suffix, to_json(doc))

    def stats(self, state: Dict[str, Any]) -> Dict[str, Any]:
        """This camera's entry of ``stats.cameras`` (``state``: its dropped counts, source stats)."""
        c = self.counters
        doc = {"fps": round(self._fps, 2),
               "frames": {"captured": c.captured, "inferred": c.inferred, "processed": c.processed,
                          "published_masks": c.published_masks},
               "dropped": state.get("dropped", {}), "publish_failed": c.publish_failed,
               "inference_errors": c.inference_errors, "last_error": c.last_error}
        if "source" in state:
            doc["source"] = state["source"]
        return doc


class TotalCounters:
    """The sum of several cameras' :class:`PipelineCounters`, read live (``last_error``: the first
    camera's that has one)."""

    def __init__(self, parts: List[PipelineCounters]) -> None:
        self._parts = parts

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_") or name not in PipelineCounters.__dataclass_fields__:
            raise AttributeError(name)
        if name == "last_error":
            return next((p.last_error for p in self._parts if p.last_error), None)
        return sum(getattr(p, name) for p in self._parts)


class Telemetry:
    """Counts, measures and publishes for every camera; ``state()`` supplies what only the runner
    knows: dropped frames per hand-off (totals), paused, extras such as the MQTT counters, the
    source stats of a one-camera pipeline (``source``), and per camera ``cameras: {id: {dropped,
    source}}``."""

    def __init__(self, sink: Sink, timings: str = "interval", timings_interval_s: float = 5.0,
                 stats_interval_s: float = 30.0,
                 state: Callable[[], Dict[str, Any]] = lambda: {}, cameras: Sequence[str] = ("",)) -> None:
        self.sink = sink
        self.timings_mode = timings  # frame | interval
        self.timings_interval_s = timings_interval_s
        self.stats_interval_s = stats_interval_s
        self.cameras = {cid: CameraTelemetry(sink, cid, timings) for cid in cameras}
        self._first = next(iter(self.cameras.values()))
        self.counters: Any = (self._first.counters if len(self.cameras) == 1
                              else TotalCounters([c.counters for c in self.cameras.values()]))
        self._state = state
        self._cpu = system.CpuMeter()
        self.start()

    @property
    def _window(self) -> StageWindow:
        return self._first._window

    def camera(self, cid: str) -> CameraTelemetry:
        return self.cameras[cid]

    def start(self) -> None:
        now = time.monotonic()
        self._started = now
        self._next_fps = now + FPS_PERIOD_S
        self._next_timings = now + self.timings_interval_s
        self._next_stats = now + self.stats_interval_s

    # -- what the runner reports (one camera: the first; else through camera(id)) -----------------
    def inferred(self) -> None:
        self._first.inferred()

    def inference_failed(self, error: str) -> None:
        self._first.inference_failed(error)

    def frame_done(self, seq: int, timings: Dict[str, float]) -> None:
        self._first.frame_done(seq, timings)

    # -- the schedule (publish thread) -----------------------------------------------------------
    def tick(self, now: Optional[float] = None) -> None:
        now = time.monotonic() if now is None else now
        if now >= self._next_fps:
            elapsed = now - (self._next_fps - FPS_PERIOD_S)
            for cam in self.cameras.values():
                cam.update_fps(elapsed)
            self._next_fps = now + FPS_PERIOD_S
        if self.timings_mode == "interval" and now >= self._next_timings:
            self.publish_timings_interval()
            self._next_timings = now + self.timings_interval_s
        if now >= self._next_stats:
            self.publish_stats()
            self._next_stats = now + self.stats_interval_s

    def flush(self) -> None:
        """End of a finite source: the interval summaries go out now."""
        self.publish_timings_interval()
        self.publish_stats()

    @property
    def fps(self) -> float:
        return sum(c.fps for c in self.cameras.values())

    # -- the documents ---------------------------------------------------------------------------
    def publish_timings_interval(self) -> None:
        state = self._state()
        per_camera = state.get("cameras", {})
        for cid, cam in self.cameras.items():
            dropped = per_camera.get(cid, {}).get("dropped", state.get("dropped", {}))
            cam.publish_timings_interval(self.timings_interval_s, dropped)

    def stats(self) -> Dict[str, Any]:
        c = self.counters
        state = self._state()
        per_camera = state.get("cameras", {})
        doc = {
            "uptime_s": round(time.monotonic() - self._started, 1),
            "fps": round(self.fps, 2),
            "frames": {"captured": c.captured, "inferred": c.inferred, "processed": c.processed,
                       "published_masks": c.published_masks},
            "dropped": state.get("dropped", {}),
            "publish_failed": c.publish_failed,
            "inference_errors": c.inference_errors,
            "last_error": c.last_error,
            "cpu_percent": round(self._cpu.percent(), 1),
            "rss_mb": _round(system.rss_mb()),
            "cpu_temp_c": system.cpu_temp_c(),
            "throttled": system.throttled(),
            "paused": state.get("paused", False),
        }
        doc.update({k: v for k, v in state.items() if k not in ("dropped", "paused", "cameras")})
        doc["cameras"] = {cid: cam.stats(per_camera.get(cid, {})) for cid, cam in self.cameras.items()}
        return doc

    def publish_stats(self) -> None:
        self.sink.publish(STATS, to_json(self.stats()))


def _round(value: Optional[float]) -> Optional[float]:
    return None if value is None else round(value, 1)
