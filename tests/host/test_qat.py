"""QAT: a short fine-tune on the VOC pairs exports a fully-integer model the agent runs."""

import numpy as np
import pytest

pytestmark = [pytest.mark.host, pytest.mark.slow]
pytest.importorskip("tensorflow_model_optimization")

from tests.host.host_data import BIRD, DM05_FLOAT_257, VOC  # noqa: E402
from edge_agent.errors import ConfigError  # noqa: E402
from edge_agent.inference.segmenter import Segmenter  # noqa: E402
from tools.host import qat  # noqa: E402
from tools.host.datasets import VocDataset, calibration_images, read_rgb  # noqa: E402
from tools.host.edgetpu_check import analyze_graph  # noqa: E402
from tools.host.ptq import write_tflite  # noqa: E402
from tools.host.rebuild import rebuild  # noqa: E402
from tools.host.tflite_reader import read_tflite  # noqa: E402


def test_short_qat_exports_uint8_model_without_float_ops(tmp_path, capsys):
    model, _ = rebuild(DM05_FLOAT_257)
    opts = qat.QATOptions(steps=2, delay_steps=1, batch_size=2,
                          checkpoint_dir=str(tmp_path / "ckpt"), checkpoint_every=1)
    qmodel = qat.fine_tune(model, VocDataset(VOC), opts)
    assert any("quantize" in layer.name for layer in qmodel.layers)
    assert (tmp_path / "ckpt" / "qat" / "checkpoint").is_file()
    assert (tmp_path / "ckpt" / "float" / "checkpoint").is_file()

    # resume: the checkpoint says training is done, so no further steps run
    qat.fine_tune(model, VocDataset(VOC), opts, log=print)
    assert "resumed from" in capsys.readouterr().out

    out = write_tflite(qat.export(qmodel, calibration_images(VOC, 2)), tmp_path / "qat.tflite")
    graph = read_tflite(out)
    assert graph.tensors[graph.inputs[0]].dtype == np.uint8
    report = analyze_graph(graph)
    assert not report.errors, [str(f) for f in report.errors]
    assert not {"float32", "float16"} & set(report.dtype_counts)
    assert not {"SPACE_TO_BATCH_ND", "BATCH_TO_SPACE_ND"} & set(report.op_counts)
    # the fake-quant dilated depthwise convs (space-to-batch in TF) fused to dilated single ops
    dilations = [op.options["dilationHFactor"] for op in graph.ops
                 if op.opcode == "DEPTHWISE_CONV_2D"]
    assert len(dilations) == 17 and sorted(d for d in dilations if d > 1) == [2] * 7 + [4] * 3
    mask = Segmenter(str(out)).segment(read_rgb(BIRD)).mask
    assert mask.shape == (513, 513) and mask.max() < 21


def test_bad_qat_options():
    with pytest.raises(ConfigError):
        qat.QATOptions(steps=0).validate()
    with pytest.raises(ConfigError):
        qat.QATOptions(learning_rate=3.0).validate()
