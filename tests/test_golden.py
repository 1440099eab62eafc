"""Golden oracle (libcoral's segmentation test): the real DeepLab models reproduce the bird mask."""

from __future__ import annotations

import subprocess
import sys

import cv2
import numpy as np
import pytest

from edge_agent.inference.postprocess import agreement
from edge_agent.inference.segmenter import Segmenter
from edge_agent.output.encode import decode_mask_png
from tests.data import DM05, DM10, FLOAT_257, FP16_513, LABELS, bird_513, bird_mask, rgb, BIRD

GOLDEN_THRESHOLD = 0.90


@pytest.fixture(scope="module")
def dm05():
    return Segmenter(str(DM05), labels=str(LABELS))


@pytest.mark.parametrize("model", [DM10, DM05], ids=["dm10", "dm05"])
def test_golden_bird_through_api(model):
    segmenter = Segmenter(str(model), labels=str(LABELS))
    result = segmenter.segment(bird_513())
    assert result.mask.shape == (513, 513)
    assert result.mask.dtype == np.uint8
    score = agreement(result.mask, bird_mask())
    print(f"{model.name}: golden agreement {score:.4f} ({segmenter.describe_runtime()})")
    assert score > GOLDEN_THRESHOLD
    fractions = result.class_fractions()
    assert list(fractions)[:2] == ["background", "bird"]
    assert abs(sum(fractions.values()) - 1.0) < 1e-6


@pytest.mark.parametrize("model", [DM10, DM05], ids=["dm10", "dm05"])
def test_golden_bird_through_cli(model, tmp_path):
    image = tmp_path / "bird513.png"
    cv2.imwrite(str(image), cv2.cvtColor(bird_513(), cv2.COLOR_RGB2BGR))
    proc = subprocess.run(
        [sys.executable, "-m", "edge_agent", "segment", str(image), "--model", str(model),
         "--labels", str(LABELS), "--out", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    line = proc.stdout.strip().splitlines()[-1]
    assert line.startswith("bird513.png 513x513:") and "bird" in line and "inference" in line
    mask = decode_mask_png((tmp_path / "out" / "bird513_mask.png").read_bytes())  # palette PNG: ids
    assert mask.shape == (513, 513) and mask.dtype == np.uint8
    assert agreement(mask, bird_mask()) > GOLDEN_THRESHOLD
    overlay = cv2.imread(str(tmp_path / "out" / "bird513_overlay.png"), cv2.IMREAD_COLOR)
    assert overlay.shape == (513, 513, 3)


@pytest.mark.parametrize("model", [FLOAT_257, FP16_513], ids=["float257", "fp16_513"])
def test_float_models_run_through_the_same_api(model, dm05):
    """Float inputs (normalised to [-1, 1]) and float logits outputs (argmax here)."""
    frame = rgb(BIRD)
    reference = dm05.segment(frame).mask
    segmenter = Segmenter(str(model), labels=str(LABELS))
    assert segmenter.model.output.kind == "logits"
    assert segmenter.info()["input_dtype"] == "float32"
    result = segmenter.segment(frame)
    assert result.mask.shape == frame.shape[:2]
    score = agreement(result.mask, reference)
    print(f"{model.name} vs dm05 uint8: {score:.4f}")
    assert score >= 0.90
