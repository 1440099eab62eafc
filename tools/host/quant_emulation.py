"""Emulate a quantized source's integer arithmetic on the rebuilt float graph (exact check).

Why: the rebuilt *float* graph of Coral's dm0.5 model agrees only ~0.975 with the uint8 model on
the golden bird, although every weight is copied 1:1. The uint8 network is chaotic at the LSB
level: a 1-LSB rounding difference in 0.007 % of one early layer's outputs grows to 60 % of the
33x33 logits differing by 1-5 LSB; the label map is robust to most of it, not all (the same uint8
model on TFLite's built-in kernels, XNNPACK off, agrees only 0.986 with itself). So any
float graph, or any fake-quant that rounds even slightly differently, plateaus at 0.97-0.99.

This module inserts a :class:`FakeQuant` layer after every Keras layer whose output is a tensor of
the source, with that tensor's own scale/zero point, and rounds exactly as XNNPACK (the CPU
runtime the agent uses, through LiteRT or TensorFlow) does:

- CONV_2D / DEPTHWISE_CONV_2D: integer accumulator ``acc``, then
  ``round_half_even(float32(acc) * float32(s_in * s_w / s_out)) + zp`` (XNNPACK's fp32
  requantization; the scale product is evaluated in float32, per channel where the weights are);
- RESIZE_BILINEAR: round half up in the quantized domain (XNNPACK's fixed-point interpolation);
- QUANTIZE (requantize): XNNPACK's 8-bit multiplier ``lrintf(256 * s_in / s_out)``;
- ADD, AVERAGE_POOL_2D, the input: round half to even onto the output grid.

The model runs in float64 so integer accumulators are exact. On Coral's dm0.5 and dm1.0 models
the emulating graph reproduces every intermediate tensor bit for bit and the label map exactly
(agreement 1.0000): the weight mapping is 1:1, the float plateau is activation quantization.
The emulating model is a verification tool (float64, not for conversion or training).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import tensorflow as tf
import tf_keras as keras

from edge_agent.errors import ModelError

from .layers import PACKAGE
from .tflite_reader import TFLiteGraph

ROUND, CONV, RESIZE, REQUANT = "round", "conv", "resize", "requant"
# Bilinear resizes run through TF's float32 op: half-way values come out within ~1e-5 LSB of .5;
# genuine fractions (multiples of 1/256 at DeepLab's 16x align-corners upsampling) are far away.
RESIZE_TOLERANCE = 1e-3


@dataclass(frozen=True)
class QuantStep:
    """One rounding of a float value onto a source tensor's integer grid."""

    kind: str
    scale: float
    zero_point: int
    qmin: int
    qmax: int
    acc_scale: Sequence[float] = ()  # conv: s_in * s_w (per output channel) in float64
    requant: Sequence[float] = ()  # conv: float32 s_in * s_w / s_out (per output channel)
    in_scale: float = 0.0  # requant: the scale the value comes from

    def to_config(self) -> Dict[str, Any]:
        cfg = asdict(self)
        cfg["acc_scale"], cfg["requant"] = list(self.acc_scale), list(self.requant)
        return cfg


def _grid(x: tf.Tensor, step: QuantStep) -> tf.Tensor:
    """Integer code ``q`` (as a float tensor) of ``x`` for one step."""
    if step.kind == CONV:
        acc = tf.round(x / tf.constant(step.acc_scale, x.dtype))
        rq = tf.constant(step.requant, tf.float32)
        q = tf.cast(tf.round(tf.cast(acc, tf.float32) * rq), x.dtype) + step.zero_point
    elif step.kind == RESIZE:
        q = tf.floor(x / step.scale + step.zero_point + 0.5 + RESIZE_TOLERANCE)
    elif step.kind == REQUANT:
        multiplier = float(np.rint(np.float32(256.0) * np.float32(step.in_scale / step.scale)))
        diff = tf.round(x / step.in_scale)  # q_in - zp_in, exact
        q = tf.floor((diff * multiplier + 128.0) / 256.0) + step.zero_point
    else:
        q = tf.round(x / step.scale) + step.zero_point
    return tf.clip_by_value(q, float(step.qmin), float(step.qmax))


@keras.utils.register_keras_serializable(package=PACKAGE)
class FakeQuant(keras.layers.Layer):
    """Round the input onto one or more source tensors' grids, return the real values."""

    def __init__(self, steps: Sequence[Any] = (), **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.steps = [s if isinstance(s, QuantStep) else QuantStep(**s) for s in steps]

    def call(self, inputs: tf.Tensor) -> tf.Tensor:
        x = inputs
        for step in self.steps:
            x = (_grid(x, step) - step.zero_point) * step.scale
        return x

    def get_config(self) -> dict:
        cfg = super().get_config()
        cfg.update(steps=[s.to_config() for s in self.steps])
        return cfg


def _bounds(graph: TFLiteGraph, tensor: int):
    info = np.iinfo(graph.tensors[tensor].dtype)
    return int(info.min), int(info.max)


def _step(graph: TFLiteGraph, tensor: int, kind: str = ROUND, **extra) -> QuantStep:
    t = graph.tensors[tensor]
    if not t.quantized or t.scale.size != 1:
        raise ModelError(f"{graph.path.name}: tensor {t.name!r} is not per-tensor quantized: "
                         f"cannot emulate its arithmetic")
    qmin, qmax = _bounds(graph, tensor)
    return QuantStep(kind, float(t.scale[0]), int(t.zero_point[0]), qmin, qmax, **extra)


def _conv_step(graph: TFLiteGraph, op_index: int) -> QuantStep:
    op = graph.ops[op_index]
    s_in = np.float32(graph.tensors[op.inputs[0]].scale[0])
    s_w = graph.tensors[op.inputs[1]].scale.astype(np.float32)
    out = graph.tensors[op.outputs[0]]
    requant = (s_in * s_w) / np.float32(out.scale[0])  # float32 arithmetic, as XNNPACK
    acc_scale = np.float64(s_in) * s_w.astype(np.float64)
    return _step(graph, op.outputs[0], CONV, acc_scale=tuple(float(v) for v in acc_scale),
                 requant=tuple(float(v) for v in requant.astype(np.float32)))


def _consumers(graph: TFLiteGraph, tensor: int) -> List[Any]:
    return [op for op in graph.ops if tensor in op.inputs]


def _follow(graph: TFLiteGraph, tensor: int, first: QuantStep) -> List[QuantStep]:
    """``first`` plus the requantizations/resizes that are the tensor's only consumer chain."""
    steps, current, scale = [first], tensor, first.scale
    while True:
        users = _consumers(graph, current)
        if len(users) != 1 or users[0].opcode not in ("QUANTIZE", "RESIZE_BILINEAR"):
            return steps
        op = users[0]
        if op.opcode == "RESIZE_BILINEAR" and first.kind != RESIZE:
            return steps  # a resize is its own Keras layer
        nxt = op.outputs[0]
        kind = REQUANT if op.opcode == "QUANTIZE" else RESIZE
        steps.append(_step(graph, nxt, kind, in_scale=scale))
        scale, current = steps[-1].scale, nxt


def activation_steps(graph: TFLiteGraph, scope_ops: Dict[str, int],
                     layer_names: Sequence[str]) -> Dict[str, List[QuantStep]]:
    """Keras layer name -> the source roundings its output goes through.

    ``scope_ops`` maps each slim scope to its conv op index (``rebuild.assign_scopes``); the
    other layers (residual adds, image pooling, resizes, concat) are found from the convs'
    tensors in the source graph.
    """
    from .deeplab import layer_name

    names = set(layer_names)
    steps: Dict[str, List[QuantStep]] = {}
    for scope, index in scope_ops.items():
        name = layer_name(scope)
        out = graph.ops[index].outputs[0]
        target = name + "_relu" if name + "_relu" in names else name
        steps[target] = _follow(graph, out, _conv_step(graph, index))
        for user in _consumers(graph, out):
            if user.opcode in ("AVERAGE_POOL_2D", "MEAN"):
                steps["image_pooling_pool"] = [_step(graph, user.outputs[0])]
            elif user.opcode == "RESIZE_BILINEAR":
                resize = {"image_pooling": "image_pooling_resize", "logits_semantic":
                          "logits_resize", "concat_projection": "decoder_resize"}.get(name)
                if resize is None:
                    raise ModelError(f"{graph.path.name}: unexpected resize after {scope}")
                steps[resize] = _follow(graph, user.outputs[0],
                                        _step(graph, user.outputs[0], RESIZE))
    scope_of = {index: layer_name(scope) for scope, index in scope_ops.items()}
    for op in graph.ops:
        if op.opcode == "ADD":  # a residual add belongs to the block of its newest input
            producers = [p.index for p in map(graph.producer, op.inputs) if p is not None]
            name = scope_of.get(max(producers, default=-1), "")
            if not name.endswith("_project"):
                raise ModelError(f"{graph.path.name}: ADD op {op.index} is not a residual add")
            steps[name[:-len("_project")] + "_add"] = [_step(graph, op.outputs[0])]
    concats = [op for op in graph.ops if op.opcode == "CONCATENATION"]
    for op, name in zip(concats, ("concat", "decoder_concat")):
        steps[name] = [_step(graph, op.outputs[0])]
    unknown = set(steps) - names
    if unknown:
        raise ModelError(f"{graph.path.name}: cannot place the source roundings of "
                         f"{sorted(unknown)} in the rebuilt graph")
    return steps


def input_step(graph: TFLiteGraph) -> QuantStep:
    """The source's input quantization (identity for inputs fed as ``(q - zp) * scale``)."""
    return _step(graph, graph.inputs[0])


def insert_fake_quant(model: keras.Model, steps: Dict[str, List[QuantStep]],
                      input_step: Optional[QuantStep]) -> keras.Model:
    """A copy of the functional ``model`` (same layers, same weights) with FakeQuant layers."""
    inp = keras.Input(model.input_shape[1:], batch_size=model.input_shape[0],
                      dtype=model.inputs[0].dtype, name=model.inputs[0].name.split(":")[0])
    x = FakeQuant([input_step], name="input_fq")(inp) if input_step else inp
    tensors = {id(model.layers[0].output): x}
    for layer in model.layers[1:]:
        sources = layer.input if isinstance(layer.input, list) else [layer.input]
        args = [tensors[id(t)] for t in sources]
        y = layer(args if isinstance(layer.input, list) else args[0])
        if layer.name in steps:
            y = FakeQuant(steps[layer.name], name=layer.name + "_fq")(y)
        tensors[id(layer.output)] = y
    return keras.Model(inp, tensors[id(model.outputs[0])], name=model.name + "_quant_emulation")
