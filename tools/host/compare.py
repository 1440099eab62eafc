"""Label maps from a Keras model the way the agent makes them, and agreement with a .tflite.

The Keras side uses the agent's letterbox + normalisation and postprocessing; the TFLite side is
the agent's ``Segmenter``: a rebuilt model is judged on exactly what the device would output.
When the Keras model has the source's input size it is fed exactly what the source sees: the
agent's own prepared input buffer, dequantized with the source's input scale/zero point (Coral's
uint8 models get raw pixels, i.e. ``(p - 128) / 128``, not ``p / 127.5 - 1``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Tuple

import numpy as np
import tf_keras as keras

from edge_agent.inference.postprocess import agreement, to_frame
from edge_agent.inference.preprocess import Geometry
from edge_agent.inference.segmenter import Segmenter

from .datasets import model_input, read_rgb


def input_size(model: keras.Model) -> Tuple[int, int]:
    return int(model.input_shape[1]), int(model.input_shape[2])


def keras_labels(model: keras.Model, image: np.ndarray,
                 prepared: Optional[Tuple[np.ndarray, Geometry]] = None) -> np.ndarray:
    """Class-id map at the image's size (argmax of logits, or the in-graph ArgMax).

    ``prepared`` is a ready model input and its geometry (default: agent letterbox +
    ``pixel / 127.5 - 1``).
    """
    x, geometry = prepared if prepared is not None else model_input(image, input_size(model))
    dtype = model.inputs[0].dtype.as_numpy_dtype
    out = model.predict(x[None].astype(dtype), verbose=0)[0]
    labels = out if out.ndim == 2 else out.argmax(-1)
    return to_frame(labels.astype(np.uint8), geometry)


def source_input(seg: Segmenter, image: np.ndarray) -> Tuple[np.ndarray, Geometry]:
    """The real-valued input ``seg``'s model sees for ``image`` (float64, HxWx3)."""
    buffer, geometry = seg.model.prepare(image)
    spec = seg.model.input
    if spec.dtype == np.float32:
        return buffer.astype(np.float64), geometry
    return (buffer.astype(np.float64) - spec.zero_point) * spec.scale, geometry


def tflite_labels(path: "str | Path", image: np.ndarray, runtime: str = "auto") -> np.ndarray:
    return Segmenter(str(path), runtime=runtime).segment(image).mask


def keras_vs_tflite(model: keras.Model, tflite: "str | Path", image_path: "str | Path",
                    runtime: str = "auto") -> float:
    """libcoral agreement between the Keras model and a .tflite on one image."""
    image = read_rgb(image_path)
    seg = Segmenter(str(tflite), runtime=runtime)
    same_size = input_size(model) == seg.model.input_size
    prepared = source_input(seg, image) if same_size else None
    return agreement(keras_labels(model, image, prepared), seg.segment(image).mask)
