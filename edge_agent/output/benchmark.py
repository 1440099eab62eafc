"""Benchmarks as trustworthy as TFLite's ``benchmark_model``: ``edge-agent bench`` and its library.

What is measured, and why this way:

* ``init_ms``: loading the model (read + verify + sha256 + interpreter + allocate), timed by the
  caller around the :class:`~edge_agent.inference.segmenter.Segmenter` construction.
* ``first_inference_ms``: the first ``invoke()`` alone (delegates and XNNPACK pack weights
  lazily, so it is slower); then ``warmup`` runs (average reported), then the measured runs.
* Invoke-only (default): the input is prepared once per distinct input frame and copied into
  the tensor OUTSIDE the timed region; only ``invoke()`` is timed, like ``benchmark_model``.
* ``pipeline``: every stage of the daemon's per-frame path at a given frame size, run by the
  daemon's own stage functions (:func:`edge_agent.output.stages.run_frame`) and timed with the
  same stage names (:data:`~edge_agent.output.stages.BENCH_STAGES`: preprocess, inference,
  postprocess, encode, end_to_end); ``invoke`` is still ``invoke()`` alone.
* Run count follows ``benchmark_model``: at least ``runs`` runs and at least ``min_secs``
  seconds, but never past ``max_secs`` (``stopped`` tells which limit ended it) nor
  ``max_count`` runs (or until the caller cancels: ``stopped: cancelled``).
* ``fps`` is ``1000 / mean`` of the timed path (invoke, or end to end with ``pipeline``): the
  sequential rate. The daemon overlaps stages on threads and can go faster than that.

One function, :func:`make_result`, builds the result document for the local command and for the
remote benchmark (``cmd/benchmark``), so both have exactly the same shape.
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from edge_agent import __version__

from edge_agent import system
from edge_agent.output.stages import BENCH_STAGES, FrameOutput, run_frame
from edge_agent.output.stages import prepare as stages_prepare
from edge_agent.errors import EdgeAgentError
from edge_agent.inference.segmenter import Segmenter
from edge_agent.sources.base import Frame
from edge_agent.output.timing import summarize

RESULT_SCHEMA = "edge-agent/benchmark/1"
DEFAULT_FRAME_SIZE = (640, 480)  # (w, h) for random and pattern inputs
MAX_INPUT_IMAGES = 64
STAGES = BENCH_STAGES
SUMMARY_KEYS = ("count", "min", "max", "mean", "std", "p50", "p90", "p99")
_FRAME_SIZE = re.compile(r"([0-9]{1,5})x([0-9]{1,5})")
FRAME_SIDE = (16, 8192)

# phase ("warmup" | "runs"), done, total (total is the planned run count; min_secs may exceed it)
Progress = Callable[[str, int, int], None]


@dataclass
class BenchSettings:
    runs: int = 50
    warmup: int = 1
    min_secs: float = 0.0
    max_secs: Optional[float] = None  # None: no time limit
    max_count: Optional[int] = None  # hard cap on runs when min_secs extends them
    pipeline: bool = False
    frame_size: Optional[Tuple[int, int]] = None  # (w, h); None: 640x480, or an image's own size
    input: str = "random"  # random | pattern | an image file | a folder of images
    samples: bool = True  # keep every run's latency (for plots)

    def check(self) -> None:
        if self.runs < 1:
            raise EdgeAgentError(f"--runs must be >= 1, got {self.runs}")
        if self.warmup < 0:
            raise EdgeAgentError(f"--warmup must be >= 0, got {self.warmup}")
        if self.min_secs < 0 or (self.max_secs is not None and self.max_secs <= 0):
            raise EdgeAgentError("--min-secs must be >= 0 and --max-secs > 0")


def parse_frame_size(text: str) -> Tuple[int, int]:
    """``"640x480"`` -> (640, 480); ValueError with the reason otherwise."""
    m = _FRAME_SIZE.fullmatch(text.strip().lower())
    if not m:
        raise ValueError(f"frame size {text!r}: expected WxH, e.g. 640x480")
    w, h = int(m.group(1)), int(m.group(2))
    lo, hi = FRAME_SIDE
    if not (lo <= w <= hi and lo <= h <= hi):
        raise ValueError(f"frame size {text!r}: each side must be {lo}..{hi}")
    return w, h


# --------------------------------------------------------------------------- inputs


def load_inputs(spec: str, frame_size: Optional[Tuple[int, int]] = None, seed: int = 0) -> List[np.ndarray]:
    """RGB uint8 frames to benchmark on: ``random`` (seeded noise), ``pattern``, a file or folder.

    Images are used at their own size unless ``frame_size`` is given (then resized to it).
    """
    import cv2

    from edge_agent.sources.images import list_images, read_image
    from edge_agent.sources.synthetic import pattern

    if spec in ("random", "pattern"):
        w, h = frame_size or DEFAULT_FRAME_SIZE
        if spec == "pattern":
            return [pattern(w, h, 0)]
        return [np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)]
    if os.path.isdir(spec):
        paths = list_images(spec)[:MAX_INPUT_IMAGES]
        if not paths:
            raise EdgeAgentError(f"{spec}: no images (.jpg, .jpeg, .png, .bmp) in this folder")
    elif os.path.exists(spec):
        paths = [spec]
    else:
        raise EdgeAgentError(f"--input {spec!r}: not 'random', 'pattern', an image file or a folder")
    frames = [read_image(p) for p in paths]
    if frame_size is not None:
        frames = [cv2.resize(f, frame_size, interpolation=cv2.INTER_AREA) for f in frames]
    return frames


# --------------------------------------------------------------------------- device state


def device_state() -> Dict[str, Any]:
    """Temperature and throttling now (None where the platform does not tell)."""
    return {"cpu_temp_c": system.cpu_temp_c(), "throttled": system.throttled()}


def device_info(before: Dict[str, Any], after: Dict[str, Any]) -> Dict[str, Any]:
    host = system.host_info()
    return {
        "board": host["board"], "machine": host["machine"], "cpu_count": host["cpu_count"],
        "os": host["os"], "hostname": host["hostname"],
        "cpu_temp_c_before": before["cpu_temp_c"], "cpu_temp_c_after": after["cpu_temp_c"],
        "throttled_before": before["throttled"], "throttled_after": after["throttled"],
    }


# --------------------------------------------------------------------------- the result


def _rounded(summary: Dict[str, float]) -> Dict[str, float]:
    return {k: (v if k == "count" else round(v, 4)) for k, v in summary.items()}


def make_result(
    info: Dict[str, Any],
    settings: BenchSettings,
    frame_size: Tuple[int, int],
    init_ms: Optional[float],
    first_ms: float,
    warmup_ms: Sequence[float],
    invoke_ms: Sequence[float],
    stages: Optional[Dict[str, Sequence[float]]],
    stopped: str,
    duration_s: float,
    before: Dict[str, Any],
    after: Dict[str, Any],
    context: Optional[Dict[str, Any]] = None,
) -> Dict[str, Any]:
    """THE benchmark result document (local ``--json`` and remote ``done`` answers alike).

    ``context`` says where it ran: ``{"device_id": ..., "live_pipeline": ...}`` for a remote
    benchmark on an agent, None locally (the keys are present either way, so shapes match).
    """
    invoke = _rounded(summarize(invoke_ms))
    stage_stats = {k: _rounded(summarize(v)) for k, v in stages.items()} if stages else None
    timed = stage_stats["end_to_end"] if stage_stats else invoke
    fps = round(1000.0 / timed["mean"], 3) if timed.get("count") and timed["mean"] > 0 else None
    context = context or {}
    return {
        "schema": RESULT_SCHEMA,
        "agent_version": __version__,
        "device_id": context.get("device_id"),
        "started_at": round(time.time() - duration_s, 3),
        "model": {k: info.get(k) for k in ("name", "sha256", "size_bytes", "input_size", "input_dtype",
                                           "output_kind", "fallback_reason")},
        "runtime": info.get("runtime"),
        "runtime_version": info.get("runtime_version"),
        "delegate": info.get("delegate"),
        "threads": info.get("threads"),
        "settings": {
            "runs": settings.runs, "warmup": settings.warmup, "min_secs": settings.min_secs,
            "max_secs": settings.max_secs, "pipeline": settings.pipeline,
            "frame_size": list(frame_size), "input": settings.input,
            "preprocess": info.get("preprocess"),
        },
        "init_ms": None if init_ms is None else round(init_ms, 3),
        "first_inference_ms": round(first_ms, 3),
        "warmup_avg_ms": round(float(np.mean(warmup_ms)), 3) if len(warmup_ms) else None,
        "invoke": invoke,
        "stages": stage_stats,
        "fps": fps,
        "stopped": stopped,
        "duration_s": round(duration_s, 3),
        "peak_rss_mb": round(system.peak_rss_mb(), 1),
        "rss_mb": None if system.rss_mb() is None else round(system.rss_mb(), 1),
        "device": device_info(before, after),
        "live_pipeline": context.get("live_pipeline"),
        "samples_ms": [round(v, 3) for v in invoke_ms] if settings.samples else None,
    }


# --------------------------------------------------------------------------- running


class _Clock:
    """Run-count policy of benchmark_model: >= runs and >= min_secs, but <= max_secs/max_count."""

    def __init__(self, settings: BenchSettings, now: Callable[[], float],
                 cancelled: Callable[[], bool] = lambda: False) -> None:
        self.s = settings
        self.now = now
        self.start = now()
        self.cancelled = cancelled

    def elapsed(self) -> float:
        return self.now() - self.start

    def stop_reason(self, done: int) -> Optional[str]:
        if self.cancelled():
            return "cancelled"
        elapsed = self.elapsed()
        if self.s.max_secs is not None and elapsed >= self.s.max_secs:
            return "max_secs"
        if self.s.max_count is not None and done >= self.s.max_count:
            return "max_count"
        if done >= self.s.runs and elapsed >= self.s.min_secs:
            return "runs" if done == self.s.runs else "min_secs"  # min_secs kept it going
        return None


class _DiscardSink:
    """The benchmark times encoding, not the network: published payloads are dropped here."""

    def publish(self, suffix: str, payload: Any, qos: Optional[int] = None, retain: bool = False) -> bool:
        return True


class _InvokeClock:
    """Times ``invoke()`` alone inside :func:`run_frame` (the ``on_invoke`` hook of ``stages.infer``)."""

    def __init__(self) -> None:
        self.started = 0.0
        self.ms = 0.0

    def __call__(self, started: Optional[float]) -> None:
        if started is not None:
            self.started = started
        else:
            self.ms = (time.monotonic() - self.started) * 1e3


def _time_pipeline(segmenter: Segmenter, output: FrameOutput, frame: np.ndarray, seq: int) -> Dict[str, float]:
    """One frame through the daemon's per-frame stages; the bench stages plus ``invoke`` (ms)."""
    clock = _InvokeClock()
    t = run_frame(segmenter, Frame(frame, seq, time.time(), time.monotonic(), "bench"), output,
                  _DiscardSink(), on_invoke=clock)
    stages = {k: t[k] for k in STAGES if k != "end_to_end"}
    stages["end_to_end"] = sum(stages.values())  # the network is not part of it
    stages["invoke"] = clock.ms
    return stages


def run_benchmark(
    segmenter: Segmenter,
    settings: BenchSettings,
    init_ms: Optional[float] = None,
    progress: Optional[Progress] = None,
    context: Optional[Dict[str, Any]] = None,
    frames: Optional[List[np.ndarray]] = None,
    now: Callable[[], float] = time.perf_counter,
    cancelled: Callable[[], bool] = lambda: False,
) -> Dict[str, Any]:
    """Benchmark ``segmenter`` (its own interpreter: nothing else may invoke it meanwhile).

    ``cancelled()`` is polled after every run: True ends the measured runs (``stopped: cancelled``).
    """
    settings.check()
    before = device_state()
    frames = frames if frames is not None else load_inputs(settings.input, settings.frame_size)
    frame_size = (int(frames[0].shape[1]), int(frames[0].shape[0]))
    model = segmenter.model
    prepared = [stages_prepare(model, f, segmenter.mode)[0] for f in frames]
    output = FrameOutput() if settings.pipeline else None
    report = progress or (lambda phase, done, total: None)
    t_begin = now()

    def one_run(i: int) -> Dict[str, float]:
        if settings.pipeline:
            return _time_pipeline(segmenter, output, frames[i % len(frames)], i)
        model.set_input(prepared[i % len(prepared)])
        t0 = now()
        model.invoke()
        return {"invoke": (now() - t0) * 1e3}

    first_ms = one_run(0)["end_to_end" if settings.pipeline else "invoke"]
    warmup_ms: List[float] = []
    for i in range(settings.warmup):
        timings = one_run(i + 1)
        warmup_ms.append(timings["end_to_end" if settings.pipeline else "invoke"])
        report("warmup", i + 1, settings.warmup)
    clock = _Clock(settings, now, cancelled)
    measured: Dict[str, List[float]] = {}
    stopped = None
    while stopped is None:
        for stage, ms in one_run(len(measured.get("invoke", ()))).items():
            measured.setdefault(stage, []).append(ms)
        done = len(measured["invoke"])
        report("runs", done, settings.runs)
        stopped = clock.stop_reason(done)
    after = device_state()
    stages = {k: measured[k] for k in STAGES} if settings.pipeline else None
    return make_result(segmenter.info(), settings, frame_size, init_ms, first_ms, warmup_ms,
                       measured["invoke"], stages, stopped, now() - t_begin, before, after, context)


# --------------------------------------------------------------------------- text output


def _fmt(value: Optional[float], unit: str = "", digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}{unit}"


def _summary_line(s: Dict[str, float]) -> str:
    if not s.get("count"):
        return "count=0"
    return (f"count={s['count']} min={s['min']:.2f} max={s['max']:.2f} mean={s['mean']:.2f} "
            f"std={s['std']:.2f} p50={s['p50']:.2f} p90={s['p90']:.2f} p99={s['p99']:.2f} ms")


def _throttle_text(flags: Optional[Dict[str, Any]]) -> str:
    if flags is None:
        return "n/a (no vcgencmd)"
    active = [k for k, v in flags.items() if v is True]
    return f"{flags['raw']} ({', '.join(active) or 'none'})"


def format_text(result: Dict[str, Any]) -> str:
    """A benchmark_model-like report for people."""
    m, d, s = result["model"], result["device"], result["settings"]
    size_mb = (m.get("size_bytes") or 0) / 1e6
    h, w = (m.get("input_size") or [0, 0])[:2]
    lines = [
        f"Model: {m['name']} (sha256 {str(m['sha256'])[:12]}, {size_mb:.2f} MB, input {w}x{h} {m['input_dtype']})",
        f"Runtime: {result['runtime']} {result['runtime_version']} "
        f"({result['delegate'] or 'cpu'}, {result['threads']} threads)",
        f"Device: {d['board']} ({d['machine']}, {d['cpu_count']} CPUs); CPU temperature "
        f"{_fmt(d['cpu_temp_c_before'], ' C', 1)} -> {_fmt(d['cpu_temp_c_after'], ' C', 1)}; "
        f"throttling {_throttle_text(d['throttled_after'])}",
        f"Input: {s['input']} at {s['frame_size'][0]}x{s['frame_size'][1]}",
        f"Initialization: {_fmt(result['init_ms'], ' ms')}",
        f"First inference: {_fmt(result['first_inference_ms'], ' ms')}",
        f"Warmup ({s['warmup']} runs): avg {_fmt(result['warmup_avg_ms'], ' ms')}",
        f"Inference timings: {_summary_line(result['invoke'])}",
    ]
    if result["stages"]:
        lines.append(f"Pipeline stages at {s['frame_size'][0]}x{s['frame_size'][1]} (ms):")
        lines.append(f"  {'stage':<12}" + "".join(f"{k:>9}" for k in SUMMARY_KEYS))
        for stage, st in result["stages"].items():
            cells = "".join(f"{st[k]:>9}" if k == "count" else f"{st[k]:>9.2f}" for k in SUMMARY_KEYS)
            lines.append(f"  {stage:<12}{cells}")
    lines += [
        f"Throughput: {_fmt(result['fps'], ' fps')} ({'end to end' if result['stages'] else 'invoke'}, sequential)",
        f"Stopped by: {result['stopped']} after {result['duration_s']:.2f} s",
        f"Peak RSS: {result['peak_rss_mb']:.1f} MB",
    ]
    return "\n".join(lines)
