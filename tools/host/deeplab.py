"""DeepLabV3 / DeepLabV3+ with a MobileNetV2 backbone, built from Edge-TPU-friendly layers.

The graph mirrors the TF-slim DeepLab export that Coral's models come from (batch norm folded
into conv biases, SAME padding, ``align_corners`` resizes), so weights read from those
``.tflite`` files load 1:1. Layer names are the slim scopes with ``/`` -> ``_`` (``MobilenetV2/``
dropped); ``conv_scopes`` lists them in the order the slim graph runs them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import List, Optional, Tuple

import tf_keras as keras

from edge_agent.errors import ConfigError

from .layers import ArgMaxHead, BilinearResize, DilatedDepthwiseConv2D

# (expansion, base output channels, stride) per inverted-residual block, slim's V2_DEF.
_BLOCKS: Tuple[Tuple[int, int, int], ...] = (
    (1, 16, 1),
    (6, 24, 2), (6, 24, 1),
    (6, 32, 2), (6, 32, 1), (6, 32, 1),
    (6, 64, 2), (6, 64, 1), (6, 64, 1), (6, 64, 1),
    (6, 96, 1), (6, 96, 1), (6, 96, 1),
    (6, 160, 2), (6, 160, 1), (6, 160, 1),
    (6, 320, 1),
)
_LOW_LEVEL_BLOCK = 3  # expanded_conv_3: stride-4 features for the V3+ decoder


@dataclass(frozen=True)
class DeepLabConfig:
    """Everything that fixes the graph (and so the weight layout)."""

    input_size: Tuple[int, int] = (513, 513)
    num_classes: int = 21
    depth_multiplier: float = 0.5
    output_stride: int = 16
    image_pooling: bool = True
    atrous_rates: Tuple[int, ...] = ()  # e.g. (6, 12, 18) at OS 16; empty = 1x1 branch only
    decoder: bool = False
    argmax: bool = False
    aspp_channels: int = 256
    decoder_channels: int = 256
    batch_size: Optional[int] = None

    def validate(self) -> "DeepLabConfig":
        if self.output_stride not in (8, 16, 32):
            raise ConfigError(f"output stride must be 8, 16 or 32, not {self.output_stride}")
        if self.depth_multiplier <= 0:
            raise ConfigError(f"depth multiplier must be > 0, not {self.depth_multiplier}")
        if min(self.input_size) < self.output_stride or self.num_classes < 1:
            raise ConfigError(f"bad input size {self.input_size} / classes {self.num_classes}")
        return self

    def to_dict(self) -> dict:
        return asdict(self)


def _make_divisible(value: float, divisor: int, min_value: Optional[int] = None) -> int:
    """slim's channel rounding (keeps weight shapes identical to the TF export)."""
    min_value = divisor if min_value is None else min_value
    new = max(min_value, int(value + divisor / 2) // divisor * divisor)
    if new < 0.9 * value:
        new += divisor
    return new


def _depth(channels: int, multiplier: float) -> int:
    # DeepLab rounds to multiples of 8 only at depth 1.0 (divisible_by=1 otherwise, min 8).
    return _make_divisible(channels * multiplier, 8 if multiplier == 1.0 else 1, 8)


@dataclass(frozen=True)
class BlockSpec:
    name: str
    expansion: int
    in_ch: int
    expand_ch: int
    out_ch: int
    stride: int
    rate: int
    residual: bool


def backbone_spec(cfg: DeepLabConfig) -> Tuple[int, List[BlockSpec]]:
    """First-conv channels and per-block specs with strides/rates for the output stride."""
    first = _depth(32, cfg.depth_multiplier)
    current_stride, rate = 2, 1
    in_ch, specs = first, []
    for i, (t, c, s) in enumerate(_BLOCKS):
        if current_stride == cfg.output_stride:
            layer_stride, layer_rate, rate = 1, rate, rate * s
        else:
            layer_stride, layer_rate, current_stride = s, 1, current_stride * s
        out_ch = _depth(c, cfg.depth_multiplier)
        expand_ch = _make_divisible(in_ch * t, 8) if t != 1 else in_ch
        name = "expanded_conv" if i == 0 else f"expanded_conv_{i}"
        specs.append(BlockSpec(name, t, in_ch, expand_ch, out_ch, layer_stride, layer_rate,
                               layer_stride == 1 and in_ch == out_ch))
        in_ch = out_ch
    return first, specs


def layer_name(scope: str) -> str:
    """Keras layer name for a slim scope (``MobilenetV2/expanded_conv_3/expand`` -> ...)."""
    return scope.replace("MobilenetV2/", "").replace("/", "_")


def conv_scopes(cfg: DeepLabConfig) -> List[str]:
    """Slim scopes of every weighted layer, in the order the exported graph runs them."""
    _, specs = backbone_spec(cfg)
    scopes = ["MobilenetV2/Conv"]
    for b in specs:
        if b.expansion != 1:
            scopes.append(f"MobilenetV2/{b.name}/expand")
        scopes += [f"MobilenetV2/{b.name}/depthwise", f"MobilenetV2/{b.name}/project"]
    scopes.append("aspp0")
    if cfg.image_pooling:
        scopes.append("image_pooling")
    for i, _ in enumerate(cfg.atrous_rates, start=1):
        scopes += [f"aspp{i}_depthwise", f"aspp{i}_pointwise"]
    scopes.append("concat_projection")
    if cfg.decoder:
        scopes += ["decoder/feature_projection0"]
        for j in range(2):
            scopes += [f"decoder/decoder_conv{j}_depthwise", f"decoder/decoder_conv{j}_pointwise"]
    scopes.append("logits/semantic")
    return scopes


def _conv(x, filters: int, scope: str, act: Optional[float], kernel: int = 1, stride: int = 1):
    x = keras.layers.Conv2D(filters, kernel, strides=stride, padding="same", use_bias=True,
                            name=layer_name(scope))(x)
    return _act(x, scope, act)


def _act(x, scope: str, act: Optional[float]):
    """ReLU6 (backbone), ReLU (head: ``act=0``) or none, as a separate fusable layer."""
    if act is None:
        return x
    return keras.layers.ReLU(max_value=act or None, name=layer_name(scope) + "_relu")(x)


def _depthwise(x, scope: str, stride: int, rate: int, act: Optional[float]):
    if rate == 1:
        layer = keras.layers.DepthwiseConv2D(3, strides=stride, padding="same", use_bias=True,
                                             name=layer_name(scope))
    else:  # native dilation: no SPACE_TO_BATCH_ND in the TFLite graph
        layer = DilatedDepthwiseConv2D(3, strides=stride, dilation_rate=rate,
                                       name=layer_name(scope))
    return _act(layer(x), scope, act)


def _backbone(inputs, cfg: DeepLabConfig):
    first, specs = backbone_spec(cfg)
    x = _conv(inputs, first, "MobilenetV2/Conv", 6.0, kernel=3, stride=2)
    low_level = None
    for b in specs:
        scope = f"MobilenetV2/{b.name}"
        y = x
        if b.expansion != 1:
            y = _conv(y, b.expand_ch, f"{scope}/expand", 6.0)
        y = _depthwise(y, f"{scope}/depthwise", b.stride, b.rate, 6.0)
        y = _conv(y, b.out_ch, f"{scope}/project", None)
        x = keras.layers.Add(name=layer_name(scope) + "_add")([x, y]) if b.residual else y
        if b.name == f"expanded_conv_{_LOW_LEVEL_BLOCK}":
            low_level = x
    return x, low_level


def _aspp(features, cfg: DeepLabConfig):
    fh, fw = int(features.shape[1]), int(features.shape[2])
    branches = []
    if cfg.image_pooling:
        pooled = keras.layers.AveragePooling2D((fh, fw), name="image_pooling_pool")(features)
        pooled = _conv(pooled, cfg.aspp_channels, "image_pooling", 0.0)
        branches.append(BilinearResize((fh, fw), name="image_pooling_resize")(pooled))
    branches.append(_conv(features, cfg.aspp_channels, "aspp0", 0.0))
    for i, rate in enumerate(cfg.atrous_rates, start=1):
        y = _depthwise(features, f"aspp{i}_depthwise", 1, rate, 0.0)
        branches.append(_conv(y, cfg.aspp_channels, f"aspp{i}_pointwise", 0.0))
    x = keras.layers.Concatenate(name="concat")(branches) if len(branches) > 1 else branches[0]
    return _conv(x, cfg.aspp_channels, "concat_projection", 0.0)


def _decoder(x, low_level, cfg: DeepLabConfig):
    lh, lw = int(low_level.shape[1]), int(low_level.shape[2])
    low = _conv(low_level, 48, "decoder/feature_projection0", 0.0)
    x = BilinearResize((lh, lw), name="decoder_resize")(x)
    x = keras.layers.Concatenate(name="decoder_concat")([x, low])
    for j in range(2):
        x = _depthwise(x, f"decoder/decoder_conv{j}_depthwise", 1, 1, 0.0)
        x = _conv(x, cfg.decoder_channels, f"decoder/decoder_conv{j}_pointwise", 0.0)
    return x


def build_deeplab(cfg: DeepLabConfig, name: str = "deeplabv3_mnv2") -> keras.Model:
    """Float Keras DeepLab: input float32 in [-1, 1], output logits at input size (or ArgMax)."""
    cfg.validate()
    h, w = cfg.input_size
    inputs = keras.Input((h, w, 3), batch_size=cfg.batch_size, name="image")
    features, low_level = _backbone(inputs, cfg)
    x = _aspp(features, cfg)
    if cfg.decoder:
        x = _decoder(x, low_level, cfg)
    x = keras.layers.Conv2D(cfg.num_classes, 1, name=layer_name("logits/semantic"))(x)
    out = BilinearResize((h, w), name="logits_resize")(x)
    if cfg.argmax:
        out = ArgMaxHead(name="argmax")(out)
    return keras.Model(inputs, out, name=name)


UPSAMPLE_FACTORS = (1, 2, 4, 8, 16)
LOGITS_LAYER = layer_name("logits/semantic")


def head_size(logits_hw: Tuple[int, int], input_hw: Tuple[int, int],
              upsample: int) -> Tuple[int, int]:
    """Output size of a head that upsamples the 1/16 logits ``upsample`` times (align corners).

    16 is the full input size (DeepLab's own head); smaller factors give ``(L - 1) * f + 1``,
    the sizes whose pixels sit exactly on the full-size grid (129 = 1/4 of a 513 input).
    """
    if upsample not in UPSAMPLE_FACTORS:
        raise ConfigError(f"upsample factor must be one of {UPSAMPLE_FACTORS}, not {upsample}")
    if upsample == 16:
        return tuple(input_hw)
    return tuple(min(s, (l - 1) * upsample + 1) if l > 1 else 1
                 for l, s in zip(logits_hw, input_hw))


def with_head(model: keras.Model, upsample: int, argmax: bool) -> keras.Model:
    """The same network with a new head: logits upsampled ``upsample`` times, optional ArgMax.

    Why: on the CPU the full-size head (21-channel bilinear resize to 513x513 + ArgMax over 5.5 M
    values) costs about a third of the whole invoke; a 129x129 label map resized by the agent
    (nearest, ``Geometry.valid_region``) costs ~0.1 ms and loses < 0.3 mIoU points.
    """
    try:
        logits = model.get_layer(LOGITS_LAYER).output
    except ValueError:
        raise ConfigError(f"{model.name}: no {LOGITS_LAYER!r} layer (not a DeepLab built by these "
                          f"tools): cannot change its head") from None
    input_hw = (int(model.input_shape[1]), int(model.input_shape[2]))
    size = head_size((int(logits.shape[1]), int(logits.shape[2])), input_hw, upsample)
    out = logits
    if size != tuple(logits.shape[1:3]):
        name = "logits_resize" if size == input_hw else f"logits_resize_x{upsample}"
        out = BilinearResize(size, name=name)(out)
    if argmax:
        out = ArgMaxHead(name="argmax")(out)
    return keras.Model(model.inputs, out, name=model.name)


def without_argmax(model: keras.Model) -> keras.Model:
    """The logits sub-model (training and QAT need logits, not class ids)."""
    if model.layers[-1].__class__.__name__ != "ArgMaxHead":
        return model
    return keras.Model(model.inputs, model.layers[-1].input, name=model.name)


def with_argmax(model: keras.Model) -> keras.Model:
    """Append the in-graph ArgMax head (smaller output, label map straight from the model)."""
    if model.layers[-1].__class__.__name__ == "ArgMaxHead":
        return model
    out = ArgMaxHead(name="argmax")(model.outputs[0])
    return keras.Model(model.inputs, out, name=model.name)

