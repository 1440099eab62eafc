"""Rebuild float Keras DeepLabs from Coral's uint8 models and the float original."""

import numpy as np
import pytest

pytestmark = pytest.mark.host
pytest.importorskip("tensorflow")

from tests.host.host_data import BIRD, DM05_FLOAT_257, DM05_QUANT, DM10_QUANT, MODELS  # noqa: E402
from edge_agent.errors import ModelError  # noqa: E402
from tools.host.compare import keras_vs_tflite  # noqa: E402
from tools.host.rebuild import load_model, rebuild, save_model  # noqa: E402


def test_rebuilt_dm10_agrees_with_coral_quant_on_golden_bird():
    model, cfg = rebuild(DM10_QUANT)
    assert (cfg.depth_multiplier, cfg.output_stride, cfg.input_size) == (1.0, 16, (513, 513))
    assert cfg.argmax and cfg.image_pooling and not cfg.atrous_rates and not cfg.decoder
    value = keras_vs_tflite(model, DM10_QUANT, BIRD)
    print(f"\ndm1.0 rebuilt float vs Coral uint8 on the golden bird: {value:.4f}")
    assert value >= 0.99


def test_rebuilt_dm05_agrees_with_coral_quant_on_golden_bird(dm05_rebuilt):
    model, cfg = dm05_rebuilt
    assert (cfg.depth_multiplier, cfg.num_classes) == (0.5, 21)
    value = keras_vs_tflite(model, DM05_QUANT, BIRD)
    print(f"\ndm0.5 rebuilt float vs Coral uint8 on the golden bird: {value:.4f}")
    # Measured 0.975: a float graph cannot reach 0.99 here. The uint8 dm0.5 network is chaotic at
    # the LSB level (the same uint8 model on TFLite's built-in kernels agrees only 0.986 with
    # itself on XNNPACK; its own fp16 original 0.950); the emulation test below proves the
    # weights are 1:1. docs/host-tools.md has the measurements.
    assert value >= 0.97


@pytest.mark.parametrize("source", [DM05_QUANT, DM10_QUANT], ids=["dm05", "dm10"])
def test_quant_emulating_rebuild_reproduces_its_source(source, tmp_path):
    """Rebuilt weights + the source's own activation rounding == the source, pixel for pixel."""
    model, cfg = rebuild(source, emulate_quant=True)
    assert model.inputs[0].dtype == "float64"
    fq = [layer for layer in model.layers if type(layer).__name__ == "FakeQuant"]
    assert len(fq) >= 70  # every conv, add, pool, resize (+ requantize) and the concat
    value = keras_vs_tflite(model, source, BIRD)
    print(f"\n{source.name}: quantization-emulating rebuild vs source on the golden bird: "
          f"{value:.4f}")
    assert value >= 0.99
    if source == DM05_QUANT:  # the emulating graph saves and loads like any rebuilt model
        loaded = load_model(save_model(model, tmp_path / "emulating.keras"))
        assert keras_vs_tflite(loaded, source, BIRD) == value


def test_quant_emulation_needs_a_quantized_source():
    with pytest.raises(ModelError, match="float input"):
        rebuild(DM05_FLOAT_257, emulate_quant=True)


def test_float_original_rebuilds_exactly():
    import tensorflow as tf

    from tools.host.datasets import model_input, read_rgb

    model, cfg = rebuild(DM05_FLOAT_257)
    assert cfg.input_size == (257, 257) and not cfg.argmax
    x, _ = model_input(read_rgb(BIRD), cfg.input_size)
    interp = tf.lite.Interpreter(str(DM05_FLOAT_257))
    interp.allocate_tensors()
    interp.set_tensor(interp.get_input_details()[0]["index"], x[None])
    interp.invoke()
    ref = interp.get_tensor(interp.get_output_details()[0]["index"])[0]
    ours = model.predict(x[None], verbose=0)[0]
    assert np.abs(ours - ref).max() < 1e-2 * np.abs(ref).max()
    assert (ours.argmax(-1) == ref.argmax(-1)).mean() > 0.999


def test_retarget_size_and_save_roundtrip(tmp_path, dm05_rebuilt):
    model, _ = rebuild(DM05_QUANT, input_size=(257, 257), argmax=True)
    assert model.output_shape == (None, 257, 257)
    path = save_model(dm05_rebuilt[0], tmp_path / "dm05.keras")
    loaded = load_model(path)
    x = np.random.default_rng(0).uniform(-1, 1, (1, 513, 513, 3)).astype(np.float32)
    np.testing.assert_allclose(loaded.predict(x, verbose=0), dm05_rebuilt[0].predict(x, verbose=0),
                               atol=1e-4)


def test_wrong_kind_of_model_is_refused(tmp_path):
    with pytest.raises(ModelError, match="not the same architecture|DeepLab|MobileNetV2|depthwise"):
        rebuild(MODELS / "mobilenet_v2_1.0_224_quant.tflite")
    bad = tmp_path / "bad.tflite"
    bad.write_bytes(b"not a model at all")
    with pytest.raises(ModelError, match="not a TFLite flatbuffer"):
        rebuild(bad)
    with pytest.raises(ModelError, match="model not found"):
        load_model(tmp_path / "missing.keras")


def test_rebuild_cli_emulate_quant(tmp_path, capsys):
    from tools.host.__main__ import main

    out = tmp_path / "emulating.keras"
    rc = main(["rebuild", str(DM05_QUANT), "-o", str(out), "--emulate-quant",
               "--check-image", str(BIRD)])
    lines = capsys.readouterr().out.splitlines()
    assert rc == 0 and out.is_file()
    assert "activation quantization emulated" in lines[0]
    value = float(lines[-1].rsplit(":", 1)[1])
    assert value >= 0.99
    rc = main(["rebuild", str(DM05_QUANT), "-o", str(out), "--emulate-quant",
               "--input-size", "257"])
    assert rc != 0 and "own input size" in capsys.readouterr().err
