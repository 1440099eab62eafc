"""The segmentation model: one interpreter, frames in, the class-id label map out.

A :class:`SegmentationModel` owns one interpreter. How to feed and read it is its contract,
read from the model's own input/output details and TFLite Metadata (never assumes 513x513,
uint8 or [-1, 1]; :mod:`edge_agent.inference.contract`, the file checks in
:mod:`edge_agent.inference.modelfile`). It writes frames straight into the input tensor
(letterboxed, normalised, re-quantized with a 256-entry LUT when needed) and returns the class-id
label map at model resolution. What it cannot interpret with certainty is refused with one
readable line naming the ``model.*`` setting that resolves it (README, "Bring your own model").
"""

from __future__ import annotations

import logging
import os
import re
from typing import Any, Dict, Optional, Sequence, Tuple

import cv2
import numpy as np

from edge_agent.inference import postprocess, runtimes
from edge_agent.errors import EdgeAgentError, InferenceError, ModelError
from edge_agent.inference.preprocess import (DEFAULT_RESIZE, LETTERBOX, Geometry, check_frame, make_geometry,
                                             normalize_into, resize_into, scratch)
from edge_agent.inference.contract import ModelOptions, input_lut, quantize_zero, read_contract
from edge_agent.inference.modelfile import read_model_file

log = logging.getLogger(__name__)


def cpu_twin_name(path: str) -> str:
    """``x_mobilenet_edgetpu_y_edgetpu.tflite`` -> ``x_mobilenet_edgetpu_y.tflite`` (only the trailing one)."""
    return re.sub(r"_edgetpu(\.tflite)?$", r"\1", os.path.basename(path))


class SegmentationModel:
    """One loaded segmentation model: frame in (``set_frame``), ``invoke``, label map out."""

    def __init__(
        self,
        model_path: str,
        runtime: Optional[str] = "auto",
        threads: Optional[int] = None,
        edgetpu_device: Optional[str] = None,
        cpu_fallback: Optional[str] = None,
        options: Optional[ModelOptions] = None,
        labels: Optional[Sequence[str]] = None,
    ) -> None:
        self.fallback_reason: Optional[str] = None
        self.options = options or ModelOptions()
        self._given_labels = list(labels) if labels else None
        self.file = read_model_file(model_path)
        if self.file.edgetpu and edgetpu_device is None:
            msg = (
                f"{model_path}: compiled for the Edge TPU (contains edgetpu-custom-op) and cannot "
                f"run on the CPU: pass --edgetpu [DEVICE], or use its CPU twin "
                f"({cpu_twin_name(model_path)}) or --cpu-fallback"
            )
            self._fallback_or_raise(ModelError(msg), cpu_fallback, runtime, threads)
            return
        try:
            loaded = runtimes.create_interpreter(model_path, runtime, threads, edgetpu_device)
        except EdgeAgentError as exc:
            self._fallback_or_raise(exc, cpu_fallback, runtime, threads)
            return
        if edgetpu_device is not None and not self.file.edgetpu:
            log.warning("%s is not compiled for the Edge TPU: it runs on the CPU", model_path)
        self._setup(loaded)

    def _fallback_or_raise(self, exc, cpu_fallback, runtime, threads) -> None:
        if not cpu_fallback:
            raise exc
        log.warning("%s; falling back to the CPU model %s", exc, cpu_fallback)
        self.fallback_reason = str(exc)
        self.file = read_model_file(cpu_fallback)
        if self.file.edgetpu:
            raise ModelError(f"{cpu_fallback}: the CPU fallback is itself an Edge TPU model")
        self._setup(runtimes.create_interpreter(cpu_fallback, runtime, threads, None))

    def _setup(self, loaded: runtimes.LoadedInterpreter) -> None:
        self.loaded = loaded
        it = loaded.interpreter
        self.contract = read_contract(it, self.file, self.options, self._given_labels)
        self.input = self.contract.input
        self.output = self.contract.output
        self.normalization = self.contract.normalization
        self.labels = self.contract.labels
        self._lut = input_lut(self.input, self.normalization)
        self._pad = quantize_zero(self.input)
        self._input_tensor = it.tensor(self.input.index)

    # -- properties reported in info / benchmarks -------------------------------------------
    @property
    def input_size(self) -> Tuple[int, int]:
        return self.input.height, self.input.width

    @property
    def path(self) -> str:
        return self.file.path

    def describe(self) -> Dict[str, Any]:
        return {
            "name": self.file.name,
            "path": self.file.path,
            "sha256": self.file.sha256,
            "size_bytes": self.file.size,
            "input_size": [self.input.height, self.input.width],
            "input_dtype": np.dtype(self.input.dtype).name,
            "input_quantization": [self.input.scale, self.input.zero_point],
            "output_kind": self.output.kind,
            "output_dtype": np.dtype(self.output.dtype).name,
            "output_size": [self.output.height, self.output.width],
            **self.contract.describe(),
            "runtime": self.loaded.runtime,
            "runtime_version": self.loaded.runtime_version,
            "delegate": self.loaded.delegate,
            "threads": self.loaded.threads,
            "fallback_reason": self.fallback_reason,
        }

    # -- the per-frame path -------------------------------------------------------------------
    def input_buffer_shape(self) -> Tuple[int, int, int]:
        return self.input.height, self.input.width, 3

    def new_input_buffer(self) -> np.ndarray:
        """An HxWx3 buffer of the input's dtype, to prepare a frame outside the interpreter."""
        return np.empty(self.input_buffer_shape(), self.input.dtype)

    def prepare(self, frame: np.ndarray, mode: str = LETTERBOX,
                out: Optional[np.ndarray] = None,
                quality: str = DEFAULT_RESIZE,
                frame_hw: Optional[Tuple[int, int]] = None) -> Tuple[np.ndarray, Geometry]:
        """Letterbox/stretch and normalise ``frame`` (HxWx3 uint8 RGB) into ``out``.

        Thread-safe (touches no interpreter state), so a capture thread can prepare the next frame
        while the interpreter runs; :meth:`set_input` then costs one memcpy. ``quality`` is the
        resize path (``preprocess.FAST`` or ``AREA``). ``frame_hw``: the frame's size when
        ``frame`` is a reduced-size decode of it (``Frame.size``): the geometry is the frame's.
        """
        check_frame(frame)
        fh, fw = frame_hw if frame_hw else frame.shape[:2]
        geometry = make_geometry(int(fh), int(fw), self.input.height, self.input.width, mode)
        view = out if out is not None else self.new_input_buffer()
        if self.input.dtype == np.uint8 and self._lut is None:
            resize_into(frame, view, geometry, self._pad, quality)
            return view, geometry
        pixels = scratch((self.input.height, self.input.width, 3), np.uint8, "normalise")
        resize_into(frame, pixels, geometry, 128, quality)
        if self.input.dtype == np.float32:
            normalize_into(pixels, view, self.normalization)
        else:
            cv2.LUT(pixels, self._lut, dst=view.view(np.uint8))
        # Padding means exactly 0 after normalisation.
        sh, sw = geometry.scaled_h, geometry.scaled_w
        if sh < view.shape[0]:
            view[sh:, :] = self._pad
        if sw < view.shape[1]:
            view[:sh, sw:] = self._pad
        return view, geometry

    def set_input(self, prepared: np.ndarray) -> None:
        """Copy a buffer made by :meth:`prepare` into the input tensor."""
        np.copyto(self._input_tensor()[0], prepared)

    def set_frame(self, frame: np.ndarray, mode: str = LETTERBOX,
                  quality: str = DEFAULT_RESIZE, frame_hw: Optional[Tuple[int, int]] = None) -> Geometry:
        """Prepare ``frame`` directly into the interpreter's input tensor (no extra copy)."""
        return self.prepare(frame, mode, out=self._input_tensor()[0], quality=quality, frame_hw=frame_hw)[1]

    def invoke(self) -> None:
        try:
            self.loaded.interpreter.invoke()
        except (RuntimeError, ValueError) as exc:
            text = str(exc).strip().splitlines()
            raise InferenceError(
                f"{self.file.path}: inference failed ({text[0] if text else type(exc).__name__})"
            ) from exc

    def raw_output(self) -> np.ndarray:
        """The output tensor (a copy: the interpreter reuses its buffer on the next invoke)."""
        return self.loaded.interpreter.get_tensor(self.output.index)

    def new_label_buffer(self) -> np.ndarray:
        """An HxW uint8 buffer for :meth:`label_map` ``out`` (the output's spatial size)."""
        return np.empty((self.output.height, self.output.width), np.uint8)

    def label_map(self, out: Optional[np.ndarray] = None) -> np.ndarray:
        """Class ids at model output resolution, uint8 HxW (a new array, or ``out``: safe to keep).

        Reads the output tensor through a view (no ``get_tensor`` copy: for the Coral models that
        is a 2 MB int64 copy) and writes the uint8 map in one pass; the view is dropped before
        returning, as the interpreter requires before the next ``invoke()``. ``out`` (from
        :meth:`new_label_buffer`) is written instead of allocating: the pipeline reuses buffers.
        """
        view = self.loaded.interpreter.tensor(self.output.index)()[0]
        try:
            return postprocess.decode(view, self.output, out)
        finally:
            del view
