"""Bring your own model: what the agent reads from a model (TFLite Metadata, tensors) and what it
refuses. Real public models from ../shared/test_data and tiny real models written by
tests/tflite_builder.py (no TensorFlow), through the API, the CLI and a real daemon."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import List

import cv2
import numpy as np
import pytest

from edge_agent.errors import ModelError
from edge_agent.inference.metadata import read_metadata
from edge_agent.inference.model import ModelOptions, cpu_twin_name
from edge_agent.inference.postprocess import agreement
from edge_agent.inference.segmenter import Segmenter
from edge_agent.output.encode import decode_mask_png
from tests.broker import Recorder
from tests.data import DM05_EDGETPU, DM10, FLOAT_257, IMAGES, LABELS, MODELS, rgb
from tests.helpers import start_agent, stop_agent, write_config

PREFIX = "edge-agent"
from tests.tflite_builder import build_metadata, conv_model, upscale_model

SELFIE = MODELS / "selfie_segmentation.tflite"
GRACE = IMAGES / "grace_hopper.bmp"
PERSON = 15  # PASCAL VOC


# -- helpers -------------------------------------------------------------------------------------

def cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edge_agent", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout)


def error_lines(proc: subprocess.CompletedProcess) -> List[str]:
    return [line for line in proc.stderr.splitlines() if line.startswith("edge-agent: error:")]


def assert_refused(proc: subprocess.CompletedProcess, *words: str) -> str:
    """Exit 2, no traceback, exactly one error line containing every word."""
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    lines = error_lines(proc)
    assert len(lines) == 1, proc.stderr
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


def write(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def blocks(size: int, cells: int, seed: int = 0) -> np.ndarray:
    """A size x size RGB frame of random colour blocks (no resize needed for a size x size model)."""
    small = np.random.default_rng(seed).integers(0, 256, (cells, cells, 3), dtype=np.uint8)
    return cv2.resize(small, (size, size), interpolation=cv2.INTER_NEAREST)


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.count_nonzero(a & b)) / max(1, int(np.count_nonzero(a | b)))


@pytest.fixture(scope="module")
def deeplab_person() -> np.ndarray:
    """The DeepLab depth-1.0 model's person mask of grace_hopper.bmp (the cross-model reference)."""
    return Segmenter(str(DM10), labels=str(LABELS)).segment(rgb(GRACE)).mask == PERSON


def segment_cli(tmp_path: Path, model: Path, *extra: str, image: Path = GRACE):
    out = tmp_path / "out"
    proc = cli("segment", image, "--model", model, "--out", out, *extra)
    assert proc.returncode == 0, proc.stderr
    mask = decode_mask_png((out / f"{image.stem}_mask.png").read_bytes())  # palette PNG of the ids
    return proc, mask


# -- metadata reader on the shared models -------------------------------------------------------

def test_metadata_of_the_selfie_model():
    md, problem = read_metadata(SELFIE.read_bytes())
    assert problem is None and md is not None
    assert md.inputs[0].mean == (0.0,) and md.inputs[0].std == (255.0,)
    assert md.inputs[0].content == "image" and md.outputs[0].label_file == "labels.txt"
    assert md.labels(md.outputs[0]) == ["selfie"]
    assert "segmentation" in md.description.lower()


def test_metadata_of_the_257_float_model():
    md, problem = read_metadata(FLOAT_257.read_bytes())
    assert problem is None and md is not None
    assert md.inputs[0].mean == (127.5,) and md.inputs[0].std == (127.5,)
    assert md.inputs[0].stats_min == (-1.0,) and md.inputs[0].stats_max == (1.0,)
    labels = md.labels(md.outputs[0])
    assert len(labels) == 21 and labels[0] == "background" and labels[PERSON] == "person"


def test_models_without_metadata_report_none():
    assert read_metadata(DM10.read_bytes()) == (None, None)


def test_corrupt_metadata_is_reported_not_fatal(tmp_path):
    data = conv_model(16, np.eye(2, 3), metadata=b"\x08\x00\x00\x00M001\xff\xff\xff\x7f")
    md, problem = read_metadata(data)
    assert md is None and "unreadable TFLite metadata" in problem
    seg = Segmenter(str(write(tmp_path, "m.tflite", data)))
    assert seg.info()["metadata"] == {"problem": problem}


# -- the selfie model: CLI and daemon against DeepLab's person class ------------------------------

def test_selfie_through_the_cli_matches_deeplab_person(tmp_path, deeplab_person):
    proc, mask = segment_cli(tmp_path, SELFIE)
    assert set(np.unique(mask)) <= {0, 1}
    assert iou(mask == 1, deeplab_person) >= 0.80
    assert "selfie" in proc.stdout and "background" in proc.stdout  # names from its labels.txt


def test_selfie_info_says_what_was_read_and_from_where():
    info = Segmenter(str(SELFIE)).info()
    assert info["normalization"]["preset"] == "0..1" and info["normalization"]["source"] == "the model's metadata"
    assert info["output"]["kind"] == "binary" and info["output"]["scores"] == "probability"
    assert "LOGISTIC" in info["output"]["reason"]
    assert info["labels"] == ["background", "selfie"] and info["classes"] == 2
    assert info["metadata"]["files"] == ["labels.txt"]


@pytest.mark.broker
def test_selfie_through_the_daemon_matches_deeplab_person(mosquitto, tmp_path, deeplab_person):
    broker = mosquitto()
    folder = tmp_path / "frames"
    folder.mkdir()
    cv2.imwrite(str(folder / "grace.png"), cv2.imread(str(GRACE)))
    rec = Recorder("127.0.0.1", broker.port, f"{PREFIX}/#")
    config = write_config(tmp_path / "agent.toml", "pi-byom", broker.port,
                          {"kind": "folder", "uri": str(folder), "loop": True, "fps": 5.0},
                          model={"path": str(SELFIE), "labels": ""},
                          publish={"mask_resolution": "frame"})
    agent = start_agent(config)
    try:
        base = f"{PREFIX}/pi-byom"
        info = json.loads(rec.wait_for(f"{base}/info", timeout=30)[-1].payload)
        masks = rec.wait_for(f"{base}/mask", count=2, timeout=30)
        results = rec.wait_for(f"{base}/result", count=2, timeout=10)
    finally:
        out = stop_agent(agent)
        rec.close()
    assert agent.returncode == 0, out
    model = info["model"]
    assert model["labels"] == ["background", "selfie"] and model["classes"] == 2
    assert model["normalization"]["source"] == "the model's metadata" and model["output"]["kind"] == "binary"
    mask = decode_mask_png(bytes(masks[-1].payload))
    assert mask.shape == deeplab_person.shape
    assert iou(mask == 1, deeplab_person) >= 0.80
    assert set(json.loads(results[-1].payload)["classes"]) == {"background", "selfie"}


def test_normalisation_setting_that_contradicts_the_metadata_is_refused(tmp_path):
    proc = cli("segment", GRACE, "--model", SELFIE, "--out", tmp_path / "o", "--normalization", "raw")
    assert_refused(proc, "model.normalization", "contradicts the model's metadata")


# -- labels embedded in the model ------------------------------------------------------------------

def test_257_float_prints_class_names_from_its_metadata(tmp_path):
    proc, mask = segment_cli(tmp_path, FLOAT_257)
    line = proc.stdout.strip().splitlines()[-1]
    assert "person" in line and "background" in line, line
    assert " 15 " not in line and ": 0 " not in line


def test_info_lists_class_names_and_count_from_metadata():
    info = Segmenter(str(FLOAT_257)).info()
    assert info["classes"] == 21 and info["labels"][PERSON] == "person"
    assert info["normalization"]["source"] == "the model's metadata"


def test_inspect_says_normalisation_and_its_source():
    proc = cli("inspect", SELFIE)
    assert proc.returncode == 0, proc.stderr
    assert "normalisation  0..1 (mean 0 std 255) from the model's metadata" in proc.stdout
    assert "classes  2: background, selfie" in proc.stdout
    proc = cli("inspect", DM10)
    assert "normalisation  -1..1 (mean 127.5 std 127.5) from the input quantization" in proc.stdout
    proc = cli("inspect", CLASSIFIER_PATH := MODELS / "mobilenet_v2_1.0_224_quant.tflite", "--json")
    assert "not a segmentation model" in json.loads(proc.stdout)["segmentation"]["refused"], CLASSIFIER_PATH


# -- NCHW and NHWC score maps ---------------------------------------------------------------------

def test_3_class_nchw_at_input_size_is_refused_unless_told(tmp_path):
    """[1, 3, 64, 64] from a 64x64 input: 3 channels at the input's size may be an image."""
    model = write(tmp_path, "nchw3.tflite", conv_model(64, np.eye(3), nchw=True))
    frame = blocks(64, 8)
    image = write(tmp_path, "frame.png", cv2.imencode(".png", frame[..., ::-1])[1].tobytes())
    assert_refused(cli("segment", image, "--model", model, "--out", tmp_path / "o"), "model.output_layout")
    expected = np.argmax(frame, axis=-1).astype(np.uint8)
    _, mask = segment_cli(tmp_path, model, "--output-layout", "nchw", image=image)
    assert agreement(mask, expected) >= 0.99
    labels = write(tmp_path, "rgb.txt", b"red\ngreen\nblue\n")
    seg = Segmenter(str(model), labels=str(labels))  # 3 labels say: 3 classes
    assert seg.info()["output"]["layout"] == "nchw"
    assert agreement(seg.segment(frame).mask, expected) >= 0.99


def test_3_class_nchw_with_metadata_labels_is_read(tmp_path):
    data = conv_model(64, np.eye(3), nchw=True, metadata=build_metadata(label_file="labels.txt"),
                      files={"labels.txt": b"red\ngreen\nblue\n"})
    seg = Segmenter(str(write(tmp_path, "md.tflite", data)))
    frame = blocks(64, 8, seed=1)
    assert seg.labels == ["red", "green", "blue"] and seg.info()["output"]["layout"] == "nchw"
    assert agreement(seg.segment(frame).mask, np.argmax(frame, -1).astype(np.uint8)) >= 0.99


def test_2_class_nchw_at_256(tmp_path):
    model = write(tmp_path, "nchw2.tflite", conv_model(256, np.array([[1, 0, 0], [0, 1, 0]]), nchw=True))
    seg = Segmenter(str(model))
    assert seg.info()["output"]["layout"] == "nchw" and seg.info()["output"]["classes"] == 2
    frame = blocks(256, 16, seed=2)
    expected = (frame[..., 1] > frame[..., 0]).astype(np.uint8)
    assert agreement(seg.segment(frame).mask, expected) >= 0.99
    # the same scores as NHWC ([1, 256, 256, 2]) give the same mask
    nhwc = Segmenter(str(write(tmp_path, "nhwc2.tflite", conv_model(256, np.array([[1, 0, 0], [0, 1, 0]])))))
    assert nhwc.info()["output"]["layout"] == "nhwc"
    assert agreement(nhwc.segment(frame).mask, expected) >= 0.99


def test_ambiguous_layout_is_refused_naming_the_setting(tmp_path):
    """[1, 64, 64, 64] from a 64x64 input: the class axis could be either."""
    weights = np.random.default_rng(3).normal(size=(64, 3))
    model = write(tmp_path, "square.tflite", conv_model(64, weights))
    with pytest.raises(ModelError, match="ambiguous layout.*model.output_layout") as info:
        Segmenter(str(model))
    assert "\n" not in str(info.value)
    frame = blocks(64, 8, seed=4)
    seg = Segmenter(str(model), options=ModelOptions(output_layout="nhwc"))
    real = frame.astype(np.float64) / 127.5 - 1
    expected = np.argmax(real @ weights.T, axis=-1).astype(np.uint8)
    assert agreement(seg.segment(frame).mask, expected) >= 0.99


def test_output_chosen_by_name_among_several(tmp_path):
    model = write(tmp_path, "two.tflite", conv_model(64, np.array([[1, 0, 0], [0, 1, 0]]), both=True))
    frame = blocks(64, 8, seed=5)
    expected = (frame[..., 1] > frame[..., 0]).astype(np.uint8)
    # Two outputs that could each be the segmentation: never a guess, one line naming both and model.output
    with pytest.raises(ModelError, match=r"2 outputs could be the segmentation \('scores' \[1, 64, 64, 2\], "
                                         r"'scores_nchw' \[1, 2, 64, 64\]\).*set model.output"):
        Segmenter(str(model))
    first = Segmenter(str(model), options=ModelOptions(output="scores"))
    assert first.info()["output"]["name"] == "scores"
    chosen = Segmenter(str(model), options=ModelOptions(output="scores_nchw"))
    assert chosen.info()["output"] == {**chosen.info()["output"], "name": "scores_nchw", "layout": "nchw"}
    assert agreement(chosen.segment(frame).mask, expected) >= 0.99
    assert agreement(first.segment(frame).mask, expected) >= 0.99
    with pytest.raises(ModelError, match="model.output 'nope' names no output"):
        Segmenter(str(model), options=ModelOptions(output="nope"))


# -- single-channel maps ----------------------------------------------------------------------------

def test_single_channel_logits_need_to_be_told_apart_from_probabilities(tmp_path):
    model = write(tmp_path, "logit.tflite", conv_model(64, np.array([[1.0, -1.0, 0.0]])))
    image = write(tmp_path, "f.png", cv2.imencode(".png", blocks(64, 8, seed=6)[..., ::-1])[1].tobytes())
    assert_refused(cli("segment", image, "--model", model, "--out", tmp_path / "o"), "model.output_scores")
    frame = blocks(64, 8, seed=6)
    seg = Segmenter(str(model), options=ModelOptions(output_scores="logit"))
    expected = (frame[..., 0].astype(int) > frame[..., 1]).astype(np.uint8)  # logit > 0 <=> p > 0.5
    assert agreement(seg.segment(frame).mask, expected) >= 0.99
    assert seg.labels == ["background", "foreground"]


def test_a_21_class_label_file_on_a_binary_model_is_refused(tmp_path):
    assert_refused(cli("segment", GRACE, "--model", SELFIE, "--labels", LABELS, "--out", tmp_path / "o"),
                   "21 labels for a background/foreground output", "model.labels")
    person = write(tmp_path, "person.txt", b"person\n")
    assert Segmenter(str(SELFIE), labels=str(person)).labels == ["background", "person"]


def test_threshold_outside_0_1_is_refused(tmp_path):
    assert_refused(cli("segment", GRACE, "--model", SELFIE, "--out", tmp_path / "o", "--threshold", "1.5"),
                   "model.threshold 1.5 is not a probability")


def test_sigmoid_output_is_a_probability_map_with_a_threshold(tmp_path):
    model = write(tmp_path, "sig.tflite", conv_model(64, np.array([[2.0, -2.0, 0.0]]), logistic=True))
    frame = blocks(64, 8, seed=7)
    real = frame.astype(np.float64) / 127.5 - 1
    p = 1 / (1 + np.exp(-(2 * real[..., 0] - 2 * real[..., 1])))
    for threshold in (0.5, 0.9):
        seg = Segmenter(str(model), options=ModelOptions(threshold=threshold))
        assert seg.info()["output"]["scores"] == "probability"
        assert agreement(seg.segment(frame).mask, (p > threshold).astype(np.uint8)) >= 0.99


# -- input normalisation ----------------------------------------------------------------------------

def test_raw_pixel_int8_model_gets_raw_pixels(tmp_path):
    """Input int8 scale 1 zero point -128: real = pixel; the quantization range says so."""
    model = write(tmp_path, "raw.tflite", conv_model(32, np.array([[1, 0, 0], [0, 1, 0]]), input_dtype=np.int8,
                                                       input_scale=1.0, input_zero_point=-128))
    seg = Segmenter(str(model))
    assert seg.info()["normalization"]["preset"] == "raw"
    assert seg.info()["normalization"]["source"].startswith("the input quantization")
    frame = np.random.default_rng(8).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    result = seg.segment(frame)
    it = seg.model.loaded.interpreter
    tensor = it.get_tensor(it.get_input_details()[0]["index"])[0]
    np.testing.assert_array_equal(tensor.astype(np.int16), frame.astype(np.int16) - 128)
    assert len(np.unique(tensor)) > 200  # not just -128/-127
    assert agreement(result.mask, (frame[..., 1] > frame[..., 0]).astype(np.uint8)) >= 0.99


def test_normalisation_settings_reach_the_input_tensor(tmp_path):
    model = write(tmp_path, "f.tflite", conv_model(16, np.array([[1, 0, 0], [0, 1, 0]])))
    frame = np.random.default_rng(9).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    cases = {ModelOptions(): frame / 127.5 - 1,
             ModelOptions(normalization="0..1"): frame / 255.0,
             ModelOptions(input_mean="123.675,116.28,103.53", input_std="58.395,57.12,57.375"):
                 (frame - np.array([123.675, 116.28, 103.53])) / np.array([58.395, 57.12, 57.375])}
    for options, expected in cases.items():
        seg = Segmenter(str(model), options=options)
        seg.model.set_frame(frame)
        it = seg.model.loaded.interpreter
        np.testing.assert_allclose(it.get_tensor(it.get_input_details()[0]["index"])[0], expected, atol=1e-5)
    with pytest.raises(ModelError, match="model.input_mean and model.input_std go together"):
        Segmenter(str(model), options=ModelOptions(input_mean="1"))


def test_per_channel_normalisation_of_a_quantized_input(tmp_path):
    """uint8 input (scale 1/64, zero point 128: real -2..1.98) with ImageNet mean/std: a 3-channel LUT."""
    model = write(tmp_path, "u8.tflite", conv_model(16, np.eye(2, 3), input_dtype=np.uint8,
                                                      input_scale=1 / 64, input_zero_point=128))
    mean, std = np.array([123.675, 116.28, 103.53]), np.array([58.395, 57.12, 57.375])
    seg = Segmenter(str(model), options=ModelOptions(input_mean="123.675,116.28,103.53",
                                                      input_std="58.395,57.12,57.375"))
    frame = np.random.default_rng(10).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    seg.model.set_frame(frame)
    it = seg.model.loaded.interpreter
    expected = np.clip(np.round((frame - mean) / std * 64 + 128), 0, 255)
    np.testing.assert_array_equal(it.get_tensor(it.get_input_details()[0]["index"])[0], expected)


def test_unknown_input_quantization_range_is_refused(tmp_path):
    model = write(tmp_path, "q.tflite", conv_model(16, np.eye(2, 3), input_dtype=np.int8, input_scale=0.02,
                                                     input_zero_point=0))  # covers -2.56..2.54
    with pytest.raises(ModelError, match="input quantization covers .* model.normalization"):
        Segmenter(str(model))
    assert Segmenter(str(model), options=ModelOptions(normalization="-1..1")).info()["normalization"]["preset"] == "-1..1"


def test_calibrated_input_quantization_picks_the_range_it_lies_in(tmp_path):
    """Post-training quantization calibrates the input on real data (our host ptq with two VOC
    images: -0.9635..0.8169): inside -1..1 and filling most of it is -1..1, never raw or 0..1."""
    for scale, zero_point, expected in ((0.0069819302298128605, 138, "-1..1"),  # -0.96..0.82
                                        (0.0036, 6, "0..1")):  # -0.02..0.90
        model = write(tmp_path, f"cal{expected}.tflite",
                      conv_model(16, np.eye(2, 3), input_dtype=np.uint8, input_scale=scale,
                                 input_zero_point=zero_point))
        info = Segmenter(str(model)).info()["normalization"]
        assert info["preset"] == expected and "input quantization" in info["source"], info


# -- not segmenters -------------------------------------------------------------------------------

def test_image_to_image_models_are_refused(tmp_path):
    for name, data, words in (("upscale.tflite", upscale_model(32), ("larger than its input", "model.output_layout")),
                              ("same.tflite", conv_model(32, np.eye(3)), ("is an image", "model.output_layout"))):
        model = write(tmp_path, name, data)
        assert_refused(cli("segment", GRACE, "--model", model, "--out", tmp_path / "o"), "not a segmentation model",
                       *words)
    assert not (tmp_path / "o").exists()


def test_edgetpu_twin_strips_only_the_trailing_suffix(tmp_path):
    assert cpu_twin_name("x_mobilenet_edgetpu_y_edgetpu.tflite") == "x_mobilenet_edgetpu_y.tflite"
    assert cpu_twin_name("/m/model_edgetpu.tflite") == "model.tflite"
    assert cpu_twin_name("edgetpu_model.tflite") == "edgetpu_model.tflite"
    odd = tmp_path / "x_mobilenet_edgetpu_y_edgetpu.tflite"
    odd.symlink_to(DM05_EDGETPU)
    line = assert_refused(cli("segment", GRACE, "--model", odd, "--out", tmp_path / "o"), "compiled for the Edge TPU")
    assert "(x_mobilenet_edgetpu_y.tflite)" in line


# -- the host evaluate path uses the same Segmenter ------------------------------------------------

def test_host_evaluate_reads_the_models_metadata_and_refuses_binary_models():
    from tests.data import VOC
    from tools.host.evaluate import evaluate
    from edge_agent.errors import ConfigError

    from tools.host import metrics

    report = evaluate([FLOAT_257], VOC)  # normalisation from its metadata, as on the device
    assert metrics.summarize(report.results[0].conf)["pixel_acc"] > 0.95  # measured 0.971 (7 VOC pairs)
    with pytest.raises(ConfigError, match="background/foreground model"):
        evaluate([SELFIE], VOC)


# -- several plausible outputs, and hints that fit the model ---------------------------------------

def test_several_plausible_outputs_are_never_guessed(tmp_path):
    """MediaPipe's pose_landmark_full has a [1,256,256,1] segmentation next to [1,64,64,39]
    heatmaps and no metadata: it used to be read as 39 "classes" with exit 0."""
    from tests.tflite_builder import pose_like_model

    model = write(tmp_path, "pose.tflite", pose_like_model(16))
    image = write(tmp_path, "f.png", cv2.imencode(".png", blocks(16, 4, seed=3)[..., ::-1])[1].tobytes())
    proc = cli("segment", image, "--model", model, "--out", tmp_path / "o")
    assert_refused(proc, "2 outputs could be the segmentation", "'Identity_2' [1, 16, 16, 1]",
                   "'Identity_3' [1, 4, 4, 39]", "model.output")
    assert not (tmp_path / "o").exists()
    inspected = cli("inspect", model)
    assert inspected.returncode == 0 and "model.output" in inspected.stdout, inspected.stdout
    # Told which: the segmentation map, read as a probability map when the user says so.
    seg = Segmenter(str(model), options=ModelOptions(output="Identity_2", output_scores="logit"))
    assert seg.info()["output"]["name"] == "Identity_2" and seg.labels == ["background", "foreground"]
    heat = Segmenter(str(model), options=ModelOptions(output="Identity_3"))
    assert heat.info()["output"]["classes"] == 39
    assert "4x4" in heat.info()["output"]["reason"] and "16x16" in heat.info()["output"]["reason"]


def test_a_detector_is_not_told_to_set_a_layout(tmp_path):
    from tests.tflite_builder import detector_like_model

    model = write(tmp_path, "detector.tflite", detector_like_model(16, 896, 16))
    image = write(tmp_path, "f.png", cv2.imencode(".png", blocks(16, 4, seed=3)[..., ::-1])[1].tobytes())
    proc = cli("segment", image, "--model", model, "--out", tmp_path / "o")
    assert_refused(proc, "not a segmentation model", "[1, 896, 16] is no H x W map of the 16x16 input")
    assert "output_layout" not in proc.stderr
