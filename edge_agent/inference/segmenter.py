"""One frame in, one correct mask out: preprocess -> inference -> postprocess, timed per stage.

:meth:`Segmenter.from_settings` is THE way to build one from the config or CLI arguments (the
agent, a deployment's sanity invoke, the remote benchmark, ``segment`` and ``bench``); the
stages are :mod:`edge_agent.inference.stages`, shared with the pipeline and ``bench --pipeline``.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import numpy as np

from edge_agent.config import ModelConfig
from edge_agent.inference import stages
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


@dataclass(frozen=True)
class ModelSettings:
    """How a model is run (runtime, threads, delegate, fallback, preprocess mode): built once from
    ``config.model`` or from CLI arguments, handed to :meth:`Segmenter.from_settings`."""

    runtime: Optional[str] = ModelConfig.runtime
    threads: Optional[int] = None
    edgetpu: Optional[str] = None
    cpu_fallback: Optional[str] = None
    mode: str = ModelConfig.preprocess
    options: Optional[ModelOptions] = None  # how to read the model where its metadata is silent

    @classmethod
    def from_config(cls, model: ModelConfig) -> "ModelSettings":
        """From the config's ``[model]`` section (0 / "" mean "not set"), or CLI arguments of the
        same names."""
        return cls(runtime=model.runtime, threads=model.threads or None, edgetpu=model.edgetpu or None,
                   cpu_fallback=model.cpu_fallback or None, mode=getattr(model, "preprocess", cls.mode),
                   options=ModelOptions.from_config(model))

    def replace(self, **changes: Any) -> "ModelSettings":
        return dataclasses.replace(self, **changes)


class Segmenter:
    """The segmentation core used by the CLI, the daemon and the benchmarks."""

    @classmethod
    def from_settings(cls, path: str, labels: Any, settings: ModelSettings) -> "Segmenter":
        return cls(path, labels=labels, runtime=settings.runtime, threads=settings.threads,
                   edgetpu=settings.edgetpu, cpu_fallback=settings.cpu_fallback, mode=settings.mode,
                   options=settings.options)

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
        self._args = (model_path, labels, runtime, threads, edgetpu, cpu_fallback, mode, options)
        self.model = SegmentationModel(model_path, runtime, threads, edgetpu, cpu_fallback,
                                       options=options, labels=labels_for(labels))
        self.labels = self.model.labels

    def clone(self) -> "Segmenter":
        """Another segmenter of the same model and settings, with its own interpreter (a second
        pipeline worker: interpreters are not thread-safe)."""
        return Segmenter(*self._args)

    def segment(self, frame: np.ndarray, full_mask: bool = True) -> Segmentation:
        """Segment one RGB uint8 frame. ``full_mask`` resizes the mask to the frame now (timed).

        ``timings`` has the keys of :data:`~edge_agent.inference.stages.SEGMENT_STAGES`.
        """
        t0 = time.perf_counter()
        _, geometry = stages.prepare(self.model, frame, self.mode, into_tensor=True)
        t1 = time.perf_counter()
        label_map = stages.infer(self.model, None)
        t2 = time.perf_counter()
        masks = stages.postprocess(label_map, geometry, self.labels, frame_mask=full_mask, fractions=False)
        t3 = time.perf_counter()
        result = Segmentation(masks.model_mask, geometry, {}, self.labels, masks.frame_mask)
        result.timings = dict(zip(stages.SEGMENT_STAGES, ((t1 - t0) * 1e3, (t2 - t1) * 1e3, (t3 - t2) * 1e3)))
        return result

    def info(self) -> Dict[str, Any]:
        info = self.model.describe()
        info["preprocess"] = self.mode
        return info

    def describe_runtime(self) -> str:
        return self.model.loaded.describe()
