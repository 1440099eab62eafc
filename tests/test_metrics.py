"""The host tools' segmentation metrics: pure numpy, so they run in the device suite (no TensorFlow)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edge_agent.inference import postprocess
from tools.host import metrics

REPO = Path(__file__).resolve().parents[1]


def test_metrics_import_neither_tensorflow_nor_keras():
    code = ("import sys, tools.host.metrics; "
            "print(sorted(m for m in ('tensorflow', 'tf_keras', 'keras') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_confusion_ignores_void_and_counts_rows_as_truth():
    truth = np.array([[0, 1], [1, 255]], np.uint8)
    pred = np.array([[0, 1], [0, 3]], np.uint8)
    conf = metrics.confusion(pred, truth, 4)
    assert conf.sum() == 3 and conf[0, 0] == 1 and conf[1, 1] == 1 and conf[1, 0] == 1


def test_miou_averages_only_classes_present_in_truth():
    truth = np.array([0, 0, 1, 1])
    pred = np.array([0, 0, 1, 2])  # class 2 predicted but absent: not in the mean
    conf = metrics.confusion(pred, truth, 3)
    ious = metrics.iou_per_class(conf)
    assert ious[0] == 1.0 and ious[1] == 0.5 and ious[2] == 0.0
    assert metrics.mean_iou(conf) == pytest.approx(0.75)
    assert metrics.pixel_accuracy(conf) == pytest.approx(0.75)


def test_agreement_is_the_agents_own():
    """One implementation: host evaluations score masks exactly as the device's golden checks."""
    assert metrics.agreement is postprocess.agreement


def test_agreement_is_libcoral_formula():
    a = np.zeros((2, 2), np.uint8)
    b = a.copy()
    b[0, 0] = 1
    assert metrics.agreement(a, a) == 1.0
    assert metrics.agreement(a, b) == pytest.approx(3 / (8 - 3))
    with pytest.raises(ValueError):
        metrics.agreement(a, np.zeros((3, 3)))
