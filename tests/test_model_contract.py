"""Every refusal: one readable line, exit code != 0, no traceback, no crash, no hang."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from edge_agent.inference import runtimes
from edge_agent.errors import ModelError, RuntimeNotAvailable
from edge_agent.inference.contract import InputSpec, input_lut
from edge_agent.inference.segmenter import Segmenter
from tests.data import (BIRD, CLASSIFIER, DM05, DM05_EDGETPU, DM10_EDGETPU, INVOKE_ERROR,
                        bird_513)


def truncated(tmp_path):
    data = DM05.read_bytes()
    path = tmp_path / "truncated.tflite"
    path.write_bytes(data[: len(data) // 2])
    return path


@pytest.mark.parametrize("fraction", [0.05, 0.3, 0.9, 0.999])
def test_truncated_models_never_crash_the_process(fraction, tmp_path):
    """tflite-runtime 2.14 does not verify flatbuffers: without our check it segfaults."""
    data = DM05.read_bytes()
    path = tmp_path / "cut.tflite"
    path.write_bytes(data[: int(len(data) * fraction)])
    proc = subprocess.run(
        [sys.executable, "-m", "edge_agent", "inspect", str(path)],
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert "corrupt TFLite model" in proc.stderr and "Traceback" not in proc.stderr


def garbage(tmp_path):
    path = tmp_path / "garbage.tflite"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    return path


def empty(tmp_path):
    path = tmp_path / "empty.tflite"
    path.write_bytes(b"")
    return path


REFUSALS = {
    "classifier": (lambda tmp: CLASSIFIER, "not a segmentation model"),
    "edgetpu_without_delegate": (lambda tmp: DM10_EDGETPU, "compiled for the Edge TPU"),
    "missing": (lambda tmp: tmp / "nope.tflite", "not found"),
    "directory": (lambda tmp: tmp, "is a directory"),
    "garbage": (garbage, "not a TFLite model"),
    "empty": (empty, "not a TFLite model"),
    "truncated": (truncated, "model"),
    "invoke_error": (lambda tmp: INVOKE_ERROR, "cannot prepare this model"),
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_refused_through_api(case, tmp_path):
    make, message = REFUSALS[case]
    with pytest.raises(ModelError, match=message) as info:
        Segmenter(str(make(tmp_path)))
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_refused_through_cli(case, tmp_path):
    make, message = REFUSALS[case]
    proc = subprocess.run(
        [sys.executable, "-m", "edge_agent", "segment", str(BIRD), "--model", str(make(tmp_path)),
         "--out", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    errors = [l for l in proc.stderr.splitlines() if l.startswith("edge-agent: error:")]
    assert len(errors) == 1 and message in errors[0], proc.stderr
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_bad_image_is_refused_before_loading_the_model(tmp_path):
    bad = tmp_path / "notes.png"
    bad.write_text("not an image")
    for path, msg in ((bad, "not a readable image"), (tmp_path / "missing.jpg", "image not found")):
        proc = subprocess.run(
            [sys.executable, "-m", "edge_agent", "segment", str(path), "--model", str(DM05)],
            capture_output=True, text=True, timeout=60,
        )
        assert proc.returncode == 2 and msg in proc.stderr and "Traceback" not in proc.stderr


def test_edgetpu_delegate_missing_is_one_clear_line():
    with pytest.raises(RuntimeNotAvailable, match="Edge TPU delegate") as info:
        Segmenter(str(DM05_EDGETPU), edgetpu="usb")
    assert "\n" not in str(info.value)


def test_edgetpu_falls_back_to_the_cpu_twin():
    seg = Segmenter(str(DM05_EDGETPU), edgetpu="usb:0", cpu_fallback=str(DM05))
    info = seg.info()
    assert info["path"] == str(DM05) and info["delegate"] is None
    assert "Edge TPU" in info["fallback_reason"]
    assert seg.segment(bird_513()).mask.shape == (513, 513)


def test_edgetpu_model_without_delegate_uses_configured_fallback():
    seg = Segmenter(str(DM10_EDGETPU), cpu_fallback=str(DM05))
    assert seg.info()["sha256"] != "" and "compiled for the Edge TPU" in seg.info()["fallback_reason"]


def test_fallback_that_is_itself_an_edgetpu_model_is_refused():
    with pytest.raises(ModelError, match="itself an Edge TPU model"):
        Segmenter(str(DM10_EDGETPU), cpu_fallback=str(DM05_EDGETPU))


@pytest.mark.parametrize("device", ["usb:x", "gpu", "usb:0:1", "pcie"])
def test_bad_edgetpu_device_string(device):
    with pytest.raises(RuntimeNotAvailable, match="bad Edge TPU device"):
        Segmenter(str(DM05), edgetpu=device)


def test_unknown_runtime_is_refused():
    with pytest.raises(RuntimeNotAvailable, match="unknown runtime 'onnx'"):
        Segmenter(str(DM05), runtime="onnx")


def test_runtime_not_installed_is_refused():
    missing = [b.name for b in runtimes.backends() if not b.is_available()]
    if not missing:
        pytest.skip("every runtime is installed in this environment")
    with pytest.raises(RuntimeNotAvailable, match="is not installed"):
        Segmenter(str(DM05), runtime=missing[0])


def test_bad_frames_are_refused():
    seg = Segmenter(str(DM05))
    for frame in (np.zeros((10, 10), np.uint8), np.zeros((10, 10, 3), np.float32),
                  np.zeros((10, 10, 4), np.uint8)):
        with pytest.raises(ValueError):
            seg.segment(frame)


def test_info_reports_what_actually_ran():
    seg = Segmenter(str(DM05), threads=1)
    info = seg.info()
    assert info["runtime"] in runtimes.names() and info["runtime_version"]
    assert info["threads"] == 1 and info["delegate"] is None
    assert info["input_size"] == [513, 513] and info["input_dtype"] == "uint8"
    assert info["output_kind"] == "labels" and len(info["sha256"]) == 64


def test_uint8_lut_is_identity_for_coral_quantization():
    assert input_lut(InputSpec(0, 513, 513, np.uint8, 1 / 128, 128)) is None


def test_int8_lut_matches_the_normalisation():
    spec = InputSpec(0, 8, 8, np.int8, 0.0078125, 0)
    lut = input_lut(spec).view(np.int8)
    pixels = np.array([0, 64, 128, 255])
    expected = np.clip(np.round((pixels / 127.5 - 1) / 0.0078125), -128, 127)
    assert np.array_equal(lut[pixels], expected)


def test_uint8_lut_for_other_quantization():
    spec = InputSpec(0, 8, 8, np.uint8, 0.0157, 64)
    lut = input_lut(spec)
    assert lut is not None
    real = np.arange(256) / 127.5 - 1
    assert np.abs((lut.astype(float) - 64) * 0.0157 - real).max() <= 0.0157 / 2 + 1e-9
