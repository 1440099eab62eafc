"""Shared fixtures for the host-tool tests: real models/images from ../shared/test_data."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TEST_DATA = (REPO / ".." / "shared" / "test_data").resolve()
MODELS = TEST_DATA / "models"
IMAGES = TEST_DATA / "images"
VOC = TEST_DATA / "voc"
DM05_QUANT = MODELS / "deeplabv3_mnv2_dm05_pascal_quant.tflite"
DM10_QUANT = MODELS / "deeplabv3_mnv2_pascal_quant.tflite"
DM05_FLOAT_257 = MODELS / "deeplabv3_mnv2_dm05_257_float.tflite"
DM05_FP16_513 = MODELS / "deeplabv3_mnv2_dm05_513_fp16.tflite"
LABELS = MODELS / "pascal_voc_segmentation_labels.txt"
BIRD = IMAGES / "bird_segmentation.bmp"
CALIB_COUNT = 4  # few calibration images keep CI fast; the CLI default is 100


@pytest.fixture(scope="session")
def dm05_rebuilt():
    """Coral's dm05 uint8 model rebuilt to float (logits head)."""
    from tools.host.rebuild import rebuild

    return rebuild(DM05_QUANT, argmax=False)


@pytest.fixture(scope="session")
def calib_images():
    """Calibration on the shared natural photos (not the VOC evaluation pairs)."""
    from tools.host.datasets import calibration_images

    return calibration_images(IMAGES, CALIB_COUNT)


@pytest.fixture(scope="session")
def dm05_ptq(dm05_rebuilt, calib_images, tmp_path_factory):
    """Our uint8 PTQ of the rebuilt dm05 float (ArgMax in the graph, like Coral's)."""
    from tools.host.ptq import PTQOptions, quantize_keras, write_tflite

    data = quantize_keras(dm05_rebuilt[0], PTQOptions(argmax=True), calib_images)
    return write_tflite(data, tmp_path_factory.mktemp("ptq") / "dm05_ptq_uint8.tflite")
