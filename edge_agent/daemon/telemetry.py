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
from typing import Any, Callable, Dict, Optional

from edge_agent import system
from edge_agent.output.stages import Sink
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


class Telemetry:
    """Counts, measures and publishes; ``state()`` supplies what only the runner knows
    (dropped frames per hand-off, paused, source stats, extras such as the MQTT counters)."""

    def __init__(self, sink: Sink, timings: str = "interval", timings_interval_s: float = 5.0,
                 stats_interval_s: float = 30.0,
                 state: Callable[[], Dict[str, Any]] = lambda: {}) -> None:
        self.sink = sink
        self.timings_mode = timings  # frame | interval
        self.timings_interval_s = timings_interval_s
        self.stats_interval_s = stats_interval_s
        self.counters = PipelineCounters()
        self._state = state
        self._window = StageWindow()
        self._cpu = system.CpuMeter()
        self._fps_frames = 0
        self._fps = 0.0
        self._count_lock = threading.Lock()  # inference workers count side by side
        self.start()

    def start(self) -> None:
        now = time.monotonic()
        self._started = now
        self._next_fps = now + FPS_PERIOD_S
        self._next_timings = now + self.timings_interval_s
        self._next_stats = now + self.stats_interval_s

    # -- what the runner reports -----------------------------------------------------------------
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
            doc = {"seq": seq, "ms": {k: round(v, 3) for k, v in timings.items()}}
            self.sink.publish(TIMINGS, to_json(doc))

    # -- the schedule (publish thread) -----------------------------------------------------------
    def tick(self, now: Optional[float] = None) -> None:
        now = time.monotonic() if now is None else now
        if now >= self._next_fps:
            self._update_fps(now - (self._next_fps - FPS_PERIOD_S))
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

    def _update_fps(self, elapsed: float) -> None:
        with self._count_lock:
            frames, self._fps_frames = self._fps_frames, 0
        current = frames / elapsed if elapsed > 0 else 0.0
        self._fps = current if self._fps == 0 else 0.5 * self._fps + 0.5 * current

    @property
    def fps(self) -> float:
        return self._fps

    # -- the documents ---------------------------------------------------------------------------
    def publish_timings_interval(self) -> None:
        frames = self._window.frames
        if not frames:
            return
        doc = {
            "interval_s": self.timings_interval_s,
            "frames": frames,
            "fps": round(self._fps, 2),
            "dropped": self._state().get("dropped", {}),
            "stages": self._window.flush(),
        }
        self.sink.publish(TIMINGS, to_json(doc))

    def stats(self) -> Dict[str, Any]:
        c = self.counters
        state = self._state()
        doc = {
            "uptime_s": round(time.monotonic() - self._started, 1),
            "fps": round(self._fps, 2),
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
        doc.update({k: v for k, v in state.items() if k not in ("dropped", "paused")})
        return doc

    def publish_stats(self) -> None:
        self.sink.publish(STATS, to_json(self.stats()))


def _round(value: Optional[float]) -> Optional[float]:
    return None if value is None else round(value, 1)
