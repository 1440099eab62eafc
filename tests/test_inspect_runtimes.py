"""`edge-agent inspect` and the runtime registry."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from edge_agent.inference import runtimes
from edge_agent.errors import RuntimeNotAvailable
from edge_agent.inference.inspect import tensor_summary
from edge_agent.inference.runtimes import edgetpu
from tests.data import CLASSIFIER, DM05, DM10_EDGETPU, FLOAT_257

import numpy as np


def inspect(*args):
    # a hang guard, generous: one emulated aarch64 process (tools/test-arm64.sh) on a loaded
    # 2-core host took more than 60 s just to import numpy, OpenCV and the runtime
    return subprocess.run([sys.executable, "-m", "edge_agent", "inspect", *args],
                          capture_output=True, text=True, timeout=300)


def test_inspect_prints_tensors_and_quantization():
    proc = inspect(str(DM05))
    assert proc.returncode == 0, proc.stderr
    assert "MobilenetV2/MobilenetV2/input" in proc.stdout
    assert "uint8    [1, 513, 513, 3]   scale 0.0078125 zero_point 128" in proc.stdout
    assert "ArgMax" in proc.stdout and "int64" in proc.stdout
    assert "CONV_2D" in proc.stdout and "DEPTHWISE_CONV_2D" in proc.stdout


def test_inspect_json_and_edgetpu_model():
    proc = inspect(str(DM10_EDGETPU), "--json")
    info = json.loads(proc.stdout)
    assert info["edgetpu"] is True and "edgetpu-custom-op" in info["ops"]
    assert info["inputs"][0]["quantization"] == {"scale": 0.0078125, "zero_point": 128}


def test_inspect_float_model_and_all_tensors():
    proc = inspect(str(FLOAT_257), "--all")
    assert proc.returncode == 0 and "float32  [1, 257, 257, 3]   not quantized" in proc.stdout
    assert "tensors (" in proc.stdout


def test_per_axis_quantization_is_summarised():
    details = {"index": 4, "name": "w", "dtype": np.int8, "shape": np.array([8, 3, 3, 4]),
               "quantization_parameters": {"scales": np.linspace(0.01, 0.08, 8, dtype=np.float32),
                                           "zero_points": np.zeros(8, np.int32),
                                           "quantized_dimension": 0}}
    q = tensor_summary(details)["quantization"]
    assert q["per_axis"] and q["channels"] == 8 and q["quantized_dimension"] == 0
    assert q["scale_min"] == pytest.approx(0.01) and q["scale_max"] == pytest.approx(0.08)


def test_inspect_bad_file_is_one_line(tmp_path):
    bad = tmp_path / "x.tflite"
    bad.write_bytes(b"hello")
    proc = inspect(str(bad))
    assert proc.returncode == 2 and "not a TFLite model" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_registry_orders_backends_fastest_first():
    names = runtimes.names()
    assert names[:3] == ["litert", "tflite-runtime", "tensorflow"]
    assert runtimes.available(), "at least one runtime must be installed"
    assert runtimes.resolve("auto").name == runtimes.available()[0] or \
        runtimes.resolve("auto").name == __import__("os").environ.get("EDGE_AGENT_RUNTIME")


def test_env_var_chooses_the_default_runtime(monkeypatch):
    first = runtimes.available()[0]
    monkeypatch.setenv("EDGE_AGENT_RUNTIME", first)
    assert runtimes.resolve("auto").name == first
    monkeypatch.setenv("EDGE_AGENT_RUNTIME", "nonsense")
    with pytest.raises(RuntimeNotAvailable, match="unknown runtime 'nonsense'"):
        runtimes.resolve(None)


def test_aliases():
    for backend in runtimes.backends():
        for alias in backend.aliases:
            if backend.is_available():
                assert runtimes.resolve(alias).name == backend.name


@pytest.mark.parametrize("device,options", [
    ("", {}), ("usb", {"device": "usb"}), ("usb:1", {"device": "usb:1"}),
    ("pci", {"device": "pci"}), ("pci:0", {"device": "pci:0"}), (":2", {"device": ":2"}),
])
def test_edgetpu_device_strings(device, options):
    assert edgetpu.parse_device(device) == options


def test_edgetpu_model_detection():
    assert edgetpu.is_edgetpu_model(DM10_EDGETPU.read_bytes())
    assert not edgetpu.is_edgetpu_model(DM05.read_bytes())
    assert not edgetpu.is_edgetpu_model(CLASSIFIER.read_bytes())
