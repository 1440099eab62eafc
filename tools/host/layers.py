"""Custom Keras layers that convert to Edge-TPU-friendly TFLite ops.

Why custom layers at all:
- Keras ``DepthwiseConv2D(dilation_rate>1)`` lowers to SPACE_TO_BATCH_ND / BATCH_TO_SPACE_ND around
  a plain depthwise conv; the Edge TPU cannot run those. ``DepthwiseConv2dNative`` with
  ``dilations`` converts to one DEPTHWISE_CONV_2D with dilation factors (what Coral's model has).
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
    """Depthwise 3x3 conv (+bias) with native dilation: one DEPTHWISE_CONV_2D after conversion."""

    def __init__(self, kernel_size: int = 3, strides: int = 1, dilation_rate: int = 1,
                 use_bias: bool = True, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.kernel_size = int(kernel_size)
        self.strides = int(strides)
        self.dilation_rate = int(dilation_rate)
        self.use_bias = bool(use_bias)

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
        s, d = self.strides, self.dilation_rate
        if inputs.dtype == tf.float64 and d > 1:
            # TF's CPU kernel has no float64 dilated DepthwiseConv2dNative; float64 only serves
            # the quantization emulation (never converted), so the generic op is fine there.
            out = tf.nn.depthwise_conv2d(inputs, self.depthwise_kernel, [1, s, s, 1], "SAME",
                                         dilations=[d, d])
            return tf.nn.bias_add(out, self.bias) if self.bias is not None else out
        out = tf.raw_ops.DepthwiseConv2dNative(
            input=inputs, filter=self.depthwise_kernel, strides=[1, s, s, 1],
            padding="SAME", dilations=[1, d, d, 1])
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
