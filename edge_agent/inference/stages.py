"""The per-frame stages and their names: ONE vocabulary for the segmenter, the pipeline, ``bench``,
the ``timings`` messages and ``docs/asyncapi.yaml``.

Stages (milliseconds, keys of every timings document):

* ``capture``     reading the frame from the source (pipeline only)
* ``preprocess``  letterbox/stretch + normalise into an input buffer (thread-safe, no interpreter)
* ``queue``       waiting for the interpreter in the hand-off (pipeline only)
* ``inference``   everything that touches the interpreter: copy the input in, ``invoke()``, read
                  the label map out (the part that must be serialised on one interpreter)
* ``postprocess`` crop the letterbox padding, resize to the frame, class fractions
* ``encode``      mask PNG / overlay JPEG / result JSON
* ``publish``     handing the messages to MQTT (pipeline only)
* ``end_to_end``  capture to published (pipeline), or the sum of the stages run (bench)

Each context reports the subset it runs, in this order: :data:`SEGMENT_STAGES` (``segment()``),
:data:`BENCH_STAGES` (``bench --pipeline``), :data:`PIPELINE_STAGES` (the daemon). The
functions below and in :mod:`edge_agent.output.stages` (encode, publish, the whole per-frame
path) are the stages themselves; the segmenter, the pipeline threads and ``bench --pipeline`` all
call them, so what is timed is what runs.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from edge_agent.inference import postprocess as post
from edge_agent.inference.preprocess import Geometry

PIPELINE_STAGES: Tuple[str, ...] = ("capture", "preprocess", "queue", "inference", "postprocess",
                                    "encode", "publish", "end_to_end")
SEGMENT_STAGES: Tuple[str, ...] = ("preprocess", "inference", "postprocess")
BENCH_STAGES: Tuple[str, ...] = ("preprocess", "inference", "postprocess", "encode", "end_to_end")

def ms_since(t0: float) -> float:
    return (time.monotonic() - t0) * 1e3


# -- preprocess / inference / postprocess ----------------------------------------------------------

def prepare(model: Any, image: np.ndarray, mode: str, into_tensor: bool = False,
            frame_hw: Optional[Tuple[int, int]] = None, out: Optional[np.ndarray] = None
            ) -> Tuple[Optional[np.ndarray], Geometry]:
    """``preprocess``: letterbox + normalise ``image`` for ``model``.

    ``into_tensor``: straight into the interpreter's input tensor (one thread owns the model: no
    copy, returns ``None`` as the buffer); else into ``out`` (or a fresh buffer), which another
    thread may hold while the interpreter runs the previous frame. ``frame_hw``: the frame's size
    when ``image`` is a reduced-size decode (``Frame.size``); geometry and masks are the frame's.
    """
    if into_tensor:
        return None, model.set_frame(image, mode, frame_hw=frame_hw)
    return model.prepare(image, mode, out=out, frame_hw=frame_hw)


def infer(model: Any, prepared: Optional[np.ndarray], on_invoke=None,
          out: Optional[np.ndarray] = None) -> np.ndarray:
    """``inference``: copy in (unless already in the tensor), ``invoke()``, the label map out.

    ``on_invoke(started)`` is told the monotonic start of ``invoke()`` and ``None`` after it: the
    pipeline's hang detector. Returns a new uint8 array (or ``out``, from
    ``model.new_label_buffer()``), safe to hand to another thread.
    """
    if prepared is not None:
        model.set_input(prepared)
    if on_invoke is not None:
        on_invoke(time.monotonic())
    try:
        model.invoke()
    finally:
        if on_invoke is not None:
            on_invoke(None)
    return model.label_map(out)


@dataclass
class Masks:
    """``postprocess`` output: the mask at model resolution (padding cropped), at frame size if
    asked for, and the class fractions."""

    model_mask: np.ndarray
    frame_mask: Optional[np.ndarray]
    fractions: Dict[str, float]


def postprocess(label_map: np.ndarray, geometry: Geometry, labels: Optional[List[str]],
                frame_mask: bool, fractions: bool = True) -> Masks:
    """``postprocess``: crop the padding, resize to the frame (if ``frame_mask``), class fractions
    (if ``fractions``: only a published result carries them)."""
    model_mask = post.crop_padding(label_map, geometry)
    full = post.to_frame(label_map, geometry) if frame_mask else None
    return Masks(model_mask, full, post.class_fractions(model_mask, labels) if fractions else {})
