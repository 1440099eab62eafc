"""The output half of the per-frame stages (``encode``, ``publish``) and the whole per-frame path.

The stage vocabulary and ``preprocess``/``inference``/``postprocess`` are
:mod:`edge_agent.inference.stages` (re-exported here, so the pipeline and ``bench`` use one module).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Protocol, Tuple

import numpy as np

from edge_agent.config import Config, PublishConfig
from edge_agent.inference import postprocess as post
from edge_agent.inference.preprocess import Geometry
from edge_agent.inference.stages import (BENCH_STAGES, PIPELINE_STAGES, SEGMENT_STAGES, Masks, infer,
                                         ms_since, postprocess, prepare)
from edge_agent.output import encode as enc
from edge_agent.output.throttle import RateGate
from edge_agent.output.topics import camera_suffix
from edge_agent.output.visuals import overlay

__all__ = ["BENCH_STAGES", "PIPELINE_STAGES", "SEGMENT_STAGES", "Masks", "infer", "ms_since", "postprocess",
           "prepare", "RESULT", "MASK", "OVERLAY", "Sink", "EncodeOptions", "encode", "publish",
           "OutputSettings", "FrameOutput", "run_frame", "camera_suffix"]

# Topic suffixes of what a frame produces (``<prefix>/<device>/<suffix>``).
RESULT, MASK, OVERLAY = "result", "mask", "overlay"


class Sink(Protocol):
    def publish(self, suffix: str, payload: Any, qos: Optional[int] = None, retain: bool = False) -> bool: ...


# -- encode / publish ------------------------------------------------------------------------------

@dataclass
class EncodeOptions:
    mask: bool = True  # this frame's mask passes the rate gate
    mask_resolution: str = "model"  # model | frame
    png_compression: int = 1
    mask_format: str = "palette"  # palette | grey
    overlay: bool = False  # this frame's overlay passes its rate gate
    overlay_jpeg_quality: int = 80
    result: bool = True


def encode(frame: Any, masks: Masks, model_sha: str, opts: EncodeOptions,
           last_mask_seq: Optional[int], labels: Optional[List[str]] = None, camera: str = ""
           ) -> Tuple[List[Tuple[str, bytes]], Optional[int]]:
    """``encode``: the messages of one frame, and the seq of the newest published mask
    (``labels`` name the classes in the overlay's legend). Every message carries the frame's seq
    (and ``camera`` when not ""): the JSON as fields, the mask PNG and overlay JPEG as a frame label
    (:func:`edge_agent.output.encode.frame_label`), so a consumer never pairs two frames' parts."""
    messages: List[Tuple[str, bytes]] = []
    mask_hw = None
    label = enc.frame_label(frame.seq, camera) if opts.mask or opts.overlay else None
    if opts.mask:
        # The model-resolution mask is a row-strided view of the label map: the PNG writer copies
        # its rows as they are (no contiguous copy first).
        mask = masks.frame_mask if opts.mask_resolution == "frame" else masks.model_mask
        messages.append((MASK, enc.encode_mask_png(mask, opts.png_compression,
                                                   coloured=opts.mask_format == "palette", label=label)))
        last_mask_seq = frame.seq
        mask_hw = mask.shape[:2]
    if opts.overlay and masks.frame_mask is not None:
        # A reduced-size decode (the pipeline does not ask for one with overlays on) is drawn at
        # its own size rather than failing on the shape.
        shown = post.resize_labels(masks.frame_mask, *frame.image.shape[:2])
        messages.append((OVERLAY, enc.encode_jpeg(overlay(frame.image, shown, labels=labels),
                                                   opts.overlay_jpeg_quality, label=label)))
    if opts.result:
        doc = {
            "seq": frame.seq,
            "capture_ts": round(frame.timestamp, 6),
            "frame": {"w": frame.width, "h": frame.height},
            "mask_seq": last_mask_seq,
            "mask": ({"w": mask_hw[1], "h": mask_hw[0], "resolution": opts.mask_resolution}
                     if mask_hw else None),
            "classes": {k: round(v, 5) for k, v in masks.fractions.items()},
            "model": model_sha[:12],
        }
        if camera:
            doc["camera"] = camera
        messages.insert(0, (RESULT, enc.to_json(doc)))
    if camera:  # a camera of [[cameras]]: its own topics, camera/<id>/<kind>
        messages = [(camera_suffix(camera, kind), payload) for kind, payload in messages]
    return messages, last_mask_seq


def publish(sink: Sink, messages: List[Tuple[str, bytes]]) -> Tuple[int, int]:
    """``publish``: hand every message to the sink; (masks published, publishes failed)."""
    masks = failed = 0
    for suffix, payload in messages:
        if not sink.publish(suffix, payload):
            failed += 1
        elif suffix == MASK or suffix.endswith("/" + MASK):  # camera/<id>/mask
            masks += 1
    return masks, failed


# -- postprocess + encode for a stream of frames ------------------------------------------------------

@dataclass
class OutputSettings:
    """What each frame produces (``[publish]`` of the config)."""

    mask_every_n: int = PublishConfig.mask_every_n  # defaults: the config schema's, one place
    mask_max_hz: float = PublishConfig.mask_max_hz
    mask_resolution: str = PublishConfig.mask_resolution  # model | frame
    png_compression: int = PublishConfig.png_compression
    mask_format: str = PublishConfig.mask_format
    result: bool = PublishConfig.result
    overlay: bool = PublishConfig.overlay
    overlay_max_hz: float = PublishConfig.overlay_max_hz
    overlay_jpeg_quality: int = PublishConfig.overlay_jpeg_quality

    @classmethod
    def from_config(cls, config: Config) -> "OutputSettings":
        p = config.publish
        return cls(mask_every_n=p.mask_every_n, mask_max_hz=p.mask_max_hz, mask_resolution=p.mask_resolution,
                   png_compression=p.png_compression, mask_format=p.mask_format, result=p.result,
                   overlay=p.overlay or config.homeassistant.enabled,  # Home Assistant's image entity shows it
                   overlay_max_hz=p.overlay_max_hz, overlay_jpeg_quality=p.overlay_jpeg_quality)


class FrameOutput:
    """``postprocess`` + ``encode`` of consecutive frames: owns the mask/overlay rate gates and the
    seq of the newest published mask. One per stream (``camera``: its id, "" for the legacy
    ``[source]``), used from one thread."""

    def __init__(self, settings: Optional[OutputSettings] = None, camera: str = "") -> None:
        self.settings = s = settings or OutputSettings()
        self.camera = camera
        self._mask_gate = RateGate(s.mask_every_n, s.mask_max_hz)
        self._overlay_gate = RateGate(1, s.overlay_max_hz)
        self._last_mask_seq: Optional[int] = None

    def __call__(self, frame: Any, label_map: np.ndarray, geometry: Geometry, segmenter: Any,
                 timings: Dict[str, float]) -> List[Tuple[str, bytes]]:
        s = self.settings
        t0 = time.monotonic()
        # The rate gates first: nothing is computed for a message they drop (the frame-size mask
        # only for a published frame-resolution mask or overlay, fractions only for a result).
        opts = EncodeOptions(mask=self._mask_gate.allow(), mask_resolution=s.mask_resolution,
                             png_compression=s.png_compression, mask_format=s.mask_format,
                             overlay=s.overlay and self._overlay_gate.allow(),
                             overlay_jpeg_quality=s.overlay_jpeg_quality, result=s.result)
        need_frame_mask = (opts.mask and s.mask_resolution == "frame") or opts.overlay
        masks = postprocess(label_map, geometry, segmenter.labels, need_frame_mask, fractions=s.result)
        t1 = time.monotonic()
        messages, self._last_mask_seq = encode(frame, masks, segmenter.model.file.sha256, opts,
                                               self._last_mask_seq, segmenter.labels, self.camera)
        timings["postprocess"] = (t1 - t0) * 1e3
        timings["encode"] = ms_since(t1)
        return messages


def run_frame(segmenter: Any, frame: Any, output: FrameOutput, sink: Sink, on_invoke=None) -> Dict[str, float]:
    """Every stage of the daemon's per-frame path, in order, on the calling thread; its timings (ms).

    What ``bench --pipeline`` and ``bench/perf.py`` time: the same functions the pipeline threads
    run, without the hand-offs (so no ``capture``/``queue``; ``end_to_end`` from the start of
    ``preprocess`` to the end of ``publish``).
    """
    timings: Dict[str, float] = {}
    t0 = time.monotonic()
    prepared, geometry = prepare(segmenter.model, frame.image, segmenter.mode, frame_hw=frame.size)
    t1 = time.monotonic()
    label_map = infer(segmenter.model, prepared, on_invoke)
    t2 = time.monotonic()
    timings["preprocess"], timings["inference"] = (t1 - t0) * 1e3, (t2 - t1) * 1e3
    messages = output(frame, label_map, geometry, segmenter, timings)
    t3 = time.monotonic()
    publish(sink, messages)
    timings["publish"] = ms_since(t3)
    timings["end_to_end"] = ms_since(t0)
    return timings
