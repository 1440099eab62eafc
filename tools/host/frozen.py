"""TF1 frozen GraphDef (``.pb``) -> TFLite through the compat converter (seed 001's path).

Old DeepLab releases ship ``frozen_inference_graph.pb``; ``tf.compat.v1.lite.TFLiteConverter
.from_frozen_graph`` converts a sub-graph between named input and output tensors. The same PTQ
modes apply as for Keras models (calibration images letterboxed like the agent).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import tensorflow as tf

from edge_agent.errors import ConfigError, ModelError

from .ptq import PTQOptions, _convert, configure, representative_dataset


def graph_nodes(pb_path: "str | Path") -> list:
    """Node names of a frozen graph (to help pick input/output arrays); ModelError if unreadable."""
    graph_def = tf.compat.v1.GraphDef()
    try:
        graph_def.ParseFromString(Path(pb_path).read_bytes())
    except OSError as exc:
        raise ModelError(f"cannot read frozen graph {pb_path}: {exc.strerror or exc}") from None
    except Exception:  # protobuf DecodeError
        raise ModelError(f"{pb_path} is not a TensorFlow GraphDef (.pb)") from None
    return [n.name for n in graph_def.node]


def convert_frozen(pb_path: "str | Path", input_array: str, output_arrays: Sequence[str],
                   input_size: Sequence[int], opts: PTQOptions,
                   images: Sequence[np.ndarray] = ()) -> bytes:
    """TFLite bytes for the sub-graph ``input_array`` (1xHxWx3 float) -> ``output_arrays``."""
    nodes = set(graph_nodes(pb_path))
    missing = [a for a in [input_array, *output_arrays] if a not in nodes]
    if missing:
        raise ConfigError(f"{pb_path}: no node named {', '.join(missing)} "
                          f"(the graph has {len(nodes)} nodes)")
    h, w = int(input_size[0]), int(input_size[1])
    converter = tf.compat.v1.lite.TFLiteConverter.from_frozen_graph(
        str(pb_path), [input_array], list(output_arrays), {input_array: [1, h, w, 3]})
    rep = representative_dataset(images, (h, w)) if opts.mode == "int8" else None
    configure(converter, opts, rep)
    return _convert(converter)
