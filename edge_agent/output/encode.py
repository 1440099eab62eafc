"""Encode what the agent publishes: mask PNG, result JSON, overlay JPEG.

Pure functions (rate limits: ``output/throttle.py``); the MQTT connection itself lives in ``comms/mqtt.py``.
"""

from __future__ import annotations

import json
from typing import Any, Dict

import cv2
import numpy as np

from edge_agent.errors import EdgeAgentError


# Class-id masks are long runs of a few values: no PNG row filter + zlib's RLE strategy is ~4x
# faster than OpenCV's default (all filters, default strategy) and ~2x smaller at every level
# 1-9 (513x289 mask: 0.17 ms / 1.6 kB vs 0.70 ms / 2.9 kB; 1080p: 2.9 ms / 7.8 kB vs 15 ms /
# 15 kB; measured by bench/perf.py). Older OpenCV (< 4.10) has no filter flag: strategy only.
_PNG_TUNING = tuple(
    value
    for name, flag in (("IMWRITE_PNG_FILTER", "IMWRITE_PNG_FILTER_NONE"),
                       ("IMWRITE_PNG_STRATEGY", "IMWRITE_PNG_STRATEGY_RLE"))
    if hasattr(cv2, name) and hasattr(cv2, flag)
    for value in (getattr(cv2, name), getattr(cv2, flag))
)


def png_params(compression: int = 1, tuned: bool = True) -> list:
    """cv2.imencode parameters for a mask PNG (``tuned=False``: OpenCV's defaults, for benchmarks)."""
    params = [cv2.IMWRITE_PNG_COMPRESSION, int(compression)]
    return params + list(_PNG_TUNING) if tuned else params


def encode_mask_png(mask: np.ndarray, compression: int = 1) -> bytes:
    """8-bit grayscale PNG of class ids, decodable by any PNG reader (lossless)."""
    ok, buf = cv2.imencode(".png", mask, png_params(compression))
    if not ok:  # pragma: no cover - cv2 only fails on invalid input
        raise EdgeAgentError("PNG encoding failed")
    return buf.tobytes()


def decode_mask_png(data: bytes) -> np.ndarray:
    mask = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if mask is None:
        raise ValueError("not a PNG mask")
    return mask


def encode_jpeg(rgb: np.ndarray, quality: int = 80) -> bytes:
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR),
                           [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:  # pragma: no cover
        raise EdgeAgentError("JPEG encoding failed")
    return buf.tobytes()


def to_json(doc: Dict[str, Any]) -> bytes:
    return json.dumps(doc, separators=(",", ":"), allow_nan=False).encode()

