"""Model definitions: variants build, convert to int8 with native dilation (no SPACE_TO_BATCH)."""

import numpy as np
import pytest

pytestmark = pytest.mark.host
pytest.importorskip("tensorflow")

from tests.host.host_data import IMAGES  # noqa: E402
from edge_agent.errors import ConfigError  # noqa: E402
from tools.host.__main__ import main  # noqa: E402
from tools.host.datasets import calibration_images  # noqa: E402
from tools.host.deeplab import DeepLabConfig, backbone_spec, build_deeplab  # noqa: E402
from tools.host.edgetpu_check import analyze_graph  # noqa: E402
from tools.host.ptq import PTQOptions, quantize_keras, write_tflite  # noqa: E402
from tools.host.tflite_reader import read_tflite  # noqa: E402


def test_backbone_matches_slim_channels_and_rates():
    first, blocks = backbone_spec(DeepLabConfig(depth_multiplier=0.5, output_stride=16))
    assert first == 16 and [b.out_ch for b in blocks][:4] == [8, 12, 12, 16]
    assert [b.rate for b in blocks][13:] == [1, 2, 2, 2]
    _, blocks8 = backbone_spec(DeepLabConfig(depth_multiplier=1.0, output_stride=8))
    assert blocks8[6].stride == 1 and blocks8[16].rate == 4 and blocks8[16].out_ch == 320


def test_v3plus_os8_atrous_argmax_converts_without_space_to_batch(tmp_path):
    cfg = DeepLabConfig(input_size=(65, 65), depth_multiplier=0.5, output_stride=8,
                        atrous_rates=(12, 24, 36), decoder=True, argmax=True)
    model = build_deeplab(cfg)
    assert model.output_shape == (None, 65, 65)
    data = quantize_keras(model, PTQOptions(), calibration_images(IMAGES, 1))
    graph = read_tflite(write_tflite(data, tmp_path / "v3plus.tflite"))
    dilations = [op.options["dilationHFactor"] for op in graph.ops
                 if op.opcode == "DEPTHWISE_CONV_2D"]
    assert {2, 4, 12, 24, 36} <= set(dilations)
    report = analyze_graph(graph)
    assert not report.errors and "SPACE_TO_BATCH_ND" not in report.op_counts
    assert report.op_counts["ARG_MAX"] == 1


def test_build_cli_and_bad_config(tmp_path, capsys):
    out = tmp_path / "m.keras"
    assert main(["build", "-o", str(out), "--input-size", "65", "--output-stride", "16"]) == 0
    assert out.is_file() and "parameters" in capsys.readouterr().out
    assert main(["build", "-o", str(out), "--output-stride", "4"]) != 0
    assert "output stride must be" in capsys.readouterr().err
    with pytest.raises(ConfigError):
        DeepLabConfig(depth_multiplier=0).validate()
    assert np.isfinite(build_deeplab(DeepLabConfig(input_size=(33, 33))).count_params())
