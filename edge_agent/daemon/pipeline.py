"""The pipeline runner: capture -> preprocess+inference -> postprocess+encode -> publish threads.

Four named threads joined by bounded hand-offs. Between capture, inference and postprocessing the
newest item wins (a slow stage drops stale frames and counts them, it never queues them); the
publish queue is bounded too. Publishing never blocks: the MQTT client drops while the broker is
away. So a slow or absent broker can't stall inference, and inference can't stall capture.

This module only moves frames between threads. The work of each stage is
:mod:`edge_agent.output.stages` (shared with ``Segmenter.segment()`` and ``bench --pipeline``),
counting and publishing timings/stats is :mod:`edge_agent.daemon.telemetry`, and which model runs
is the :class:`~edge_agent.daemon.model_manager.ModelManager`'s (it swaps through
:meth:`Pipeline.swap_segmenter`).

Pacing: the SOURCE paces (files/folders/test pattern with their ``Pacer``, cameras by their own
frame rate), never this runner: one owner, and a paced playback keeps its timestamps honest.
The preprocess mode is the segmenter's (``Segmenter.mode``). The watchdog is fed by the agent
from :meth:`Pipeline.healthy`, not from here.

Buffers: the prepared inputs and the label maps cross threads, so they come from a
:class:`BufferPool` and go back once their consumer is done (or their item was dropped): the
steady state allocates none. The runner tells the source which size the model needs
(``set_decode_hint``), so JPEG/MJPEG backends decode at reduced size (docs/performance.md).
"""

from __future__ import annotations

import collections
import functools
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Deque, Dict, List, Optional, Tuple

import numpy as np

from edge_agent.config import Config, ModelConfig, PublishConfig
from edge_agent import system
from edge_agent.output import stages
from edge_agent.output.stages import FrameOutput, OutputSettings, Sink
from edge_agent.daemon.telemetry import PipelineCounters, Telemetry
from edge_agent.errors import EdgeAgentError
from edge_agent.inference.preprocess import Geometry, make_geometry
from edge_agent.inference.segmenter import Segmenter
from edge_agent.sources.base import DecodeHint, EndOfStream, Frame

log = logging.getLogger(__name__)

CAPTURE, INFERENCE, POSTPROCESS, PUBLISH = "capture", "inference", "postprocess", "publish"

__all__ = ["Pipeline", "PipelineSettings", "PipelineCounters", "LatestSlot", "FrameSlots", "CameraSource", "Sink"]


@dataclass
class PipelineSettings:
    output: OutputSettings = field(default_factory=OutputSettings)
    timings: str = PublishConfig.timings  # frame | interval; defaults: the config schema's
    timings_interval_s: float = PublishConfig.timings_interval_s
    stats_interval_s: float = PublishConfig.stats_interval_s
    publish_queue: int = 8
    # Files and folders read at full speed (fps = 0) are processed frame by frame: capture waits
    # for inference instead of dropping. Live cameras and paced playback keep newest-wins.
    lossless: bool = False
    # Inference workers, each with its own interpreter of the running model (model.interpreters):
    # frames in flight side by side, results handed on in capture order.
    interpreters: int = ModelConfig.interpreters

    @classmethod
    def from_config(cls, config: Config) -> "PipelineSettings":
        p = config.publish
        return cls(output=OutputSettings.from_config(config), timings=p.timings,
                   timings_interval_s=p.timings_interval_s, stats_interval_s=p.stats_interval_s,
                   interpreters=config.model.interpreters)


class LatestSlot:
    """A one-item hand-off where the newest item wins; replaced items are counted as dropped and
    handed to ``on_drop`` (to recycle their buffers)."""

    def __init__(self, on_drop: Optional[Callable[[Any], None]] = None) -> None:
        self._cond = threading.Condition()
        self._item: Any = None
        self._closed = False
        self._on_drop = on_drop
        self.dropped = 0

    def put(self, item: Any) -> bool:
        with self._cond:
            old = self._item
            replaced = old is not None
            if replaced:
                self.dropped += 1
            self._item = item
            self._cond.notify()
        if replaced and self._on_drop is not None:
            self._on_drop(old)
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


class FrameSlots:
    """The cameras' capture hand-offs: one newest-wins slot per camera, taken round-robin over
    the cameras that have a frame ready (each camera gets its share of the inference workers when
    they are saturated). Replaced items are counted per camera and handed to ``on_drop``."""

    def __init__(self, n: int, on_drop: Optional[Callable[[Any], None]] = None) -> None:
        self._cond = threading.Condition()
        self._items: List[Any] = [None] * n
        self._closed = [False] * n
        self._next = 0
        self._on_drop = on_drop
        self.dropped = [0] * n

    def put(self, i: int, item: Any) -> bool:
        with self._cond:
            old = self._items[i]
            replaced = old is not None
            if replaced:
                self.dropped[i] += 1
            self._items[i] = item
            self._cond.notify_all()
        if replaced and self._on_drop is not None:
            self._on_drop(old)
        return replaced

    def _ready(self) -> Optional[int]:
        n = len(self._items)
        for k in range(n):
            i = (self._next + k) % n
            if self._items[i] is not None:
                return i
        return None

    def take(self, timeout: float) -> Tuple[int, Any]:
        """(camera index, item) of the next camera in turn with a frame; (-1, None) on timeout."""
        with self._cond:
            self._cond.wait_for(lambda: self._ready() is not None or all(self._closed), timeout)
            i = self._ready()
            if i is None:
                return -1, None
            item, self._items[i] = self._items[i], None
            self._next = (i + 1) % len(self._items)
            self._cond.notify_all()
            return i, item

    def wait_empty(self, i: int, timeout: float) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: self._items[i] is None or self._closed[i], timeout)

    def close(self, i: Optional[int] = None) -> None:
        with self._cond:
            for k in range(len(self._items)) if i is None else (i,):
                self._closed[k] = True
            self._cond.notify_all()

    @property
    def exhausted(self) -> bool:
        """Every camera ended and no frame is left."""
        with self._cond:
            return all(self._closed) and all(item is None for item in self._items)


class BufferPool:
    """Arrays recycled between frames: ``acquire`` returns a released buffer of that shape and
    dtype (or allocates one, counted in ``allocated``), ``release`` takes it back. Buffers of
    another shape (a swapped model) are discarded. Thread-safe."""

    def __init__(self, keep: int = 4) -> None:
        self.keep = keep
        self.allocated = 0
        self._free: List[np.ndarray] = []
        self._lock = threading.Lock()

    def acquire(self, shape: Tuple[int, ...], dtype: Any) -> np.ndarray:
        shape, dtype = tuple(shape), np.dtype(dtype)
        with self._lock:
            while self._free:
                buf = self._free.pop()
                if buf.shape == shape and buf.dtype == dtype:
                    return buf
            self.allocated += 1
        return np.empty(shape, dtype)

    def release(self, buf: Optional[np.ndarray]) -> None:
        if buf is None:
            return
        with self._lock:
            if len(self._free) < self.keep and not any(b is buf for b in self._free):
                self._free.append(buf)


def decode_hint(segmenter: Segmenter) -> DecodeHint:
    """The size a frame of (h, w) is resampled to for ``segmenter``'s input (its letterbox or
    stretch region): a reduced-size decode down to that loses nothing the model would see."""
    input_h, input_w = segmenter.model.input_size
    mode = segmenter.mode

    def hint(frame_h: int, frame_w: int) -> Tuple[int, int]:
        g = make_geometry(frame_h, frame_w, input_h, input_w, mode)
        return g.scaled_h, g.scaled_w
    return hint


class _Worker:
    """One inference thread. Worker 0 runs the pipeline's segmenter itself; the others each run a
    clone of it (their own interpreter), rebuilt after a swap before they take a frame."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.name = INFERENCE if index == 0 else f"{INFERENCE}-{index + 1}"
        self.replica: Optional[Segmenter] = None
        self.replica_of: Optional[Segmenter] = None
        self.failed_for: Optional[Segmenter] = None  # could not clone this one: wait for a swap
        self.busy_since: Optional[float] = None  # monotonic start of its running invoke()

    def runner(self, segmenter: Segmenter) -> Optional[Segmenter]:
        """The segmenter this worker invokes for ``segmenter`` (None: its clone failed)."""
        if self.index == 0:
            return segmenter
        if self.replica_of is not segmenter:
            if self.failed_for is segmenter:
                return None
            self.replica = self.replica_of = None  # the old interpreter goes before the new one comes
            try:
                self.replica = segmenter.clone()
            except EdgeAgentError as exc:
                self.failed_for = segmenter
                log.error("inference worker %s cannot load a second interpreter: %s", self.name, exc)
                return None
            self.replica_of, self.failed_for = segmenter, None
        return self.replica

    def mark(self, started: Optional[float]) -> None:
        """``stages.infer``'s invoke marker: when this worker's running invoke() began (None: idle)."""
        self.busy_since = started


@dataclass
class CameraSource:
    """One camera of a pipeline: its id ("" for a ``[source]`` config), its opened source, and
    whether it is processed frame by frame (None: ``PipelineSettings.lossless``)."""
    id: str
    source: Any
    lossless: Optional[bool] = None


class _Stream:
    """A camera's runtime state: capture thread, slot index, post slot, output, telemetry and the
    order of its results (tickets, under the pipeline's order lock)."""

    def __init__(self, index: int, camera: CameraSource, lossless: bool, output: FrameOutput,
                 post_slot: LatestSlot) -> None:
        self.index = index
        self.id = camera.id
        self.source = camera.source
        self.lossless = lossless
        self.output = output
        self.post_slot = post_slot
        self.eos = threading.Event()
        self.tickets = 0
        self.next_out = 0
        self.done: Dict[int, Optional["_Inferred"]] = {}
        self.dropped_publish = 0
        self.telemetry: Any = None  # its CameraTelemetry, set once the pipeline's Telemetry exists
        self.suffix = f"-{camera.id}" if camera.id else ""  # thread names


@dataclass
class _Captured:
    frame: Frame
    prepared: Optional[np.ndarray]  # from Pipeline.inputs; back to it after the copy into the tensor
    geometry: Geometry
    segmenter: Segmenter
    timings: Dict[str, float]
    ready: float  # monotonic time the input was ready


@dataclass
class _Inferred:
    captured: _Captured
    label_map: np.ndarray  # from Pipeline.label_maps; back to it after postprocess + encode
    segmenter: Segmenter


@dataclass
class _Outgoing:
    stream: _Stream
    seq: int
    messages: List[Tuple[str, bytes]]
    timings: Dict[str, float]
    capture_monotonic: float


class Pipeline:
    """Runs one source, or several cameras (a list of :class:`CameraSource`), through one
    (swappable) segmenter and one pool of inference workers into one sink."""

    def __init__(
        self,
        source: Any,
        segmenter: Segmenter,
        sink: Sink,
        settings: Optional[PipelineSettings] = None,
        on_first_frame: Optional[Callable[[], None]] = None,
        extra_stats: Callable[[], Dict[str, Any]] = lambda: {},
    ) -> None:
        self.sink = sink
        self.settings = settings or PipelineSettings()
        cameras = source if isinstance(source, (list, tuple)) else [CameraSource("", source)]
        if not cameras:
            raise ValueError("a pipeline needs at least one camera")
        self._segmenter = segmenter
        self._pending_segmenter: Optional[Segmenter] = None
        self._swapped = threading.Event()
        self._on_first_frame = on_first_frame
        self._extra_stats = extra_stats
        n = max(1, self.settings.interpreters)
        k = len(cameras)
        self.inputs = BufferPool(keep=1 + 2 * k + n)  # prepared input buffers (capture -> inference)
        self.label_maps = BufferPool(keep=1 + 2 * k + n)  # label maps (inference -> postprocess)
        self._workers = [_Worker(i) for i in range(n)]
        self._slots = FrameSlots(k, on_drop=lambda item: self.inputs.release(item.prepared))
        self._streams = [
            _Stream(i, cam, self.settings.lossless if cam.lossless is None else cam.lossless,
                    FrameOutput(self.settings.output, cam.id),
                    LatestSlot(on_drop=lambda item: self.label_maps.release(item.label_map)))
            for i, cam in enumerate(cameras)]
        self._out: Deque[Optional[_Outgoing]] = collections.deque()
        self._out_cond = threading.Condition()
        self._stop = threading.Event()
        self._paused = threading.Event()
        self._busy = 0  # workers between "not paused" and the end of their frame
        self._busy_cond = threading.Condition()
        self._adopt_lock = threading.Lock()
        self._take_lock = threading.Lock()  # a frame and its ticket are taken together
        self._held = 0  # frames taken and not yet handed on (all cameras)
        self._order_cond = threading.Condition()  # each camera's results reach postprocess in ticket order
        self._workers_running = 0
        self._ended = 0  # cameras whose end of stream reached the publish thread
        self._threads: Dict[str, threading.Thread] = {}
        s = self.settings
        self.telemetry = Telemetry(sink, s.timings, s.timings_interval_s, s.stats_interval_s, self._state,
                                   cameras=[st.id for st in self._streams])
        for st in self._streams:
            st.telemetry = self.telemetry.camera(st.id)
        self._first_done = False

    # -- control --------------------------------------------------------------------------------
    @property
    def segmenter(self) -> Segmenter:
        return self._segmenter

    @property
    def source(self) -> Any:
        """The (first) camera's source."""
        return self._streams[0].source

    @property
    def cameras(self) -> List[Tuple[str, Any]]:
        """(id, source) of every camera."""
        return [(st.id, st.source) for st in self._streams]

    @property
    def counters(self) -> Any:
        """The totals over every camera (live; a :class:`PipelineCounters` for one camera)."""
        return self.telemetry.counters

    @property
    def fps(self) -> float:
        return self.telemetry.fps

    def start(self) -> "Pipeline":
        self.telemetry.start()
        self._hint_source(self._segmenter)
        self._workers_running = len(self._workers)
        loops: List[Tuple[str, Callable[[], None]]] = [
            (CAPTURE + st.suffix, functools.partial(self._capture_loop, st)) for st in self._streams]
        loops += [(w.name, functools.partial(self._inference_loop, w)) for w in self._workers]
        loops += [(POSTPROCESS + st.suffix, functools.partial(self._post_loop, st)) for st in self._streams]
        loops += [(PUBLISH, self._publish_loop)]
        for name, target in loops:
            thread = threading.Thread(target=self._guard(target), name=f"pipeline-{name}", daemon=True)
            self._threads[name] = thread
            thread.start()
        return self

    def _alive(self, name: str) -> bool:
        thread = self._threads.get(name)
        return thread is not None and thread.is_alive()

    def _inferring(self) -> bool:
        """Some inference worker is still running."""
        return any(self._alive(w.name) for w in self._workers)

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._slots.close()
        for st in self._streams:
            st.post_slot.close()
        with self._out_cond:
            self._out_cond.notify_all()
        deadline = time.monotonic() + timeout
        for thread in self._threads.values():
            thread.join(max(0.0, deadline - time.monotonic()))
        for st in self._streams:
            try:
                st.source.close()
            except Exception as exc:  # closing a vanished camera must not fail shutdown
                log.warning("closing the source%s: %s", f" of camera {st.id}" if st.id else "", exc)

    def _all_eos(self) -> bool:
        return all(st.eos.is_set() for st in self._streams)

    @property
    def finished(self) -> bool:
        """Every (finite) source ended and everything they produced was published."""
        return self._all_eos() and not self._inferring() and not any(
            self._alive(n) for n in self._threads if n.startswith(POSTPROCESS) or n == PUBLISH)

    def wait_finished(self, timeout: Optional[float] = None) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.finished:
            if deadline is not None and time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        return True

    def stuck_for(self) -> float:
        """Seconds the current ``invoke()`` has been running (0 when the interpreter is idle)."""
        started = [w.busy_since for w in self._workers if w.busy_since is not None]
        return time.monotonic() - min(started) if started else 0.0

    def healthy(self, inference_timeout_s: float) -> bool:
        """Every thread alive (or finished with the source) and no invoke() over the timeout.

        Waiting for frames (a camera being reopened) is healthy; a hung interpreter is not.
        """
        threads_ok = all(self._alive(n) for n in self._threads if not self._ended_capture(n)) or self._all_eos()
        return threads_ok and not self._stop.is_set() and self.stuck_for() < inference_timeout_s

    def _ended_capture(self, name: str) -> bool:
        """A capture thread whose finite source ended (while other cameras go on)."""
        return any(name == CAPTURE + st.suffix and st.eos.is_set() for st in self._streams)

    def pause(self, timeout: float = 30.0) -> bool:
        """Stop inferring (capture keeps the newest frame) and wait until the interpreter is idle."""
        self._paused.set()
        with self._busy_cond:
            return self._busy_cond.wait_for(lambda: self._busy == 0, timeout)

    def resume(self) -> None:
        self._paused.clear()

    @property
    def paused(self) -> bool:
        return self._paused.is_set()

    def swap_segmenter(self, new: Segmenter, timeout: float = 30.0) -> Segmenter:
        """Swap the model between two frames (the model manager's call); returns the old one.

        If the inference thread does not pick it up in ``timeout`` (it is stuck in invoke, or not
        running) the swap is done directly: the next frame uses the new model either way.
        """
        old = self._segmenter
        self._swapped.clear()
        self._pending_segmenter = new
        if not (self._inferring() and not self._paused.is_set() and self._swapped.wait(timeout)):
            self._segmenter, self._pending_segmenter = new, None
            self._hint_source(new)
        return old

    def _hint_source(self, segmenter: Segmenter) -> None:
        """Tell the source the size ``segmenter`` needs (reduced JPEG/MJPEG decode); full size
        when overlays are published (they are drawn on the frame at its own resolution)."""
        hint = None if self.settings.output.overlay else decode_hint(segmenter)
        for st in self._streams:
            set_hint = getattr(st.source, "set_decode_hint", None)
            if callable(set_hint):
                set_hint(hint)

    # -- threads --------------------------------------------------------------------------------
    def _guard(self, target: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            try:
                target()
            except Exception:  # a bug must be loud, but must not leave a zombie pipeline
                log.exception("pipeline thread %s crashed", threading.current_thread().name)
                self.telemetry._first.counters.last_error = f"{threading.current_thread().name} crashed"
                self._stop.set()
        return run

    def _capture_loop(self, stream: _Stream) -> None:
        """One camera's capture thread: read, preprocess, into its slot. A source that fails is
        the source's to reopen (``ReopeningSource``); other cameras go on meanwhile."""
        slots, i, source, counters = self._slots, stream.index, stream.source, stream.telemetry.counters
        while not self._stop.is_set():
            if stream.lossless and not slots.wait_empty(i, 0.5):
                continue
            t0 = time.monotonic()
            try:
                frame = source.read(timeout=0.5)
            except EndOfStream:
                log.info("source finished%s", f" (camera {stream.id})" if stream.id else "")
                stream.eos.set()
                slots.close(i)
                return
            if frame is None:
                continue
            threshold = system.fit_mmap_threshold(frame.height * frame.width * 3)
            if threshold:
                log.info("allocator: mmap threshold %d KiB for %dx%d frames", threshold >> 10, frame.width, frame.height)
            item = self._prepare(frame, t0, counters)
            if item is not None:
                counters.captured += 1
                slots.put(i, item)

    def _prepare(self, frame: Frame, t0: float, counters: PipelineCounters) -> Optional[_Captured]:
        """``preprocess`` on the capture thread, into a fresh buffer (it waits in the capture slot
        while the interpreter runs the previous frame)."""
        t1 = time.monotonic()
        segmenter = self._segmenter
        buf = self.inputs.acquire(segmenter.model.input_buffer_shape(), segmenter.model.input.dtype)
        try:
            prepared, geometry = stages.prepare(segmenter.model, frame.image, segmenter.mode,
                                                frame_hw=frame.size, out=buf)
        except (ValueError, EdgeAgentError) as exc:
            self.inputs.release(buf)
            counters.last_error = f"bad frame: {exc}"
            log.warning("frame %s skipped: %s", frame.seq, exc)
            return None
        t2 = time.monotonic()
        return _Captured(frame, prepared, geometry, segmenter,
                         {"capture": (t1 - t0) * 1e3, "preprocess": (t2 - t1) * 1e3}, t2)

    def _adopt_pending_segmenter(self) -> None:
        with self._adopt_lock:
            pending = self._pending_segmenter
            if pending is not None:
                self._segmenter, self._pending_segmenter = pending, None
                self._hint_source(pending)
                self._swapped.set()

    def _set_busy(self, delta: int) -> None:
        with self._busy_cond:
            self._busy += delta
            self._busy_cond.notify_all()

    def _inference_loop(self, worker: _Worker) -> None:
        try:
            while not self._stop.is_set():
                self._adopt_pending_segmenter()
                runner = worker.runner(self._segmenter)  # a clone is (re)built here, before a frame waits
                self._set_busy(+1)  # before the pause check: pause() waits for it to end
                if self._paused.is_set() or runner is None:
                    self._set_busy(-1)
                    time.sleep(0.02)
                    continue
                try:
                    with self._take_lock:
                        # at most one frame per worker between taken and handed on: results held
                        # for the order (a slow worker's frame) never pile up
                        with self._order_cond:
                            room = self._order_cond.wait_for(
                                lambda: self._held < len(self._workers) or self._stop.is_set(), 0.2)
                        i, item = self._slots.take(timeout=0.2) if room else (-1, None)
                        if item is not None:
                            stream = self._streams[i]
                            with self._order_cond:
                                ticket = stream.tickets
                                stream.tickets += 1
                                self._held += 1
                    if item is None:
                        if self._slots.exhausted:
                            return
                        continue
                    inferred: Optional[_Inferred] = None
                    try:
                        inferred = self._run_inference(item, worker, stream)
                    finally:
                        self._hand_on(stream, ticket, inferred)
                finally:
                    self._set_busy(-1)
        finally:
            with self._order_cond:
                self._workers_running -= 1
                if self._workers_running == 0:  # the last worker out ends the post stages' input
                    for st in self._streams:
                        st.post_slot.close()

    def _hand_on(self, stream: _Stream, ticket: int, inferred: Optional[_Inferred]) -> None:
        """Pass a camera's results to its postprocess in the order its frames were taken (None:
        the frame failed, its turn passes)."""
        with self._order_cond:
            stream.done[ticket] = inferred
            while stream.next_out in stream.done:
                item = stream.done.pop(stream.next_out)
                stream.next_out += 1
                self._held -= 1
                self._order_cond.notify_all()
                if item is None:
                    continue
                if stream.lossless:
                    while not stream.post_slot.wait_empty(0.5) and not self._stop.is_set():
                        pass
                stream.post_slot.put(item)

    def _run_inference(self, item: _Captured, worker: _Worker, stream: _Stream) -> Optional[_Inferred]:
        """``inference``: memcpy into the input tensor, ``invoke()``, label map out."""
        segmenter = self._segmenter
        t0 = time.monotonic()
        item.timings["queue"] = (t0 - item.ready) * 1e3
        if item.segmenter is not segmenter:  # the model was swapped since capture
            self.inputs.release(item.prepared)
            item.prepared, item.geometry = stages.prepare(segmenter.model, item.frame.image, segmenter.mode,
                                                          frame_hw=item.frame.size)
            item.segmenter = segmenter
        runner = worker.runner(segmenter)
        if runner is None:  # its clone of a just-swapped model failed: the frame's turn passes
            self.inputs.release(item.prepared)
            item.prepared = None
            return None
        out = self.label_maps.acquire((segmenter.model.output.height, segmenter.model.output.width), np.uint8)
        try:
            label_map = stages.infer(runner.model, item.prepared, worker.mark, out=out)
        except EdgeAgentError as exc:
            self.label_maps.release(out)
            stream.telemetry.inference_failed(str(exc))
            log.error("%s", exc)
            return None
        finally:
            self.inputs.release(item.prepared)  # copied into the tensor (or failed): reusable
            item.prepared = None
        item.timings["inference"] = stages.ms_since(t0)
        stream.telemetry.inferred()
        return _Inferred(item, label_map, segmenter)

    def _post_loop(self, stream: _Stream) -> None:
        while not self._stop.is_set():
            item: Optional[_Inferred] = stream.post_slot.get(timeout=0.2)
            if item is None:
                if self._all_eos() and not self._inferring():
                    self._enqueue(stream, None)
                    return
                continue
            self._enqueue(stream, self._postprocess(stream, item))

    def _postprocess(self, stream: _Stream, item: _Inferred) -> _Outgoing:
        """``postprocess`` + ``encode`` (the stage functions, with the camera's rate gates)."""
        cap = item.captured
        timings = dict(cap.timings)
        try:
            messages = stream.output(cap.frame, item.label_map, cap.geometry, item.segmenter, timings)
        finally:
            self.label_maps.release(item.label_map)  # encoded: nothing refers to it any more
        stream.telemetry.counters.processed += 1
        if not self._first_done:
            self._first_done = True
            if self._on_first_frame:
                self._on_first_frame()
        return _Outgoing(stream, cap.frame.seq, messages, timings, cap.frame.monotonic)

    def _enqueue(self, stream: _Stream, item: Optional[_Outgoing]) -> None:
        with self._out_cond:
            if stream.lossless:
                self._out_cond.wait_for(
                    lambda: len(self._out) < self.settings.publish_queue or self._stop.is_set())
            if item is not None and len(self._out) >= self.settings.publish_queue:
                old = self._out.popleft()
                owner = old.stream if old is not None else stream
                owner.telemetry.counters.dropped_publish += 1
            self._out.append(item)  # None marks the end of a camera's finite source
            self._out_cond.notify()

    def _publish_loop(self) -> None:
        while not self._stop.is_set():
            with self._out_cond:
                self._out_cond.wait_for(lambda: self._out or self._stop.is_set(), 0.25)
                item = self._out.popleft() if self._out else False
                self._out_cond.notify_all()
            if item is None:  # a camera's end; after the last: flush the interval summaries and finish
                self._ended += 1
                if self._ended < len(self._streams):
                    continue
                self.telemetry.flush()
                return
            if item:
                self._publish_frame(item)
            self.telemetry.tick()

    def _publish_frame(self, item: _Outgoing) -> None:
        t0 = time.monotonic()
        masks, failed = stages.publish(self.sink, item.messages)
        counters = item.stream.telemetry.counters
        counters.published_masks += masks
        counters.publish_failed += failed
        t1 = time.monotonic()
        item.timings["publish"] = (t1 - t0) * 1e3
        item.timings["end_to_end"] = (t1 - item.capture_monotonic) * 1e3
        item.stream.telemetry.frame_done(item.seq, item.timings)

    # -- what telemetry asks the runner ---------------------------------------------------------
    def _camera_dropped(self, stream: _Stream) -> Dict[str, int]:
        return {
            "capture": self._slots.dropped[stream.index],
            "postprocess": stream.post_slot.dropped,
            "publish": stream.telemetry.counters.dropped_publish,
        }

    def dropped(self) -> Dict[str, int]:
        """Frames dropped per hand-off, over every camera."""
        total = {"capture": 0, "postprocess": 0, "publish": 0}
        for st in self._streams:
            for key, n in self._camera_dropped(st).items():
                total[key] += n
        return total

    def camera_states(self) -> Dict[str, str]:
        """id -> its source's state (open, down, ...; "" for a source without stats)."""
        out = {}
        for st in self._streams:
            source_stats = getattr(st.source, "stats", None)
            out[st.id] = source_stats().get("state", "") if callable(source_stats) else ""
        return out

    def _state(self) -> Dict[str, Any]:
        state: Dict[str, Any] = {"dropped": self.dropped(), "paused": self._paused.is_set(), "cameras": {}}
        for st in self._streams:
            cam: Dict[str, Any] = {"dropped": self._camera_dropped(st)}
            source_stats = getattr(st.source, "stats", None)
            if callable(source_stats):
                cam["source"] = source_stats()
            state["cameras"][st.id] = cam
        if len(self._streams) == 1 and "source" in state["cameras"][self._streams[0].id]:
            state["source"] = state["cameras"][self._streams[0].id]["source"]  # as before cameras
        state.update(self._extra_stats())
        return state

    def stats(self) -> Dict[str, Any]:
        return self.telemetry.stats()
