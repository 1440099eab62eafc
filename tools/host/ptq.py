"""Post-training quantization: Keras / SavedModel / float TFLite -> TFLite.

Modes: ``dynamic`` (int8 weights, float activations), ``float16`` (fp16 weights) and ``int8``
(full integer; activations calibrated on real images letterboxed exactly like the agent does,
``uint8``/``int8``/``float32`` I/O, per-channel or per-tensor weights). The batch dimension is
fixed to 1 so the model has no dynamic shape (the Edge TPU needs static shapes).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import tensorflow as tf
import tf_keras as keras
from tqdm import tqdm

from edge_agent.errors import ConfigError, ModelError

from .bias_correct import METHODS as BIAS_METHODS, bias_correct
from .datasets import model_input
from .equalize import equalize
from .subtensors import MAX_GROUPS, split_subtensors
from .deeplab import UPSAMPLE_FACTORS, with_argmax, with_head, without_argmax
from .tflite_reader import read_tflite

MODES = ("dynamic", "float16", "int8")
IO_TYPES = {"uint8": tf.uint8, "int8": tf.int8, "float32": tf.float32}


@dataclass(frozen=True)
class PTQOptions:
    """PTQ settings; the defaults are the fastest configuration that keeps the float's mIoU.

    Measured on dm0.5 at 513x513 (ai-edge-litert 2.3, XNNPACK, interleaved medians, 1 and 2
    threads; docs/host-tools.md): per-channel int8 with a 129x129 ArgMax head (``upsample=4``)
    invokes in 0.47-0.49x Coral's time at -0.16 mIoU points vs the float; the full-size head
    (``upsample=16``) 0.72x at -0.05; per-tensor weights are no faster and lose 0.7-0.8 points
    unless ``equalize``/``bias_correct``/``subtensors`` precondition the float (see the doc's
    per-tensor table); int8 vs uint8 I/O makes no measurable difference; a 33x33 head loses 3.4.
    """

    mode: str = "int8"
    io_type: str = "uint8"
    per_channel: bool = True
    argmax: Optional[bool] = True  # None: as the model given
    upsample: Optional[int] = 4  # head: logits upsampled x4 (129 for 513); None: as given
    equalize: bool = False  # cross-layer equalization before conversion (equalize.py)
    bias_correct: Optional[str] = None  # "empirical" | "analytic" (bias_correct.py)
    subtensors: int = 1  # >1: blocks split into that many channel groups (subtensors.py)
    split_min_spread: float = 0.0  # split only blocks whose depthwise range spread is >= this

    def validate(self) -> "PTQOptions":
        if self.mode not in MODES:
            raise ConfigError(f"unknown PTQ mode {self.mode!r}: choose {', '.join(MODES)}")
        if self.io_type not in IO_TYPES:
            raise ConfigError(f"unknown I/O type {self.io_type!r}: choose {', '.join(IO_TYPES)}")
        if self.upsample is not None and self.upsample not in UPSAMPLE_FACTORS:
            raise ConfigError(f"upsample factor must be one of {UPSAMPLE_FACTORS}, "
                              f"not {self.upsample}")
        if self.bias_correct is not None and self.bias_correct not in BIAS_METHODS:
            raise ConfigError(f"unknown bias correction {self.bias_correct!r}: choose "
                              f"{', '.join(BIAS_METHODS)}")
        if self.subtensors != 1 and not 2 <= self.subtensors <= MAX_GROUPS:
            raise ConfigError(f"subtensor groups must be 2..{MAX_GROUPS}, not {self.subtensors}")
        if self.split_min_spread < 0:
            raise ConfigError(f"split min spread must be >= 0, not {self.split_min_spread}")
        if (self.equalize or self.bias_correct or self.subtensors > 1) and self.mode != "int8":
            raise ConfigError("equalization, bias correction and subtensors are for int8 mode "
                              "only")
        return self


def representative_dataset(images: Sequence[np.ndarray], size: Tuple[int, int],
                           desc: str = "calibrating") -> Callable[[], Iterator[List[np.ndarray]]]:
    """Calibration generator: agent letterbox + ``pixel / 127.5 - 1``, one image a step."""
    if not images:
        raise ConfigError("int8 quantization needs calibration images (none given)")

    def gen() -> Iterator[List[np.ndarray]]:
        for image in tqdm(images, desc=desc, unit="img", leave=False):
            yield [model_input(image, size)[0][None]]
    return gen


def configure(converter, opts: PTQOptions,
              rep: Optional[Callable[[], Iterator[List[np.ndarray]]]]) -> None:
    """Apply one PTQ mode to any TFLiteConverter (Keras, concrete function or frozen graph)."""
    opts.validate()
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if opts.mode == "float16":
        converter.target_spec.supported_types = [tf.float16]
        return
    if opts.mode == "dynamic":
        return
    converter.representative_dataset = rep
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    converter.inference_input_type = IO_TYPES[opts.io_type]
    converter.inference_output_type = IO_TYPES[opts.io_type]
    if not opts.per_channel:
        converter._experimental_disable_per_channel = True


def keras_converter(model: keras.Model):
    """Converter for a Keras model with the batch fixed to 1 (static shapes)."""
    h, w = int(model.input_shape[1]), int(model.input_shape[2])
    fn = tf.function(lambda x: model(x, training=False),
                     input_signature=[tf.TensorSpec([1, h, w, 3], tf.float32, name="image")])
    return tf.lite.TFLiteConverter.from_concrete_functions([fn.get_concrete_function()], model)


def quantize_keras(model: keras.Model, opts: PTQOptions,
                   images: Sequence[np.ndarray] = ()) -> bytes:
    """TFLite flatbuffer of ``model`` under ``opts`` (ArgMax added/removed first if asked)."""
    opts.validate()
    model = apply_head(precondition(model, opts, images), opts)
    size = (int(model.input_shape[1]), int(model.input_shape[2]))
    converter = keras_converter(model)
    rep = representative_dataset(images, size) if opts.mode == "int8" else None
    configure(converter, opts, rep)
    return _convert(converter)


def precondition(model: keras.Model, opts: PTQOptions, images: Sequence[np.ndarray] = (),
                 log: Callable[[str], None] = print) -> keras.Model:
    """The float model made friendlier to int8 weights: equalized, split, bias-corrected."""
    if opts.equalize:
        model, report = equalize(model)
        log(report.text())
    if opts.subtensors > 1:
        model, report = split_subtensors(model, opts.subtensors, opts.split_min_spread)
        log(report.text())
    if opts.bias_correct:
        if not images:
            raise ConfigError("bias correction needs calibration images (none given)")
        model, report = bias_correct(model, images, opts.per_channel, opts.bias_correct)
        log(report.text())
    return model


def apply_head(model: keras.Model, opts: PTQOptions) -> keras.Model:
    """The model with the head ``opts`` asks for (upsampling factor, ArgMax or logits)."""
    if opts.upsample is not None:
        argmax = opts.argmax if opts.argmax is not None else \
            model.layers[-1].__class__.__name__ == "ArgMaxHead"
        return with_head(model, opts.upsample, argmax)
    if opts.argmax is True:
        return with_argmax(model)
    return without_argmax(model) if opts.argmax is False else model


def _convert(converter) -> bytes:
    try:
        return converter.convert()
    except Exception as exc:  # converter errors are long MLIR dumps: keep the first line
        text = str(exc).strip().splitlines()
        raise ModelError(f"TFLite conversion failed: {text[0] if text else type(exc).__name__}"
                         ) from None


def write_tflite(data: bytes, out: "str | Path") -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(data)
    return out


def calibration_summary(path: "str | Path", n_images: int) -> str:
    """Short text: images used, I/O quantization, weight scheme, widest activation ranges."""
    graph = read_tflite(path)
    lines = [f"calibration: {n_images} images, letterboxed, real = pixel/127.5 - 1"]
    for kind, idx in (("input", graph.inputs[0]), ("output", graph.outputs[0])):
        t = graph.tensors[idx]
        q = f"scale {t.scale[0]:.6g} zero point {t.zero_point[0]}" if t.scale.size else "not quantized"
        lines.append(f"{kind}: {t.name} {t.shape} {np.dtype(t.dtype).name} {q}")
    weights = [graph.tensors[op.inputs[1]] for op in graph.ops
               if op.opcode in ("CONV_2D", "DEPTHWISE_CONV_2D") and len(op.inputs) > 1]
    per_axis = sum(1 for t in weights if t.per_axis)
    lines.append(f"weights: {len(weights)} conv tensors, {per_axis} per-channel, "
                 f"{len(weights) - per_axis} per-tensor")
    ranges = []
    for t in graph.tensors:
        if t.data is None and t.scale.size == 1 and t.dtype in (np.uint8, np.int8):
            info = np.iinfo(t.dtype)
            ranges.append(((info.min - t.zero_point[0]) * t.scale[0],
                           (info.max - t.zero_point[0]) * t.scale[0], t.name.split(";")[0]))
    ranges.sort(key=lambda r: r[1] - r[0], reverse=True)
    lines.append(f"activations: {len(ranges)} quantized tensors; widest ranges:")
    lines += [f"  [{lo:8.2f}, {hi:8.2f}] {name}" for lo, hi, name in ranges[:5]]
    return "\n".join(lines)
