"""Segmentation metrics on class-id maps: confusion matrix, IoU, pixel accuracy, agreement.

Pure numpy (no TensorFlow: the device test suite runs these). ``ignore_index`` pixels (VOC's 255
"void" borders) count for nothing. ``agreement`` is the agent's own (libcoral's formula), so host
evaluations and the device's golden checks score masks identically.
"""

from __future__ import annotations

from typing import Dict, List

import numpy as np

from edge_agent.inference.postprocess import agreement  # noqa: F401  (re-exported)

IGNORE_INDEX = 255


def confusion(pred: np.ndarray, truth: np.ndarray, num_classes: int,
              ignore_index: int = IGNORE_INDEX) -> np.ndarray:
    """``num_classes x num_classes`` counts, rows = truth, columns = prediction."""
    if pred.shape != truth.shape:
        raise ValueError(f"prediction {pred.shape} and label {truth.shape} differ in shape")
    keep = truth != ignore_index
    t = truth[keep].astype(np.int64)
    p = np.clip(pred[keep].astype(np.int64), 0, num_classes - 1)
    return np.bincount(t * num_classes + p, minlength=num_classes ** 2
                       ).reshape(num_classes, num_classes)


def iou_per_class(conf: np.ndarray) -> np.ndarray:
    """IoU per class; NaN for classes absent from both truth and prediction."""
    tp = np.diag(conf).astype(np.float64)
    union = conf.sum(0) + conf.sum(1) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, tp / union, np.nan)


def present_classes(conf: np.ndarray) -> List[int]:
    """Classes that occur in the ground truth (the ones mIoU is averaged over)."""
    return [int(c) for c in np.flatnonzero(conf.sum(1) > 0)]


def mean_iou(conf: np.ndarray) -> float:
    ious = iou_per_class(conf)
    present = present_classes(conf)
    return float(np.mean(ious[present])) if present else float("nan")


def pixel_accuracy(conf: np.ndarray) -> float:
    total = conf.sum()
    return float(np.trace(conf) / total) if total else float("nan")


def summarize(conf: np.ndarray) -> Dict[str, float]:
    return {"miou": mean_iou(conf), "pixel_acc": pixel_accuracy(conf)}
