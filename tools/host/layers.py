"""Custom Keras layers that convert to Edge-TPU-friendly TFLite ops.

Why custom layers at all:
- ``DilatedDepthwiseConv2D`` keeps the slim scope names, weight layout and QAT config of the
  dilated depthwise convs. It runs ``tf.nn.depthwise_conv2d(dilations=...)``, i.e.
  SPACE_TO_BATCH_ND -> DepthwiseConv2dNative -> BATCH_TO_SPACE_ND in TensorFlow: TensorFlow's own
  CPU kernel of ``DepthwiseConv2dNative`` has no dilation (only oneDNN's does, and TF enables
  oneDNN by default only on CPUs with AVX-512 VNNI/BF16 or AMX), so the native op with
  ``dilations`` fails on most x86 hosts. The TFLite converter fuses that triple back into ONE
  DEPTHWISE_CONV_2D with dilation factors (what Coral's model has; the Edge TPU cannot run
  SPACE_TO_BATCH_ND/BATCH_TO_SPACE_ND) when the shapes are static, which ``ptq.keras_converter``
  guarantees (batch 1, fixed H x W). Measured with TF 2.21 (docs/host-tools.md): the same op
  list and bit-identical outputs as the native op for float, int8 per-channel/per-tensor,
  float16, dynamic and QAT exports; the tests assert it. A dynamic batch or spatial size
  (``TFLiteConverter.from_keras_model`` on a model with batch ``None``) keeps the triple.
- ``tf.image.resize`` (TF2) emits ``half_pixel_centers``; DeepLab was trained with
  ``align_corners=True``, which only the raw op exposes.
- ``ArgMax`` as a layer so the head can be kept inside the graph (uint8 label map out).
"""

from __future__ import annotations

from typing import Any, Sequence

import tensorflow as tf
import tf_keras as keras

PACKAGE = "edge_agent_host"


@keras.utils.register_keras_serializable(package=PACKAGE)
class DilatedDepthwiseConv2D(keras.layers.Layer):
    """Depthwise 3x3 conv (+bias), dilated: one dilated DEPTHWISE_CONV_2D after conversion."""

    def __init__(self, kernel_size: int = 3, strides: int = 1, dilation_rate: int = 1,
                 use_bias: bool = True, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.kernel_size = int(kernel_size)
        self.strides = int(strides)
        self.dilation_rate = int(dilation_rate)
        self.use_bias = bool(use_bias)
        if self.strides > 1 and self.dilation_rate > 1:
            raise ValueError("DilatedDepthwiseConv2D: strides > 1 with dilation_rate > 1 is not "
                             "supported (neither by tf.nn.depthwise_conv2d nor by DeepLab)")

    def build(self, input_shape: Sequence[int]) -> None:
        channels = int(input_shape[-1])
        k = self.kernel_size
        self.depthwise_kernel = self.add_weight(
            name="depthwise_kernel", shape=(k, k, channels, 1),
            initializer="glorot_uniform", trainable=True)
        self.bias = (self.add_weight(name="bias", shape=(channels,), initializer="zeros",
                                     trainable=True) if self.use_bias else None)
        super().build(input_shape)

    def call(self, inputs: tf.Tensor) -> tf.Tensor:
        # Space-to-batch around an undilated DepthwiseConv2dNative: runs on every CPU (with or
        # without oneDNN, float32 and the float64 quantization emulation); converted with static
        # shapes it is one dilated DEPTHWISE_CONV_2D again (module docstring).
        s, d = self.strides, self.dilation_rate
        out = tf.nn.depthwise_conv2d(inputs, self.depthwise_kernel, [1, s, s, 1], "SAME",
                                     dilations=[d, d])
        if self.bias is not None:
            out = tf.nn.bias_add(out, self.bias)
        return out

    def compute_output_shape(self, input_shape: Sequence[int]) -> tuple:
        h, w = input_shape[1], input_shape[2]
        s = self.strides
        return (input_shape[0], None if h is None else -(-h // s),
                None if w is None else -(-w // s), input_shape[3])

    def get_config(self) -> dict:
        cfg = super().get_config()
        cfg.update(kernel_size=self.kernel_size, strides=self.strides,
                   dilation_rate=self.dilation_rate, use_bias=self.use_bias)
        return cfg


@keras.utils.register_keras_serializable(package=PACKAGE)
class BilinearResize(keras.layers.Layer):
    """Bilinear resize to a fixed size with ``align_corners`` (DeepLab's convention)."""

    def __init__(self, size: Sequence[int], align_corners: bool = True, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.size = (int(size[0]), int(size[1]))
        self.align_corners = bool(align_corners)

    def call(self, inputs: tf.Tensor) -> tf.Tensor:
        out = tf.raw_ops.ResizeBilinear(images=inputs, size=list(self.size),
                                        align_corners=self.align_corners,
                                        half_pixel_centers=False)
        return tf.cast(out, inputs.dtype)  # the op always returns float32

    def compute_output_shape(self, input_shape: Sequence[int]) -> tuple:
        return (input_shape[0], self.size[0], self.size[1], input_shape[3])

    def get_config(self) -> dict:
        cfg = super().get_config()
        cfg.update(size=list(self.size), align_corners=self.align_corners)
        return cfg


@keras.utils.register_keras_serializable(package=PACKAGE)
class ArgMaxHead(keras.layers.Layer):
    """Class-id map from logits (ARG_MAX op, int32 output)."""

    def call(self, inputs: tf.Tensor) -> tf.Tensor:
        return tf.math.argmax(inputs, axis=-1, output_type=tf.int32)

    def compute_output_shape(self, input_shape: Sequence[int]) -> tuple:
        return tuple(input_shape[:-1])


CUSTOM_OBJECTS = {
    "DilatedDepthwiseConv2D": DilatedDepthwiseConv2D,
    "BilinearResize": BilinearResize,
    "ArgMaxHead": ArgMaxHead,
}
