"""Rebuild a float Keras DeepLab from a DeepLab ``.tflite`` (quantized or float).

Coral's uint8 DeepLab is the slim graph with batch norm folded: every CONV_2D /
DEPTHWISE_CONV_2D maps 1:1 onto a layer of ``deeplab.build_deeplab``. Its weights dequantize
(``(q - zero_point) * scale``) into a float model that reproduces it (>= 99 % agreement), which
can then be re-quantized, fine-tuned (QAT) or re-exported at another size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
import tf_keras as keras

from edge_agent.errors import ConfigError, ModelError

from .deeplab import DeepLabConfig, build_deeplab, conv_scopes, layer_name
from .layers import CUSTOM_OBJECTS
from .tflite_reader import ACTIVATIONS, TFLiteGraph, read_tflite

WEIGHTED_OPS = ("CONV_2D", "DEPTHWISE_CONV_2D")
# The widest graph this builder makes: every scope name any config can use.
_ALL_SCOPES = conv_scopes(DeepLabConfig(atrous_rates=(6, 12, 18), decoder=True))


@dataclass
class ConvOp:
    """One weighted op of the source, weights already dequantized to float (TFLite layout)."""

    index: int
    opcode: str
    name: str
    kernel: np.ndarray
    bias: np.ndarray
    stride: int
    dilation: int
    activation: Optional[str]


def conv_ops(graph: TFLiteGraph) -> List[ConvOp]:
    """Weighted ops in execution order with float weights."""
    out = []
    for op in graph.ops:
        if op.opcode not in WEIGHTED_OPS:
            continue
        kernel = graph.constant(op.inputs[1])
        has_bias = len(op.inputs) > 2 and op.inputs[2] >= 0
        bias = graph.constant(op.inputs[2]) if has_bias else np.zeros(kernel.shape[-1]
                                                                      if op.opcode == "DEPTHWISE_CONV_2D"
                                                                      else kernel.shape[0], np.float32)
        o = op.options
        out.append(ConvOp(op.index, op.opcode, graph.tensors[op.outputs[0]].name, kernel, bias,
                          int(o.get("strideH", 1)), int(o.get("dilationHFactor", 1)),
                          ACTIVATIONS.get(int(o.get("fusedActivationFunction", 0)))))
    return out


def match_scope(tensor_name: str, scopes: List[str]) -> Optional[str]:
    """The slim scope (or our Keras layer name) a tensor name belongs to; longest match wins."""
    best = None
    for part in tensor_name.split(";"):
        comps = part.split("/")
        for scope in scopes:
            sc = scope.split("/")
            keras_name = layer_name(scope)
            if comps[:len(sc)] == sc or keras_name in comps or keras_name + "_relu" in comps:
                if best is None or len(scope) > len(best):
                    best = scope
    return best


def assign_scopes(ops: List[ConvOp], cfg: DeepLabConfig) -> Dict[str, ConvOp]:
    """Scope -> op, by tensor names when they identify every op, else by execution order."""
    expected = conv_scopes(cfg)
    by_name = {}
    for op in ops:
        scope = match_scope(op.name, expected)
        if scope is None or scope in by_name:
            break
        by_name[scope] = op
    if len(by_name) == len(ops) == len(expected):
        return by_name
    if len(ops) != len(expected):
        raise ModelError(f"source has {len(ops)} conv ops, a {describe(cfg)} has "
                         f"{len(expected)}: not the same architecture")
    return dict(zip(expected, ops))


def describe(cfg: DeepLabConfig) -> str:
    h, w = cfg.input_size
    extra = (" +ASPP" + str(list(cfg.atrous_rates)) if cfg.atrous_rates else "") + \
        (" +decoder" if cfg.decoder else "")
    return (f"DeepLabV3 MobileNetV2 dm{cfg.depth_multiplier:g} OS{cfg.output_stride} "
            f"{h}x{w} {cfg.num_classes} classes{extra}")


def infer_config(graph: TFLiteGraph, ops: List[ConvOp]) -> DeepLabConfig:
    """Read the architecture hyper-parameters off the source graph."""
    in_shape = graph.tensors[graph.inputs[0]].shape
    if len(in_shape) != 4 or in_shape[3] != 3 or not ops:
        raise ModelError(f"{graph.path.name}: input {in_shape} is not a DeepLab image input")
    h, w = in_shape[1], in_shape[2]
    first = ops[0]
    if first.opcode != "CONV_2D" or first.kernel.shape[1:3] != (3, 3):
        raise ModelError(f"{graph.path.name}: does not start with MobileNetV2's 3x3 conv")
    multiplier = first.kernel.shape[0] / 32.0
    opcodes = [op.opcode for op in graph.ops]
    # feature map size at the head: output of the last backbone depthwise (17th)
    depthwise = [op for op in graph.ops if op.opcode == "DEPTHWISE_CONV_2D"]
    if len(depthwise) < 17:
        raise ModelError(f"{graph.path.name}: {len(depthwise)} depthwise convs, MobileNetV2 has 17")
    feat_h = graph.tensors[depthwise[16].outputs[0]].shape[1]
    stride = next((s for s in (8, 16, 32) if math.ceil(h / s) == feat_h), None)
    if stride is None:
        raise ModelError(f"{graph.path.name}: feature map {feat_h} for input {h}: unknown stride")
    names = [op.name for op in ops]
    atrous = tuple(op.dilation for op in ops
                   if match_scope(op.name, _ALL_SCOPES) in
                   [s for s in _ALL_SCOPES if s.startswith("aspp") and "depthwise" in s])
    decoder = any((match_scope(n, _ALL_SCOPES) or "").startswith("decoder") for n in names)
    return DeepLabConfig(
        input_size=(h, w), num_classes=int(ops[-1].kernel.shape[0]),
        depth_multiplier=multiplier, output_stride=stride,
        image_pooling="AVERAGE_POOL_2D" in opcodes or "MEAN" in opcodes,
        atrous_rates=atrous, decoder=decoder, argmax="ARG_MAX" in opcodes).validate()


def _keras_kernel(op: ConvOp) -> np.ndarray:
    # TFLite: conv [out, kh, kw, in]; depthwise [1, kh, kw, C]  ->  Keras [kh, kw, in, out|1]
    return np.transpose(op.kernel, (1, 2, 3, 0))


def _expected_activation(scope: str) -> Optional[str]:
    if scope.endswith("/project") or scope == "logits/semantic":
        return None
    return "RELU6" if scope.startswith("MobilenetV2/") else "RELU"


def load_weights(model: keras.Model, cfg: DeepLabConfig, ops: List[ConvOp]) -> None:
    """Copy every op's float weights into the matching layer; ModelError on any mismatch."""
    for scope, op in assign_scopes(ops, cfg).items():
        layer = model.get_layer(layer_name(scope))
        kernel = _keras_kernel(op)
        current = layer.get_weights()
        if current[0].shape != kernel.shape or current[1].shape != op.bias.shape:
            raise ModelError(f"{scope}: source weights {kernel.shape} do not fit layer "
                             f"{current[0].shape}: not the same architecture")
        rate = getattr(layer, "dilation_rate", 1)
        rate = rate[0] if isinstance(rate, (tuple, list)) else rate
        if rate != op.dilation or _expected_activation(scope) != op.activation:
            raise ModelError(f"{scope}: source dilation {op.dilation}/activation {op.activation} "
                             f"differ from the rebuilt graph ({rate}/{_expected_activation(scope)})")
        layer.set_weights([kernel, op.bias])


def rebuild(source: "str | Path", input_size: Optional[Tuple[int, int]] = None,
            argmax: Optional[bool] = None, emulate_quant: bool = False
            ) -> Tuple[keras.Model, DeepLabConfig]:
    """Float Keras model (+ its config) with the source's weights.

    ``input_size`` re-targets the graph (all weights are size-independent); ``argmax`` keeps or
    drops the in-graph ArgMax (default: as the source). ``emulate_quant`` returns instead the
    float64 verification graph that rounds every activation exactly as the quantized source
    does (``quant_emulation``): same weights, the source's own input size.
    """
    graph = read_tflite(source)
    ops = conv_ops(graph)
    cfg = infer_config(graph, ops)
    if emulate_quant:
        if input_size is not None and tuple(input_size) != cfg.input_size:
            raise ConfigError("the quantization emulation runs at the source's own input size "
                              f"{cfg.input_size}, not {tuple(input_size)}")
        cfg = cfg if argmax is None else replace(cfg, argmax=argmax)
        return emulating_model(graph, cfg, ops), cfg
    model = build_deeplab(cfg)
    load_weights(model, cfg, ops)
    if input_size is not None or argmax is not None:
        cfg = replace(cfg, input_size=tuple(input_size or cfg.input_size),
                      argmax=cfg.argmax if argmax is None else argmax)
        resized = build_deeplab(cfg)
        resized.set_weights([w for w in model.get_weights()])
        model = resized
    return model, cfg


def emulating_model(graph: TFLiteGraph, cfg: DeepLabConfig,
                    ops: List[ConvOp]) -> keras.Model:
    """float64 rebuilt graph + FakeQuant layers with the source's activation quantization."""
    from .quant_emulation import activation_steps, input_step, insert_fake_quant

    if not graph.tensors[graph.inputs[0]].quantized:
        raise ModelError(f"{graph.path.name} has a float input: there is no activation "
                         f"quantization to emulate (the plain rebuild is exact)")
    previous = keras.backend.floatx()
    keras.backend.set_floatx("float64")  # exact integer accumulators in the convs
    try:
        model = build_deeplab(cfg)
        load_weights(model, cfg, ops)
        scope_ops = {scope: op.index for scope, op in assign_scopes(ops, cfg).items()}
        steps = activation_steps(graph, scope_ops, [layer.name for layer in model.layers])
        return insert_fake_quant(model, steps, input_step(graph))
    finally:
        keras.backend.set_floatx(previous)


def save_model(model: keras.Model, out: "str | Path") -> Path:
    """``.keras`` / ``.h5`` file, or a SavedModel directory for any other path."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix in (".keras", ".h5"):
        model.save(out)
    else:
        model.save(out, save_format="tf")
    return out


def load_model(path: "str | Path") -> keras.Model:
    """A Keras model saved by these tools; ModelError if missing or unreadable."""
    path = Path(path)
    if not path.exists():
        raise ModelError(f"model not found: {path}")
    from .quant_emulation import FakeQuant

    try:
        custom = {**CUSTOM_OBJECTS, "FakeQuant": FakeQuant}
        return keras.models.load_model(path, custom_objects=custom, compile=False)
    except (OSError, ValueError, TypeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"cannot load Keras model {path}: {first}") from None
