"""One frame in, one correct mask out: preprocess -> runtime -> postprocess, timed per stage."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import numpy as np

from edge_agent.inference import postprocess
from edge_agent.inference.labels import labels_for
from edge_agent.inference.model import ModelOptions, SegmentationModel
from edge_agent.inference.preprocess import LETTERBOX, MODES, Geometry
from edge_agent.errors import EdgeAgentError


@dataclass
class Segmentation:
    """The result for one frame."""

    model_mask: np.ndarray  # class ids at model resolution, padding cropped (uint8)
    geometry: Geometry
    timings: Dict[str, float]  # milliseconds per stage
    labels: Optional[List[str]] = None
    _mask: Optional[np.ndarray] = field(default=None, repr=False)

    @property
    def mask(self) -> np.ndarray:
        """Class ids at the frame's exact size (computed on first access)."""
        if self._mask is None:
            self._mask = postprocess.resize_labels(
                self.model_mask, self.geometry.frame_h, self.geometry.frame_w
            )
        return self._mask

    def class_fractions(self) -> Dict[str, float]:
        # Fractions are the same at model resolution up to rounding; use the small map.
        return postprocess.class_fractions(self.model_mask, self.labels)


class Segmenter:
    """The segmentation core used by the CLI, the daemon and the benchmarks."""

    def __init__(
        self,
        model_path: str,
        labels: Optional[str] = None,
        runtime: Optional[str] = "auto",
        threads: Optional[int] = None,
        edgetpu: Optional[str] = None,
        cpu_fallback: Optional[str] = None,
        mode: str = LETTERBOX,
        options: Optional[ModelOptions] = None,
    ) -> None:
        """``labels``: a label file or names; None = the model's own (metadata), if any.
        ``options``: what config/CLI say about the model (``ModelOptions.from_config(config.model)``)."""
        if mode not in MODES:
            raise EdgeAgentError(f"unknown preprocess mode '{mode}': choose {', '.join(MODES)}")
        self.mode = mode
        self.model = SegmentationModel(model_path, runtime, threads, edgetpu, cpu_fallback,
                                       options=options, labels=labels_for(labels))
        self.labels = self.model.labels

    def segment(self, frame: np.ndarray, full_mask: bool = True) -> Segmentation:
        """Segment one RGB uint8 frame. ``full_mask`` resizes the mask to the frame now (timed)."""
        t0 = time.perf_counter()
        geometry = self.model.set_frame(frame, self.mode)
        t1 = time.perf_counter()
        self.model.invoke()
        t2 = time.perf_counter()
        label_map = self.model.label_map()
        model_mask = postprocess.crop_padding(label_map, geometry)
        result = Segmentation(model_mask, geometry, {}, self.labels)
        if full_mask:
            result._mask = postprocess.to_frame(label_map, geometry)
        t3 = time.perf_counter()
        result.timings = {
            "preprocess": (t1 - t0) * 1e3,
            "inference": (t2 - t1) * 1e3,
            "postprocess": (t3 - t2) * 1e3,
        }
        return result

    def info(self) -> Dict[str, Any]:
        info = self.model.describe()
        info["preprocess"] = self.mode
        return info

    def describe_runtime(self) -> str:
        return self.model.loaded.describe()
