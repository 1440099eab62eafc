"""Bias correction of the output shift that weight quantization causes (Nagel et al. 2019;
Finkelstein et al. 2019).

A rounded kernel ``W + e`` shifts a conv's expected output by ``E[e x]``, and per-tensor rounding
of depthwise kernels makes that shift large enough to move whole channels. The correction puts
``-E[e x]`` into the (float) bias before conversion, with ``e`` emulating the converter's own
int8 rounding (symmetric, zero point 0, [-127, 127], per tensor or per output channel):

- ``empirical``: ``E[x]`` per input channel measured on the float model with the calibration
  images (layer-wise, so ``E[(W+e)x] - E[Wx] = e E[x]``; correcting layer by layer through the
  weight-quantized model instead fitted the deep layers' sample means and lost 1 mIoU point);
- ``analytic``: ``E[x]`` per input channel from a Gaussian model of the preceding conv's
  pre-activation passed through its ReLU/ReLU6 (the paper uses the batch-norm beta/gamma; here
  batch norm is folded into the biases, so mean and std are measured on the calibration images);
  inputs not produced by conv -> ReLU use their measured mean.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import erf, sqrt
from typing import List, Sequence, Tuple

import numpy as np
import tf_keras as keras

from edge_agent.errors import ConfigError

from .datasets import model_input
from .equalize import copy_model, is_conv, is_depthwise, out_axis, plain_relu, producers

METHODS = ("empirical", "analytic")


def quantize_kernel(kernel: np.ndarray, axis: "int | None") -> np.ndarray:
    """The kernel as TFLite's int8 weights dequantize: symmetric, narrow range, per ``axis``."""
    if axis is None:
        scale = np.abs(kernel).max() / 127.0
    else:
        reduce = tuple(i for i in range(kernel.ndim) if i != axis)
        scale = np.abs(kernel).max(axis=reduce, keepdims=True) / 127.0
    scale = np.where(scale > 0, scale, 1.0)
    ratio = kernel / scale
    rounded = np.sign(ratio) * np.floor(np.abs(ratio) + 0.5)  # TF rounds half away from 0
    return np.clip(rounded, -127, 127) * scale


def kernel_error(layer, per_channel: bool) -> np.ndarray:
    kernel = layer.get_weights()[0]
    return quantize_kernel(kernel, out_axis(layer) if per_channel else None) - kernel


@dataclass
class BiasReport:
    method: str
    layers: int
    mean_abs_shift: float  # mean |bias change| over all corrected channels

    def text(self) -> str:
        return (f"bias correction ({self.method}): {self.layers} conv layers, mean |bias "
                f"change| {self.mean_abs_shift:.4f}")


def _inputs(model: keras.Model, images: Sequence[np.ndarray]) -> np.ndarray:
    size = (int(model.input_shape[1]), int(model.input_shape[2]))
    return np.stack([model_input(image, size)[0] for image in images])


def _channel_stats(model: keras.Model, tensors: List, x: np.ndarray
                   ) -> Tuple[List[np.ndarray], List[np.ndarray]]:
    """Per-channel mean and std of each tensor over images and positions (one image a step)."""
    probe = keras.Model(model.inputs, tensors)
    sums = [np.zeros(int(t.shape[-1])) for t in tensors]
    squares = [np.zeros(int(t.shape[-1])) for t in tensors]
    count = 0
    for image in x:
        values = probe(image[None], training=False)
        values = values if isinstance(values, (list, tuple)) else [values]
        for i, v in enumerate(values):
            v = np.asarray(v, np.float64).reshape(-1, v.shape[-1])
            sums[i] += v.sum(axis=0)
            squares[i] += (v * v).sum(axis=0)
        count += 1
    means, stds = [], []
    for t, s, q in zip(tensors, sums, squares):
        n = count * int(np.prod(t.shape[1:-1]))
        mean = s / n
        means.append(mean)
        stds.append(np.sqrt(np.maximum(q / n - mean * mean, 0)))
    return means, stds


def _shift(layer, error: np.ndarray, input_mean: np.ndarray) -> np.ndarray:
    """E[e x] per output channel for input channel means (padding ignored)."""
    if is_depthwise(layer):
        return error.sum(axis=(0, 1, 3)) * input_mean
    return input_mean @ error.sum(axis=(0, 1))


def clipped_normal_mean(mu: np.ndarray, sigma: np.ndarray, top: float) -> np.ndarray:
    """E[clip(y, 0, top)] for y ~ N(mu, sigma^2) per channel (top may be inf)."""
    cdf = np.vectorize(lambda z: 0.5 * (1 + erf(z / sqrt(2))))
    pdf = lambda z: np.exp(-0.5 * z * z) / sqrt(2 * np.pi)  # noqa: E731
    sigma = np.maximum(sigma, 1e-12)
    a = -mu / sigma
    mean = mu * (1 - cdf(a)) + sigma * pdf(a)
    if np.isfinite(top):
        b = (top - mu) / sigma
        mean = mu * (cdf(b) - cdf(a)) + sigma * (pdf(a) - pdf(b)) + top * (1 - cdf(b))
    return mean


def _input_means(model: keras.Model, convs: List, x: np.ndarray, analytic: bool) -> List:
    """E[x] per input channel of each conv: measured, or (analytic) from a Gaussian model of
    the preceding conv's pre-activation passed through its ReLU/ReLU6."""
    sources = {}
    for c in convs:
        src = producers(c)[0]
        if analytic and plain_relu(src) and is_conv(producers(src)[0]):
            top = np.inf if src.max_value is None else float(src.max_value)
            sources[c.name] = (producers(src)[0].output, top)
        else:
            sources[c.name] = (c.input, None)
    tensors = list({id(t): t for t, _ in sources.values()}.values())
    means, stds = _channel_stats(model, tensors, x)
    stats = {id(t): (m, s) for t, m, s in zip(tensors, means, stds)}
    out = []
    for c in convs:
        tensor, top = sources[c.name]
        mu, sigma = stats[id(tensor)]
        out.append(mu if top is None else clipped_normal_mean(mu, sigma, top))
    return out


def bias_correct(model: keras.Model, images: Sequence[np.ndarray], per_channel: bool,
                 method: str = "empirical") -> Tuple[keras.Model, BiasReport]:
    """Copy of ``model`` whose conv biases cancel the mean shift of int8 weight rounding."""
    if method not in METHODS:
        raise ConfigError(f"unknown bias correction {method!r}: choose {', '.join(METHODS)}")
    if not images:
        raise ConfigError("bias correction needs calibration images (none given)")
    convs = [layer for layer in model.layers if is_conv(layer)]
    x = _inputs(model, images)
    means = _input_means(model, convs, x, analytic=method == "analytic")
    deltas = [-_shift(c, kernel_error(c, per_channel), m) for c, m in zip(convs, means)]
    out = copy_model(model)
    for c, delta in zip(convs, deltas):
        layer = out.get_layer(c.name)
        kernel, bias = layer.get_weights()
        layer.set_weights([kernel, bias + delta.astype(bias.dtype)])
    shift = float(np.mean(np.abs(np.concatenate(deltas)))) if deltas else 0.0
    return out, BiasReport(method, len(convs), shift)


def output_shift(reference: keras.Model, model: keras.Model, layer_name: str,
                 images: Sequence[np.ndarray], per_channel: bool) -> float:
    """Mean over channels of |E[y]| shift of one conv of ``model`` with its kernel quantized,
    against the float ``reference`` (both fed the same float inputs)."""
    x = _inputs(reference, images)
    layer = reference.get_layer(layer_name)
    (ref,), _ = _channel_stats(reference, [layer.output], x)
    qmodel = copy_model(reference)
    q = qmodel.get_layer(layer_name)
    q.set_weights([q.get_weights()[0] + kernel_error(q, per_channel),
                   model.get_layer(layer_name).get_weights()[1]])
    (mean,), _ = _channel_stats(qmodel, [q.output], x)
    return float(np.mean(np.abs(mean - ref)))
