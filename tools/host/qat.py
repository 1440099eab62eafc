"""Quantization-aware fine-tuning with tfmot, then export to a fully-integer TFLite model.

Recipe (seed): start from a trained float model, learning rate 3e-5 (Adam), optionally train
float for ``delay_steps`` first (delayed quantization), then insert fake-quant (tfmot
``quantize_annotate`` + ``quantize_apply``) and fine-tune. tfmot refuses custom layers, so they
are annotated explicitly: resize/ArgMax with a no-op config (they keep their input's range) and
the native dilated depthwise conv with a weight-quantizing config.
Checkpoints (``tf.train.CheckpointManager``) make long runs resumable.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import tensorflow as tf
import tensorflow_model_optimization as tfmot
import tf_keras as keras
from tqdm import tqdm

from edge_agent.errors import ConfigError

from . import datasets
from .deeplab import with_argmax, without_argmax
from .layers import CUSTOM_OBJECTS, ArgMaxHead, BilinearResize, DilatedDepthwiseConv2D
from .ptq import PTQOptions, configure, keras_converter, representative_dataset, _convert

quantizers = tfmot.quantization.keras.quantizers
QuantizeConfig = tfmot.quantization.keras.QuantizeConfig


class NoOpQuantizeConfig(QuantizeConfig):
    """Leave the layer float in training; the converter keeps its input's quantization."""

    def get_weights_and_quantizers(self, layer):
        return []

    def get_activations_and_quantizers(self, layer):
        return []

    def set_quantize_weights(self, layer, quantize_weights):
        pass

    def set_quantize_activations(self, layer, quantize_activations):
        pass

    def get_output_quantizers(self, layer):
        return []

    def get_config(self):
        return {}


class DepthwiseQuantizeConfig(NoOpQuantizeConfig):
    """8-bit symmetric weights for ``DilatedDepthwiseConv2D`` (output range: the next ReLU);
    activations and outputs stay as in ``NoOpQuantizeConfig``."""

    def get_weights_and_quantizers(self, layer):
        return [(layer.depthwise_kernel, quantizers.LastValueQuantizer(
            num_bits=8, symmetric=True, narrow_range=True, per_axis=False))]

    def set_quantize_weights(self, layer, quantize_weights):
        layer.depthwise_kernel = quantize_weights[0]


def _scope() -> dict:
    return {**CUSTOM_OBJECTS, "NoOpQuantizeConfig": NoOpQuantizeConfig,
            "DepthwiseQuantizeConfig": DepthwiseQuantizeConfig}


def _annotate(layer: keras.layers.Layer) -> keras.layers.Layer:
    annotate = tfmot.quantization.keras.quantize_annotate_layer
    if isinstance(layer, (BilinearResize, ArgMaxHead)):
        return annotate(layer, NoOpQuantizeConfig())
    if isinstance(layer, DilatedDepthwiseConv2D):
        return annotate(layer, DepthwiseQuantizeConfig())
    if isinstance(layer, keras.layers.InputLayer):
        return layer
    return annotate(layer)


def quantize_model(model: keras.Model) -> keras.Model:
    """Fake-quant training model of a float DeepLab (logits head; ArgMax is removed)."""
    model = without_argmax(model)
    annotated = keras.models.clone_model(model, clone_function=_annotate)
    annotated.set_weights(model.get_weights())
    with tfmot.quantization.keras.quantize_scope(_scope()):
        return tfmot.quantization.keras.quantize_apply(annotated)


@dataclass(frozen=True)
class QATOptions:
    steps: int = 2000
    delay_steps: int = 0  # float fine-tuning steps before fake-quant is inserted
    learning_rate: float = 3e-5
    batch_size: int = 8
    checkpoint_dir: Optional[str] = None
    checkpoint_every: int = 500
    seed: int = 0

    def validate(self) -> "QATOptions":
        if self.steps < 1 or self.delay_steps < 0 or self.batch_size < 1:
            raise ConfigError("QAT needs steps >= 1, delay_steps >= 0, batch_size >= 1")
        if not 0 < self.learning_rate < 1:
            raise ConfigError(f"learning rate {self.learning_rate} out of (0, 1)")
        return self


def _compile(model: keras.Model, lr: float) -> None:
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True,
                                                      ignore_class=datasets.IGNORE_INDEX)
    model.compile(optimizer=keras.optimizers.Adam(lr), loss=loss)


def _train(model: keras.Model, batches, steps: int, opts: QATOptions, phase: str,
           log: Callable[[str], None]) -> None:
    """``steps`` optimizer steps with a progress bar; checkpoints under ``<dir>/<phase>``."""
    _compile(model, opts.learning_rate)
    step = tf.Variable(0, dtype=tf.int64)
    manager = None
    if opts.checkpoint_dir:
        ckpt = tf.train.Checkpoint(model=model, optimizer=model.optimizer, step=step)
        manager = tf.train.CheckpointManager(ckpt, str(Path(opts.checkpoint_dir) / phase), 3)
        if manager.latest_checkpoint:
            model.optimizer.build(model.trainable_variables)  # slots exist before restoring
            ckpt.restore(manager.latest_checkpoint).expect_partial()
            log(f"{phase}: resumed from {manager.latest_checkpoint} (step {int(step)})")
    bar = tqdm(total=steps, initial=int(step), desc=f"{phase} training", unit="step")
    while int(step) < steps:
        x, y = next(batches)
        loss = float(model.train_on_batch(x, y))
        step.assign_add(1)
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}")
        if manager and (int(step) % opts.checkpoint_every == 0 or int(step) == steps):
            manager.save(checkpoint_number=int(step))
    bar.close()


def fine_tune(model: keras.Model, dataset: datasets.VocDataset, opts: QATOptions,
              log: Callable[[str], None] = print) -> keras.Model:
    """Delayed-quantization QAT on a VOC dataset; returns the fake-quant model."""
    opts.validate()
    size = (int(model.input_shape[1]), int(model.input_shape[2]))
    xs, ys = datasets.training_arrays(dataset, size)
    batches = datasets.batches((xs, ys), opts.batch_size, opts.seed)
    model = without_argmax(model)
    if opts.delay_steps:
        _train(model, batches, opts.delay_steps, opts, "float", log)
    qmodel = quantize_model(model)
    _train(qmodel, batches, opts.steps, opts, "qat", log)
    return qmodel


def export(qmodel: keras.Model, images: Sequence[np.ndarray], io_type: str = "uint8",
           argmax: bool = True) -> bytes:
    """Fully-integer TFLite from the fake-quant model.

    The fake-quant ranges fix almost every tensor; the few calibration images only cover what
    has none (the float-kept resize/ArgMax layers inherit their input's range anyway).
    """
    model = with_argmax(qmodel) if argmax else qmodel
    size = (int(model.input_shape[1]), int(model.input_shape[2]))
    converter = keras_converter(model)
    opts = PTQOptions(mode="int8", io_type=io_type)
    configure(converter, opts, representative_dataset(images, size, desc="export ranges"))
    return _convert(converter)
