"""TF1 frozen GraphDef conversion on a small graph built here."""

import numpy as np
import pytest

pytestmark = pytest.mark.host
tf = pytest.importorskip("tensorflow")

from tests.host.host_data import IMAGES  # noqa: E402
from edge_agent.errors import ConfigError, ModelError  # noqa: E402
from tools.host.__main__ import main  # noqa: E402
from tools.host.datasets import calibration_images  # noqa: E402
from tools.host.frozen import convert_frozen  # noqa: E402
from tools.host.ptq import PTQOptions  # noqa: E402
from tools.host.tflite_reader import read_tflite  # noqa: E402


@pytest.fixture()
def frozen_pb(tmp_path):
    """conv 3x3 + ReLU6 -> 1x1 conv (5 classes) -> bilinear resize: a mini segmentation graph."""
    graph = tf.Graph()
    with graph.as_default():
        rng = np.random.default_rng(0)
        x = tf.compat.v1.placeholder(tf.float32, [1, 32, 32, 3], name="image")
        w1 = tf.constant(rng.normal(0, 0.3, (3, 3, 3, 8)).astype(np.float32))
        h = tf.nn.relu6(tf.nn.conv2d(x, w1, 2, "SAME") + 0.1)
        w2 = tf.constant(rng.normal(0, 0.3, (1, 1, 8, 5)).astype(np.float32))
        logits = tf.nn.conv2d(h, w2, 1, "SAME")
        tf.compat.v1.image.resize_bilinear(logits, [32, 32], align_corners=True, name="logits")
    path = tmp_path / "frozen_inference_graph.pb"
    path.write_bytes(graph.as_graph_def().SerializeToString())
    return path


def test_frozen_graph_to_uint8_and_fp16(frozen_pb):
    images = calibration_images(IMAGES, 2)
    data = convert_frozen(frozen_pb, "image", ["logits"], (32, 32), PTQOptions(), images)
    graph_path = frozen_pb.with_suffix(".tflite")
    graph_path.write_bytes(data)
    graph = read_tflite(graph_path)
    assert graph.tensors[graph.inputs[0]].dtype == np.uint8
    assert graph.tensors[graph.outputs[0]].shape == [1, 32, 32, 5]
    assert {op.opcode for op in graph.ops} >= {"CONV_2D", "RESIZE_BILINEAR"}
    interp = tf.lite.Interpreter(model_content=data)
    interp.allocate_tensors()
    interp.set_tensor(graph.inputs[0], np.full((1, 32, 32, 3), 128, np.uint8))
    interp.invoke()
    fp16 = convert_frozen(frozen_pb, "image", ["logits"], (32, 32), PTQOptions(mode="float16"))
    assert len(fp16) > 0 and data != fp16


def test_frozen_cli_and_errors(frozen_pb, tmp_path, capsys):
    out = tmp_path / "cli.tflite"
    rc = main(["convert-frozen", str(frozen_pb), "-o", str(out), "--input-array", "image",
               "--output-arrays", "logits", "--input-size", "32", "--calib", str(IMAGES),
               "--num-calib", "2"])
    assert rc == 0 and out.stat().st_size > 0
    with pytest.raises(ConfigError, match="no node named nope"):
        convert_frozen(frozen_pb, "nope", ["logits"], (32, 32), PTQOptions(mode="float16"))
    junk = tmp_path / "junk.pb"
    junk.write_bytes(b"\xff\xff garbage")
    rc = main(["convert-frozen", str(junk), "-o", str(out), "--input-array", "image",
               "--output-arrays", "logits", "--input-size", "32", "--mode", "float16"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc != 0 and err[-1].startswith("error: ") and "GraphDef" in err[-1]
    with pytest.raises(ModelError):
        convert_frozen(tmp_path / "missing.pb", "image", ["logits"], (32, 32), PTQOptions())
