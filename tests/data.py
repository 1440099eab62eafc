"""Paths to the real test data in ../shared/test_data (never copied into the project)."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARED = (REPO / ".." / "shared" / "test_data").resolve()
MODELS = SHARED / "models"
IMAGES = SHARED / "images"
VOC = SHARED / "voc"

DM10 = MODELS / "deeplabv3_mnv2_pascal_quant.tflite"
DM05 = MODELS / "deeplabv3_mnv2_dm05_pascal_quant.tflite"
DM10_EDGETPU = MODELS / "deeplabv3_mnv2_pascal_quant_edgetpu.tflite"
DM05_EDGETPU = MODELS / "deeplabv3_mnv2_dm05_pascal_quant_edgetpu.tflite"
FLOAT_257 = MODELS / "deeplabv3_mnv2_dm05_257_float.tflite"
FP16_513 = MODELS / "deeplabv3_mnv2_dm05_513_fp16.tflite"
CLASSIFIER = MODELS / "mobilenet_v2_1.0_224_quant.tflite"
LABELS = MODELS / "pascal_voc_segmentation_labels.txt"
INVOKE_ERROR = SHARED / "invalid_models" / "model_invoking_error.tflite"
BIRD = IMAGES / "bird_segmentation.bmp"
BIRD_MASK = IMAGES / "bird_segmentation_mask.bmp"


def rgb(path: Path) -> np.ndarray:
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    assert image is not None, f"cannot read {path}"
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def bird_513() -> np.ndarray:
    """The golden image resized to 513x513, as libcoral's reference test does."""
    return cv2.resize(rgb(BIRD), (513, 513))


def bird_mask() -> np.ndarray:
    mask = cv2.imread(str(BIRD_MASK), cv2.IMREAD_GRAYSCALE)
    assert mask is not None
    return mask
