"""Paths of the real models/images in ../shared/test_data used by the host-tool tests."""

from __future__ import annotations

from pathlib import Path

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
