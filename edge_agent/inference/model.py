"""The model contract: what a segmentation ``.tflite`` must look like, and how to feed/read it.

A :class:`SegmentationModel` owns one interpreter. It reads the model's own input/output details
(never assumes 513x513 or uint8), writes frames straight into the input tensor (letterboxed and,
if needed, re-quantized with a 256-entry LUT) and returns the class-id label map at model
resolution. Anything that is not a segmentation model is refused with one readable line.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

import cv2
import numpy as np

from edge_agent.inference import runtimes

from edge_agent.inference import tflite_check
from edge_agent.errors import EdgeAgentError, InferenceError, ModelError
from edge_agent.inference.preprocess import DEFAULT_RESIZE, LETTERBOX, Geometry, check_frame, make_geometry, resize_into
from edge_agent.inference.runtimes import edgetpu

log = logging.getLogger(__name__)

TFLITE_IDENTIFIER = b"TFL3"
_SUPPORTED_INPUT = (np.uint8, np.int8, np.float32)


@dataclass(frozen=True)
class InputSpec:
    index: int
    height: int
    width: int
    dtype: Any
    scale: float
    zero_point: int


@dataclass(frozen=True)
class OutputSpec:
    index: int
    kind: str  # "labels" (ArgMax in the graph) or "logits" (HxWxC, argmax done here)
    height: int
    width: int
    classes: Optional[int]
    dtype: Any


@dataclass
class ModelFile:
    path: str
    sha256: str
    size: int
    edgetpu: bool

    @property
    def name(self) -> str:
        return os.path.splitext(os.path.basename(self.path))[0]


def read_model_file(path: str) -> ModelFile:
    """Check that ``path`` is a readable TFLite flatbuffer; hash it; spot Edge TPU builds."""
    if not path:
        raise ModelError("no model given: pass --model PATH or a model name from the manifest")
    if not os.path.exists(path):
        raise ModelError(f"{path}: model file not found")
    if os.path.isdir(path):
        raise ModelError(f"{path}: is a directory, not a .tflite model")
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except OSError as exc:
        raise ModelError(f"{path}: cannot read model ({exc.strerror})") from exc
    if len(data) < 8 or data[4:8] != TFLITE_IDENTIFIER:
        raise ModelError(
            f"{path}: not a TFLite model (no 'TFL3' flatbuffer identifier; "
            f"{len(data)} bytes, corrupt or wrong file?)"
        )
    problem = tflite_check.check(data)
    if problem:
        raise ModelError(f"{path}: corrupt TFLite model ({problem})")
    return ModelFile(
        path=path,
        sha256=hashlib.sha256(data).hexdigest(),
        size=len(data),
        edgetpu=edgetpu.is_edgetpu_model(data),
    )


def _spatial(shape) -> Tuple[int, ...]:
    return tuple(int(s) for s in shape)


def read_input_spec(details: Dict[str, Any], where: str) -> InputSpec:
    shape = _spatial(details["shape"])
    if len(shape) != 4 or shape[0] != 1 or shape[3] != 3:
        raise ModelError(f"{where}: input shape {list(shape)} is not [1, H, W, 3] (an RGB image)")
    dtype = np.dtype(details["dtype"]).type
    if dtype not in _SUPPORTED_INPUT:
        raise ModelError(f"{where}: input dtype {np.dtype(dtype).name} not supported (uint8, int8, float32)")
    scale, zero_point = details.get("quantization", (0.0, 0)) or (0.0, 0)
    if dtype != np.float32 and not scale:
        raise ModelError(f"{where}: {np.dtype(dtype).name} input without quantization parameters")
    return InputSpec(details["index"], shape[1], shape[2], dtype, float(scale), int(zero_point))


def read_output_spec(details: Dict[str, Any], where: str) -> OutputSpec:
    shape = _spatial(details["shape"])
    dtype = np.dtype(details["dtype"]).type
    integer = np.issubdtype(dtype, np.integer)
    if len(shape) == 3 and shape[0] == 1 and integer:
        return OutputSpec(details["index"], "labels", shape[1], shape[2], None, dtype)
    if len(shape) == 4 and shape[0] == 1 and shape[3] == 1 and integer:
        return OutputSpec(details["index"], "labels", shape[1], shape[2], None, dtype)
    if len(shape) == 4 and shape[0] == 1 and shape[3] >= 2 and shape[1] > 1 and shape[2] > 1:
        if dtype not in (np.uint8, np.int8, np.float32, np.float16):
            raise ModelError(f"{where}: logits dtype {np.dtype(dtype).name} not supported")
        if shape[3] > 256:
            raise ModelError(f"{where}: {shape[3]} classes; at most 256 fit in an 8-bit mask")
        return OutputSpec(details["index"], "logits", shape[1], shape[2], shape[3], dtype)
    hint = " (looks like an image classifier)" if len(shape) == 2 else ""
    raise ModelError(
        f"{where}: not a segmentation model: output shape {list(shape)} is neither [1, H, W] "
        f"class ids nor [1, H, W, C] logits{hint}"
    )


def input_lut(spec: InputSpec) -> Optional[np.ndarray]:
    """256-entry LUT pixel -> quantized input, or None when raw pixels are already right.

    The DeepLab convention is ``real = pixel / 127.5 - 1``. Coral's uint8 models (scale 1/128,
    zero point 128) take raw pixels within one quantization step, as pycoral feeds them; any other
    quantization gets an exact LUT (applied by ``cv2.LUT``, ~0.2 ms at 513x513).
    """
    if spec.dtype == np.float32:
        return None
    info = np.iinfo(spec.dtype)
    real = np.arange(256, dtype=np.float64) / 127.5 - 1.0
    q = np.clip(np.round(real / spec.scale + spec.zero_point), info.min, info.max)
    if spec.dtype == np.uint8 and np.max(np.abs(q - np.arange(256))) <= 1:
        return None
    return q.astype(spec.dtype).view(np.uint8)


class SegmentationModel:
    """One loaded segmentation model: frame in (``set_frame``), ``invoke``, label map out."""

    def __init__(
        self,
        model_path: str,
        runtime: Optional[str] = "auto",
        threads: Optional[int] = None,
        edgetpu_device: Optional[str] = None,
        cpu_fallback: Optional[str] = None,
    ) -> None:
        self.fallback_reason: Optional[str] = None
        self.file = read_model_file(model_path)
        if self.file.edgetpu and edgetpu_device is None:
            msg = (
                f"{model_path}: compiled for the Edge TPU (contains edgetpu-custom-op) and cannot "
                f"run on the CPU: pass --edgetpu [DEVICE], or use its CPU twin "
                f"({os.path.basename(model_path).replace('_edgetpu', '')}) or --cpu-fallback"
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
        where = self.file.path
        inputs, outputs = it.get_input_details(), it.get_output_details()
        if len(inputs) != 1:
            raise ModelError(f"{where}: {len(inputs)} inputs; a segmentation model has one image input")
        self.input = read_input_spec(inputs[0], where)
        specs = []
        for details in outputs:
            try:
                specs.append(read_output_spec(details, where))
            except ModelError as exc:
                error = exc
        if not specs:
            raise error
        # Prefer an in-graph ArgMax when a model exports both logits and labels.
        specs.sort(key=lambda s: 0 if s.kind == "labels" else 1)
        self.output = specs[0]
        self._lut = input_lut(self.input)
        if self.input.dtype == np.float32:
            self._pad = 0.0
        elif self._lut is None:
            self._pad = self.input.zero_point
        else:
            self._pad = int(self._lut[128])
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
            "classes": self.output.classes,
            "runtime": self.loaded.runtime,
            "runtime_version": self.loaded.runtime_version,
            "delegate": self.loaded.delegate,
            "threads": self.loaded.threads,
            "fallback_reason": self.fallback_reason,
        }

    # -- the per-frame path -------------------------------------------------------------------
    def new_input_buffer(self) -> np.ndarray:
        """An HxWx3 buffer of the input's dtype, to prepare a frame outside the interpreter."""
        return np.empty((self.input.height, self.input.width, 3), self.input.dtype)

    def prepare(self, frame: np.ndarray, mode: str = LETTERBOX,
                out: Optional[np.ndarray] = None,
                quality: str = DEFAULT_RESIZE) -> Tuple[np.ndarray, Geometry]:
        """Letterbox/stretch and normalise ``frame`` (HxWx3 uint8 RGB) into ``out``.

        Thread-safe (touches no interpreter state), so a capture thread can prepare the next frame
        while the interpreter runs; :meth:`set_input` then costs one memcpy. ``quality`` is the
        resize path (``preprocess.FAST`` or ``AREA``).
        """
        check_frame(frame)
        geometry = make_geometry(frame.shape[0], frame.shape[1], self.input.height, self.input.width, mode)
        view = out if out is not None else self.new_input_buffer()
        if self.input.dtype == np.uint8 and self._lut is None:
            resize_into(frame, view, geometry, self._pad, quality)
            return view, geometry
        scratch = np.empty((self.input.height, self.input.width, 3), np.uint8)
        resize_into(frame, scratch, geometry, 128, quality)
        if self.input.dtype == np.float32:
            np.multiply(scratch, np.float32(1 / 127.5), out=view, casting="unsafe")
            view -= np.float32(1.0)
        else:
            cv2.LUT(scratch, self._lut, dst=view.view(np.uint8))
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
                  quality: str = DEFAULT_RESIZE) -> Geometry:
        """Prepare ``frame`` directly into the interpreter's input tensor (no extra copy)."""
        return self.prepare(frame, mode, out=self._input_tensor()[0], quality=quality)[1]

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

    def label_map(self) -> np.ndarray:
        """Class ids at model output resolution, uint8 HxW (a new array: safe to keep).

        Reads the output tensor through a view (no ``get_tensor`` copy: for the Coral models that
        is a 2 MB int64 copy) and writes the uint8 map in one pass; the view is dropped before
        returning, as the interpreter requires before the next ``invoke()``.
        """
        view = self.loaded.interpreter.tensor(self.output.index)()[0]
        try:
            if self.output.kind == "labels":
                if view.ndim == 3:
                    view = view[..., 0]
                return view.astype(np.uint8)
            return argmax_channels(view)
        finally:
            del view


def argmax_channels(logits: np.ndarray) -> np.ndarray:
    """Argmax over the last axis of HxWxC logits, as uint8 class ids (first maximum wins).

    Plain ``np.argmax``, on purpose: numpy >= 2 vectorises the last-axis argmax (SIMD), and it
    measured faster here than a channel loop of ``np.greater``/``np.maximum`` (3-4x slower at
    513x513x21 float32) and than ``cv2.reduceArgMax`` (~1.2x slower); see bench/perf.py. What
    this path saves is the copy: the caller passes the output tensor's view, not ``get_tensor``.
    """
    if logits.shape[-1] > 256:
        raise ValueError(f"{logits.shape[-1]} classes do not fit in a uint8 mask")
    return np.argmax(logits, axis=-1).astype(np.uint8)
