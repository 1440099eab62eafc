"""Label maps from a Keras model the way the agent makes them, and agreement with a .tflite.

The Keras side uses the agent's letterbox + normalisation and postprocessing; the TFLite side is
the agent's ``Segmenter``: a rebuilt model is judged on exactly what the device would output.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tf_keras as keras

from edge_agent.postprocess import to_frame
from edge_agent.segmenter import Segmenter

from .datasets import model_input, read_rgb
from .metrics import agreement


def keras_labels(model: keras.Model, image: np.ndarray) -> np.ndarray:
    """Class-id map at the image's size (argmax of logits, or the in-graph ArgMax)."""
    size = (int(model.input_shape[1]), int(model.input_shape[2]))
    x, geometry = model_input(image, size)
    out = model.predict(x[None], verbose=0)[0]
    labels = out if out.ndim == 2 else out.argmax(-1)
    return to_frame(labels.astype(np.uint8), geometry)


def tflite_labels(path: "str | Path", image: np.ndarray, runtime: str = "auto") -> np.ndarray:
    return Segmenter(str(path), runtime=runtime).segment(image).mask


def keras_vs_tflite(model: keras.Model, tflite: "str | Path", image_path: "str | Path",
                    runtime: str = "auto") -> float:
    """libcoral agreement between the Keras model and a .tflite on one image."""
    image = read_rgb(image_path)
    return agreement(keras_labels(model, image), tflite_labels(tflite, image, runtime))
