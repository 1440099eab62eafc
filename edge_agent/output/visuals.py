"""Masks for people: a coloured mask and an alpha overlay on the frame (RGB uint8)."""

from __future__ import annotations

import cv2
import numpy as np

from edge_agent.inference.labels import pascal_colormap


def color_mask(mask: np.ndarray) -> np.ndarray:
    """HxW class ids -> HxWx3 RGB with the PASCAL colormap (class 0 is black)."""
    return pascal_colormap()[mask]


def overlay(frame: np.ndarray, mask: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Blend the coloured mask over the frame where a class other than background is present."""
    if frame.shape[:2] != mask.shape[:2]:
        raise ValueError(f"frame {frame.shape[:2]} and mask {mask.shape[:2]} differ in size")
    colors = color_mask(mask)
    blended = cv2.addWeighted(frame, 1.0 - alpha, colors, alpha, 0.0)
    out = frame.copy()
    fg = mask != 0
    out[fg] = blended[fg]
    return out
