"""Checking a received model before it may run: one invoke on a sample frame (the request's image,
or a synthetic one) within a deadline, optionally compared with a golden mask.
"""

from __future__ import annotations

import threading
import time
from typing import Any, Callable, Dict, Optional

import cv2
import numpy as np

from edge_agent.inference.postprocess import agreement
from edge_agent.inference.segmenter import Segmenter
from edge_agent.output.encode import PNG_SIGNATURE, decode_mask_png, png_palette
from edge_agent.remote.deploy_request import Cancelled, DeployFailed
from edge_agent.sources.images import image_size_problem


def decode_image(data: bytes, what: str, flags: int = cv2.IMREAD_COLOR) -> np.ndarray:
    problem = image_size_problem(data, f"the {what}")  # the header first: never a huge decode
    if problem is not None:
        raise DeployFailed(problem)
    image = cv2.imdecode(np.frombuffer(data, np.uint8), flags)
    if image is None:
        raise DeployFailed(f"the {what} is not a decodable image")
    return image


def decode_golden_mask(data: bytes) -> np.ndarray:
    """Class ids of a golden mask: a palette PNG (what the agent and ``segment`` write: the
    palette index is the id; read as grey it would be the colours' luminance) or a grey image."""
    problem = image_size_problem(data, "the golden mask")
    if problem is not None:
        raise DeployFailed(problem)
    if data[:8] == PNG_SIGNATURE:
        try:
            if png_palette(data) is not None:
                return decode_mask_png(data)
        except ValueError as exc:
            raise DeployFailed(f"the golden mask is not a usable palette PNG: {exc}") from None
    return decode_image(data, "golden mask", cv2.IMREAD_GRAYSCALE)


def synthetic_frame(height: int, width: int) -> np.ndarray:
    """A deterministic, textured RGB frame: enough to exercise every op of the graph."""
    y, x = np.mgrid[0:height, 0:width]
    r = (x * 255 // max(1, width - 1)).astype(np.uint8)
    g = (y * 255 // max(1, height - 1)).astype(np.uint8)
    b = (((x // 32) + (y // 32)) % 2 * 200).astype(np.uint8)
    return np.dstack([r, g, b])


def sanity_check(segmenter: Segmenter, sample: Optional[bytes], golden: Optional[bytes],
                 min_agreement: float) -> Dict[str, Any]:
    """One real invoke on a frame; the mask must be well formed (and match the golden one)."""
    if sample is not None:
        frame = cv2.cvtColor(decode_image(sample, "sample image"), cv2.COLOR_BGR2RGB)
    else:
        frame = synthetic_frame(*segmenter.model.input_size)
    t0 = time.monotonic()
    result = segmenter.segment(frame)
    elapsed_ms = (time.monotonic() - t0) * 1e3
    mask = result.mask
    if mask.shape != frame.shape[:2] or mask.dtype != np.uint8:
        raise DeployFailed(f"sanity invoke: mask {mask.shape} {mask.dtype} for a {frame.shape[:2]} frame")
    labels = segmenter.labels
    classes = segmenter.model.output.classes
    if labels and classes and len(labels) != classes:
        raise DeployFailed(f"{len(labels)} labels for a model with {classes} classes")
    top = int(mask.max())
    if labels and top >= len(labels):
        raise DeployFailed(f"sanity invoke: class id {top} but only {len(labels)} labels")
    report: Dict[str, Any] = {"sanity_ms": round(elapsed_ms, 1)}
    if golden is not None:
        expected = decode_golden_mask(golden)
        if expected.shape != mask.shape:
            raise DeployFailed(f"golden mask is {expected.shape[1]}x{expected.shape[0]}, "
                               f"the sample {mask.shape[1]}x{mask.shape[0]}")
        score = agreement(mask, expected)
        report["agreement"] = round(score, 4)
        if score < min_agreement:
            raise DeployFailed(f"golden mask agreement {score:.3f} < {min_agreement:g}")
    return report


def run_with_timeout(fn: Callable[[], Any], timeout_s: float, what: str,
                     cancelled: Callable[[], Optional[str]] = lambda: None) -> Any:
    """Run ``fn`` on a daemon thread; a hung interpreter must not hang the deployment forever,
    nor an agent that stops (``cancelled()`` returns why)."""
    box: Dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:  # re-raised on the caller's thread
            box["error"] = exc

    thread = threading.Thread(target=target, name="deploy-check", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout_s
    while thread.is_alive() and time.monotonic() < deadline:
        stop = cancelled()
        if stop is not None:
            raise Cancelled(f"{stop} during {what}")
        thread.join(min(0.1, max(0.0, deadline - time.monotonic())))
    if thread.is_alive():
        raise DeployFailed(f"{what} did not finish within {timeout_s:g} s")
    if "error" in box:
        raise box["error"]
    return box.get("value")
