"""The live pipeline: capture -> preprocess+inference -> postprocess+encode -> publish.

Four threads joined by bounded hand-offs. Between capture, inference and postprocessing the
newest item wins (a slow stage drops stale frames and counts them, it never queues them); the
publish queue is bounded too. Publishing never blocks: the MQTT client drops while the broker is
away. So a slow or absent broker can't stall inference, and inference can't stall capture.

Preprocessing (letterbox + normalisation) runs on the capture thread, into a fresh buffer, so the
inference thread does only memcpy + ``invoke()`` + reading the output: it stays as close to the
interpreter's own speed as the hardware allows.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Deque, Dict, List, Optional, Protocol, Tuple

import numpy as np

from edge_agent.inference import postprocess

from edge_agent.output import encode as publish

from edge_agent.daemon import system
from edge_agent.errors import EdgeAgentError
from edge_agent.inference.preprocess import Geometry
from edge_agent.inference.segmenter import Segmenter
from edge_agent.sources.base import EndOfStream, Frame
from edge_agent.output.timing import StageWindow
from edge_agent.output.visuals import overlay

log = logging.getLogger(__name__)


class Sink(Protocol):
    def publish(self, suffix: str, payload: Any, qos: Optional[int] = None, retain: bool = False) -> bool: ...


@dataclass
class PipelineSettings:
    mode: str = "letterbox"
    target_fps: float = 0.0
    mask_every_n: int = 1
    mask_max_hz: float = 0.0
    mask_resolution: str = "model"  # model | frame
    png_compression: int = 1
    result: bool = True
    timings: str = "interval"  # frame | interval
    timings_interval_s: float = 5.0
    stats_interval_s: float = 30.0
    overlay: bool = False
    overlay_max_hz: float = 1.0
    overlay_jpeg_quality: int = 80
    publish_queue: int = 8
    # Files and folders read at full speed (fps = 0) are processed frame by frame: capture waits
    # for inference instead of dropping. Live cameras and paced playback keep newest-wins.
    lossless: bool = False

    @classmethod
    def from_config(cls, config) -> "PipelineSettings":
        p = config.publish
        return cls(
            mode=config.model.preprocess, target_fps=config.source.fps,
            mask_every_n=p.mask_every_n, mask_max_hz=p.mask_max_hz,
            mask_resolution=p.mask_resolution, png_compression=p.png_compression,
            result=p.result, timings=p.timings, timings_interval_s=p.timings_interval_s,
            stats_interval_s=p.stats_interval_s, overlay_max_hz=p.overlay_max_hz,
            overlay=p.overlay or config.homeassistant.enabled,  # Home Assistant's image entity shows it
            overlay_jpeg_quality=p.overlay_jpeg_quality,
        )


class LatestSlot:
    """A one-item hand-off where the newest item wins; replaced items are counted as dropped."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._item: Any = None
        self._closed = False
        self.dropped = 0

    def put(self, item: Any) -> bool:
        with self._cond:
            replaced = self._item is not None
            if replaced:
                self.dropped += 1
            self._item = item
            self._cond.notify()
            return replaced

    def get(self, timeout: float) -> Any:
        with self._cond:
            self._cond.wait_for(lambda: self._item is not None or self._closed, timeout)
            item, self._item = self._item, None
            self._cond.notify_all()
            return item

    def wait_empty(self, timeout: float) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: self._item is None or self._closed, timeout)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()


@dataclass
class _Captured:
    frame: Frame
    prepared: np.ndarray
    geometry: Geometry
    segmenter: Segmenter
    timings: Dict[str, float]
    ready: float  # monotonic time the input was ready


@dataclass
class _Inferred:
    captured: _Captured
    label_map: np.ndarray
    segmenter: Segmenter


@dataclass
class _Outgoing:
    seq: int
    messages: List[Tuple[str, bytes]]
    timings: Dict[str, float]
    capture_monotonic: float


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


class Pipeline:
    """Runs one source through one (swappable) segmenter into one sink."""

    def __init__(
        self,
        source,
        segmenter: Segmenter,
        sink: Sink,
        settings: Optional[PipelineSettings] = None,
        on_progress: Optional[Callable[[], None]] = None,
        on_first_frame: Optional[Callable[[], None]] = None,
    ) -> None:
        self.source = source
        self.sink = sink
        self.settings = settings or PipelineSettings()
        self._segmenter = segmenter
        self._pending_segmenter: Optional[Segmenter] = None
        self._swapped = threading.Event()
        self._on_progress = on_progress
        self._on_first_frame = on_first_frame
        self._capture_slot = LatestSlot()
        self._post_slot = LatestSlot()
        self._out: Deque[_Outgoing] = collections.deque()
        self._out_cond = threading.Condition()
        self._stop = threading.Event()
        self._paused = threading.Event()
        self._idle = threading.Event()
        self._idle.set()
        self._eos = threading.Event()
        self._threads: List[threading.Thread] = []
        self._busy_since: Optional[float] = None  # monotonic start of the running invoke()
        self.counters = PipelineCounters()
        self._window = StageWindow()
        self._fps_frames = 0
        self._fps = 0.0
        self._cpu = system.CpuMeter()
        self._started = time.monotonic()
        self._mask_gate = publish.RateGate(self.settings.mask_every_n, self.settings.mask_max_hz)
        self._overlay_gate = publish.RateGate(1, self.settings.overlay_max_hz)
        self._last_mask_seq: Optional[int] = None
        self._first_done = False
        self.extra_stats: Callable[[], Dict[str, Any]] = lambda: {}

    # -- control --------------------------------------------------------------------------------
    @property
    def segmenter(self) -> Segmenter:
        return self._segmenter

    def start(self) -> "Pipeline":
        self._started = time.monotonic()
        for name, target in (("capture", self._capture_loop), ("inference", self._inference_loop),
                             ("postprocess", self._post_loop), ("publish", self._publish_loop)):
            thread = threading.Thread(target=self._guard(target), name=f"pipeline-{name}", daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._capture_slot.close()
        self._post_slot.close()
        with self._out_cond:
            self._out_cond.notify_all()
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        try:
            self.source.close()
        except Exception as exc:  # closing a vanished camera must not fail shutdown
            log.warning("closing the source: %s", exc)

    @property
    def finished(self) -> bool:
        """A finite source ended and everything it produced was published."""
        return self._eos.is_set() and not any(t.is_alive() for t in self._threads[1:])

    def wait_finished(self, timeout: Optional[float] = None) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.finished:
            if deadline is not None and time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        return True

    def stuck_for(self) -> float:
        """Seconds the current ``invoke()`` has been running (0 when the interpreter is idle)."""
        since = self._busy_since
        return 0.0 if since is None else time.monotonic() - since

    def healthy(self, inference_timeout_s: float) -> bool:
        """Every thread alive (or finished with the source) and no invoke() over the timeout.

        Waiting for frames (a camera being reopened) is healthy; a hung interpreter is not.
        """
        threads_ok = all(t.is_alive() for t in self._threads) or self._eos.is_set()
        return threads_ok and not self._stop.is_set() and self.stuck_for() < inference_timeout_s

    def pause(self, timeout: float = 30.0) -> bool:
        """Stop inferring (capture keeps the newest frame) and wait until the interpreter is idle."""
        self._paused.set()
        return self._idle.wait(timeout)

    def resume(self) -> None:
        self._paused.clear()

    def swap_segmenter(self, new: Segmenter, timeout: float = 30.0) -> Segmenter:
        """Swap the model between two frames; returns the old segmenter.

        If the inference thread does not pick it up in ``timeout`` (it is stuck in invoke, or not
        running) the swap is done directly: the next frame uses the new model either way.
        """
        old = self._segmenter
        self._swapped.clear()
        self._pending_segmenter = new
        alive = len(self._threads) > 1 and self._threads[1].is_alive() and not self._paused.is_set()
        if not (alive and self._swapped.wait(timeout)):
            self._segmenter, self._pending_segmenter = new, None
        return old

    # -- threads --------------------------------------------------------------------------------
    def _guard(self, target: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            try:
                target()
            except Exception:  # a bug must be loud, but must not leave a zombie pipeline
                log.exception("pipeline thread %s crashed", threading.current_thread().name)
                self.counters.last_error = f"{threading.current_thread().name} crashed"
                self._stop.set()
        return run

    def _capture_loop(self) -> None:
        period = 1.0 / self.settings.target_fps if self.settings.target_fps > 0 else 0.0
        next_due = time.monotonic()
        while not self._stop.is_set():
            if period:
                delay = next_due - time.monotonic()
                if delay > 0 and self._stop.wait(delay):
                    break
                next_due = max(next_due + period, time.monotonic() - period)
            if self.settings.lossless and not self._capture_slot.wait_empty(0.5):
                continue
            t0 = time.monotonic()
            try:
                frame = self.source.read(timeout=0.5)
            except EndOfStream:
                log.info("source finished")
                self._eos.set()
                self._capture_slot.close()
                return
            if frame is None:
                continue
            item = self._prepare(frame, t0)
            if item is not None:
                self.counters.captured += 1
                self._capture_slot.put(item)

    def _prepare(self, frame: Frame, t0: float) -> Optional[_Captured]:
        """Letterbox + normalise on the calling (capture) thread, into a fresh buffer.

        Fresh, not reused: the buffer waits in the capture slot while the interpreter runs the
        previous frame, and is only copied into the input tensor by ``set_input``.
        """
        t1 = time.monotonic()
        segmenter = self._segmenter
        try:
            prepared, geometry = segmenter.model.prepare(frame.image, self.settings.mode)
        except (ValueError, EdgeAgentError) as exc:
            self.counters.last_error = f"bad frame: {exc}"
            log.warning("frame %s skipped: %s", frame.seq, exc)
            return None
        t2 = time.monotonic()
        return _Captured(frame, prepared, geometry, segmenter,
                         {"capture": (t1 - t0) * 1e3, "preprocess": (t2 - t1) * 1e3}, t2)

    def process_frame(self, frame: Frame) -> Dict[str, float]:
        """Run one frame through every stage on the calling thread; returns its timings (ms).

        The same code the threads run, without the hand-offs: what ``bench/perf.py`` times as the
        per-frame latency. Use it on a pipeline that is not started.
        """
        item = self._prepare(frame, frame.monotonic)
        if item is None:
            raise EdgeAgentError(self.counters.last_error or "frame rejected")
        inferred = self._run_inference(item)
        if inferred is None:
            raise EdgeAgentError(self.counters.last_error or "inference failed")
        out = self._postprocess(inferred)
        self._publish_frame(out)
        return out.timings

    def _adopt_pending_segmenter(self) -> None:
        pending = self._pending_segmenter
        if pending is not None:
            self._segmenter, self._pending_segmenter = pending, None
            self._swapped.set()

    def _inference_loop(self) -> None:
        while not self._stop.is_set():
            self._adopt_pending_segmenter()
            if self._paused.is_set():
                self._idle.set()
                time.sleep(0.02)
                continue
            item: Optional[_Captured] = self._capture_slot.get(timeout=0.2)
            if item is None:
                if self._eos.is_set():
                    self._post_slot.close()
                    return
                continue
            self._idle.clear()
            try:
                self._infer(item)
            finally:
                self._idle.set()

    def _infer(self, item: _Captured) -> None:
        inferred = self._run_inference(item)
        if inferred is None:
            return
        if self._on_progress:
            self._on_progress()
        if self.settings.lossless:
            while not self._post_slot.wait_empty(0.5) and not self._stop.is_set():
                pass
        self._post_slot.put(inferred)

    def _run_inference(self, item: _Captured) -> Optional[_Inferred]:
        """memcpy into the input tensor, ``invoke()``, label map out: all the thread does."""
        segmenter = self._segmenter
        t0 = time.monotonic()
        if item.segmenter is not segmenter:  # the model was swapped since capture
            item.prepared, item.geometry = segmenter.model.prepare(item.frame.image, self.settings.mode)
            item.segmenter = segmenter
        model = segmenter.model
        model.set_input(item.prepared)
        t1 = time.monotonic()
        self._busy_since = t1
        try:
            model.invoke()
        except EdgeAgentError as exc:
            self.counters.inference_errors += 1
            self.counters.last_error = str(exc)
            log.error("%s", exc)
            return None
        finally:
            self._busy_since = None
        t2 = time.monotonic()
        label_map = model.label_map()  # a new uint8 array: safe to hand to another thread
        t3 = time.monotonic()
        item.timings["queue"] = (t0 - item.ready) * 1e3
        item.timings["set_input"] = (t1 - t0) * 1e3
        item.timings["inference"] = (t2 - t1) * 1e3
        item.timings["output"] = (t3 - t2) * 1e3
        self.counters.inferred += 1
        self._fps_frames += 1
        return _Inferred(item, label_map, segmenter)

    def _post_loop(self) -> None:
        while not self._stop.is_set():
            item: Optional[_Inferred] = self._post_slot.get(timeout=0.2)
            if item is None:
                if self._eos.is_set() and not self._threads[1].is_alive():
                    self._enqueue(None)
                    return
                continue
            self._enqueue(self._postprocess(item))

    def _postprocess(self, item: _Inferred) -> _Outgoing:
        s = self.settings
        cap = item.captured
        frame = cap.frame
        t0 = time.monotonic()
        model_mask = postprocess.crop_padding(item.label_map, cap.geometry)
        want_frame_mask = s.mask_resolution == "frame" or s.overlay
        frame_mask = postprocess.to_frame(item.label_map, cap.geometry) if want_frame_mask else None
        fractions = postprocess.class_fractions(model_mask, item.segmenter.labels)
        t1 = time.monotonic()
        messages: List[Tuple[str, bytes]] = []
        publish_mask = self._mask_gate.allow()
        if publish_mask:
            mask = frame_mask if s.mask_resolution == "frame" else np.ascontiguousarray(model_mask)
            messages.append(("mask", publish.encode_mask_png(mask, s.png_compression)))
            self._last_mask_seq = frame.seq
            mask_hw = mask.shape[:2]
        else:
            mask_hw = None
        if s.overlay and frame_mask is not None and self._overlay_gate.allow():
            picture = overlay(frame.image, frame_mask, labels=item.segmenter.labels)
            messages.append(("overlay", publish.encode_jpeg(picture, s.overlay_jpeg_quality)))
        t2 = time.monotonic()
        if s.result:
            doc = {
                "seq": frame.seq,
                "capture_ts": round(frame.timestamp, 6),
                "frame": {"w": frame.width, "h": frame.height},
                "mask_seq": self._last_mask_seq,
                "mask": {"w": mask_hw[1], "h": mask_hw[0], "resolution": s.mask_resolution} if mask_hw else None,
                "classes": {k: round(v, 5) for k, v in fractions.items()},
                "model": item.segmenter.model.file.sha256[:12],
            }
            messages.insert(0, ("result", publish.to_json(doc)))
        timings = dict(cap.timings)
        timings["postprocess"] = (t1 - t0) * 1e3
        timings["encode"] = (t2 - t1) * 1e3
        self.counters.processed += 1
        if not self._first_done:
            self._first_done = True
            if self._on_first_frame:
                self._on_first_frame()
        return _Outgoing(frame.seq, messages, timings, frame.monotonic)

    def _enqueue(self, item: Optional[_Outgoing]) -> None:
        with self._out_cond:
            if self.settings.lossless:
                self._out_cond.wait_for(
                    lambda: len(self._out) < self.settings.publish_queue or self._stop.is_set())
            if item is not None and len(self._out) >= self.settings.publish_queue:
                self._out.popleft()
                self.counters.dropped_publish += 1
            self._out.append(item)  # None marks the end of a finite source
            self._out_cond.notify()

    def _publish_loop(self) -> None:
        next_timings = time.monotonic() + self.settings.timings_interval_s
        next_stats = time.monotonic() + self.settings.stats_interval_s
        next_fps = time.monotonic() + 1.0
        while not self._stop.is_set():
            with self._out_cond:
                self._out_cond.wait_for(lambda: self._out or self._stop.is_set(), 0.25)
                item = self._out.popleft() if self._out else False
                self._out_cond.notify_all()
            if item is None:  # end of stream: flush the interval summaries and finish
                self._publish_timings_interval()
                self._publish_stats()
                return
            if item:
                self._publish_frame(item)
            now = time.monotonic()
            if now >= next_fps:
                self._update_fps(now - (next_fps - 1.0))
                next_fps = now + 1.0
            if self.settings.timings == "interval" and now >= next_timings:
                self._publish_timings_interval()
                next_timings = now + self.settings.timings_interval_s
            if now >= next_stats:
                self._publish_stats()
                next_stats = now + self.settings.stats_interval_s

    def _update_fps(self, elapsed: float) -> None:
        frames, self._fps_frames = self._fps_frames, 0
        current = frames / elapsed if elapsed > 0 else 0.0
        self._fps = current if self._fps == 0 else 0.5 * self._fps + 0.5 * current

    def _publish_frame(self, item: _Outgoing) -> None:
        t0 = time.monotonic()
        for suffix, payload in item.messages:
            ok = self.sink.publish(suffix, payload)
            if not ok:
                self.counters.publish_failed += 1
            elif suffix == "mask":
                self.counters.published_masks += 1
        t1 = time.monotonic()
        item.timings["publish"] = (t1 - t0) * 1e3
        item.timings["end_to_end"] = (t1 - item.capture_monotonic) * 1e3
        self._window.add(item.timings)
        if self.settings.timings == "frame":
            doc = {"seq": item.seq, "ms": {k: round(v, 3) for k, v in item.timings.items()}}
            self.sink.publish("timings", publish.to_json(doc))

    def _publish_timings_interval(self) -> None:
        frames = self._window.frames
        if not frames:
            return
        doc = {
            "interval_s": self.settings.timings_interval_s,
            "frames": frames,
            "fps": round(self._fps, 2),
            "dropped": self.dropped(),
            "stages": self._window.flush(),
        }
        self.sink.publish("timings", publish.to_json(doc))

    def dropped(self) -> Dict[str, int]:
        return {
            "capture": self._capture_slot.dropped,
            "postprocess": self._post_slot.dropped,
            "publish": self.counters.dropped_publish,
        }

    def stats(self) -> Dict[str, Any]:
        c = self.counters
        doc = {
            "uptime_s": round(time.monotonic() - self._started, 1),
            "fps": round(self._fps, 2),
            "frames": {"captured": c.captured, "inferred": c.inferred, "processed": c.processed,
                       "published_masks": c.published_masks},
            "dropped": self.dropped(),
            "publish_failed": c.publish_failed,
            "inference_errors": c.inference_errors,
            "last_error": c.last_error,
            "cpu_percent": round(self._cpu.percent(), 1),
            "rss_mb": _round(system.rss_mb()),
            "cpu_temp_c": system.cpu_temp_c(),
            "paused": self._paused.is_set(),
        }
        source_stats = getattr(self.source, "stats", None)
        if callable(source_stats):
            doc["source"] = source_stats()
        doc.update(self.extra_stats())
        return doc

    @property
    def fps(self) -> float:
        return self._fps

    def _publish_stats(self) -> None:
        self.sink.publish("stats", publish.to_json(self.stats()))


def _round(value: Optional[float]) -> Optional[float]:
    return None if value is None else round(value, 1)
