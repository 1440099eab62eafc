"""Dilated depthwise convs run on every CPU and still convert to one dilated DEPTHWISE_CONV_2D.

TensorFlow's own CPU kernel of ``DepthwiseConv2dNative`` has no dilation; only oneDNN's has,
and TF turns oneDNN on by default only on CPUs with AVX-512 VNNI/BF16 or AMX. The layer runs
``tf.nn.depthwise_conv2d(dilations=...)`` (space-to-batch) instead, which the converter fuses
back. These tests hold with ``TF_ENABLE_ONEDNN_OPTS=0`` and ``=1`` (tools/test.sh runs both); only
the direct comparison with the native op needs its kernel and skips without it.
"""

import os
from collections import Counter

import numpy as np
import pytest

pytestmark = pytest.mark.host
tf = pytest.importorskip("tensorflow")

from tests.host.host_data import BIRD, DM05_QUANT, IMAGES  # noqa: E402
from tests.host.measure import interleaved_invoke_ms  # noqa: E402
from tools.host.datasets import calibration_images, model_input, read_rgb  # noqa: E402
from tools.host.layers import CUSTOM_OBJECTS, DilatedDepthwiseConv2D  # noqa: E402
from tools.host.ptq import PTQOptions, keras_converter, quantize_keras, write_tflite  # noqa: E402
from tools.host.rebuild import rebuild  # noqa: E402
from tools.host.tflite_reader import read_tflite  # noqa: E402

import tf_keras as keras  # noqa: E402

SPACE_TO_BATCH = {"SPACE_TO_BATCH_ND", "BATCH_TO_SPACE_ND"}


class NativeDilatedDepthwiseConv2D(DilatedDepthwiseConv2D):
    """What the layer did before: the native op with ``dilations`` (needs oneDNN to run)."""

    def call(self, inputs):
        s, d = self.strides, self.dilation_rate
        out = tf.raw_ops.DepthwiseConv2dNative(input=inputs, filter=self.depthwise_kernel,
                                               strides=[1, s, s, 1], padding="SAME",
                                               dilations=[1, d, d, 1])
        return tf.nn.bias_add(out, self.bias)


def native_kernel_available() -> bool:
    x, k = tf.zeros([1, 5, 5, 1]), tf.zeros([3, 3, 1, 1])
    try:
        tf.raw_ops.DepthwiseConv2dNative(input=x, filter=k, strides=[1, 1, 1, 1],
                                         padding="SAME", dilations=[1, 2, 2, 1])
        return True
    except tf.errors.UnimplementedError:
        return False


def reference(x: np.ndarray, kernel: np.ndarray, bias: np.ndarray, rate: int) -> np.ndarray:
    """Direct dilated depthwise convolution in float64 (SAME, stride 1), independent of TF."""
    _, h, w, _ = x.shape
    k = kernel.shape[0]
    pad = rate * (k - 1) // 2
    xp = np.pad(x.astype(np.float64), ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    out = np.zeros(x.shape, np.float64)
    for i in range(k):
        for j in range(k):
            out += xp[:, i * rate:i * rate + h, j * rate:j * rate + w, :] * kernel[i, j, :, 0]
    return out + bias


def layer_with_weights(cls, rate: int, channels: int, dtype="float32"):
    rng = np.random.default_rng(rate)
    layer = cls(3, dilation_rate=rate, dtype=dtype)
    layer.build((1, None, None, channels))
    layer.set_weights([rng.standard_normal((3, 3, channels, 1)),
                       rng.standard_normal(channels)])
    return layer


@pytest.mark.parametrize("size,rate", [(33, 2), (17, 2), (9, 4), (65, 12), (9, 36)])
def test_layer_runs_on_any_cpu_and_equals_a_direct_convolution(size, rate):
    x = np.random.default_rng(size).standard_normal((1, size, size, 16)).astype(np.float32)
    for dtype, tol in (("float32", 1e-5), ("float64", 1e-12)):
        layer = layer_with_weights(DilatedDepthwiseConv2D, rate, 16, dtype)
        kernel, bias = layer.get_weights()
        got = layer(tf.constant(x, dtype)).numpy()
        assert np.abs(got - reference(x, kernel, bias, rate)).max() <= tol
    # QAT trains through it: the gradients exist without the native kernel too
    layer = layer_with_weights(DilatedDepthwiseConv2D, rate, 16)
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(layer(tf.constant(x)) ** 2)
    grads = tape.gradient(loss, layer.trainable_weights)
    assert all(g is not None and np.isfinite(g.numpy()).all() for g in grads)


@pytest.mark.skipif(not native_kernel_available(),
                    reason="no dilated DepthwiseConv2dNative kernel here (oneDNN off: "
                           f"TF_ENABLE_ONEDNN_OPTS={os.environ.get('TF_ENABLE_ONEDNN_OPTS')})")
@pytest.mark.parametrize("size,rate", [(33, 2), (17, 4), (65, 12)])
def test_layer_equals_the_native_op(size, rate):
    x = tf.constant(np.random.default_rng(size).standard_normal((1, size, size, 32)), tf.float32)
    ours = layer_with_weights(DilatedDepthwiseConv2D, rate, 32)(x).numpy()
    native = layer_with_weights(NativeDilatedDepthwiseConv2D, rate, 32)(x).numpy()
    assert np.abs(ours - native).max() <= 1e-5 * max(1.0, np.abs(native).max())


def with_native_layers(model: keras.Model) -> keras.Model:
    """The same model with the native-op layer (what the tools converted before)."""
    def clone(layer):
        if isinstance(layer, DilatedDepthwiseConv2D):
            return NativeDilatedDepthwiseConv2D.from_config(layer.get_config())
        return layer.__class__.from_config(layer.get_config())
    with keras.utils.custom_object_scope(CUSTOM_OBJECTS):
        native = keras.models.clone_model(model, clone_function=clone)
    native.set_weights(model.get_weights())
    return native


def op_summary(path):
    graph = read_tflite(path)
    ops = Counter(op.opcode for op in graph.ops)
    dilations = [op.options.get("dilationHFactor", 1) for op in graph.ops
                 if op.opcode == "DEPTHWISE_CONV_2D"]
    return ops, dilations


def run_tflite(path, x: np.ndarray) -> np.ndarray:
    interpreter = tf.lite.Interpreter(model_path=str(path), num_threads=1)
    interpreter.allocate_tensors()
    inp = interpreter.get_input_details()[0]
    if inp["dtype"] != np.float32:
        scale, zero = inp["quantization"]
        x = np.clip(np.round(x / scale + zero), 0, 255).astype(inp["dtype"])
    interpreter.set_tensor(inp["index"], x)
    interpreter.invoke()
    return interpreter.get_tensor(interpreter.get_output_details()[0]["index"])


@pytest.mark.slow
def test_conversion_equals_the_native_op_graph(tmp_path):
    """Float and default-PTQ conversions of the rebuilt dm0.5 (257x257: odd 17x17 feature map,
    dilation 2) have the same ops, dilation factors and outputs as the native-op conversion
    (conversion itself never runs the TF kernel, so this holds without oneDNN), and invoke as fast."""
    model, _ = rebuild(DM05_QUANT, input_size=(257, 257), argmax=False)
    native = with_native_layers(model)
    images = calibration_images(IMAGES, 2)
    x = model_input(read_rgb(BIRD), (257, 257))[0][None]
    paths = {}
    for kind in ("float", "int8"):
        for name, m in (("ours", model), ("native", native)):
            data = (keras_converter(m).convert() if kind == "float"
                    else quantize_keras(m, PTQOptions(argmax=False), images))
            paths[kind, name] = write_tflite(data, tmp_path / f"{kind}_{name}.tflite")
        (ops, dil), (native_ops, native_dil) = (op_summary(paths[kind, n]) for n in ("ours", "native"))
        assert ops == native_ops and dil == native_dil, (ops, native_ops)
        assert not SPACE_TO_BATCH & set(ops) and ops["DEPTHWISE_CONV_2D"] == 17
        assert sorted(d for d in dil if d > 1) == [2, 2, 2]
        ours_out, native_out = (run_tflite(paths[kind, n], x).astype(np.float64)
                                for n in ("ours", "native"))
        diff = np.abs(ours_out - native_out).max()
        print(f"\n{kind}: {sum(ops.values())} ops {dict(sorted(ops.items()))}, dilations "
              f"{[d for d in dil if d > 1]}; output max abs diff vs the native-op conversion {diff:g}")
        assert diff <= (1e-4 if kind == "float" else 1)  # uint8 logits: at most 1 LSB
    (ours_ms, native_ms), runtime = interleaved_invoke_ms(
        [paths["int8", "ours"], paths["int8", "native"]], read_rgb(BIRD), threads=1, runs=20)
    print(f"int8 invoke ({runtime}, 1 thread, median of 20 interleaved): ours {ours_ms:.2f} ms, "
          f"native-op conversion {native_ms:.2f} ms, ratio {ours_ms / native_ms:.3f}")
    assert ours_ms <= 1.10 * native_ms


def test_default_ptq_at_513_keeps_single_dilated_depthwise_ops(dm05_ptq):
    ops, dilations = op_summary(dm05_ptq)
    assert not SPACE_TO_BATCH & set(ops)
    assert ops["DEPTHWISE_CONV_2D"] == 17 and sorted(d for d in dilations if d > 1) == [2, 2, 2]
