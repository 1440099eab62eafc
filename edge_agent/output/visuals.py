"""Masks for people: a coloured mask and an alpha overlay on the frame (RGB uint8) with a legend."""

from __future__ import annotations

from typing import List, Optional, Sequence

import cv2
import numpy as np

from edge_agent.inference.labels import pascal_colormap


def color_mask(mask: np.ndarray) -> np.ndarray:
    """HxW class ids -> HxWx3 RGB with the PASCAL colormap (class 0 is black)."""
    return pascal_colormap()[mask]


def present_classes(mask: np.ndarray) -> List[int]:
    """Class ids present in a mask, most pixels first (bincount: no sort of the pixels)."""
    counts = np.bincount(mask.ravel(), minlength=1)
    ids = np.flatnonzero(counts)
    return [int(i) for i in ids[np.argsort(-counts[ids], kind="stable")]]


def overlay(frame: np.ndarray, mask: np.ndarray, alpha: float = 0.5,
            labels: Optional[Sequence[str]] = None, legend: bool = True) -> np.ndarray:
    """Blend the coloured mask over the frame where a class other than background is present.

    With ``legend`` the classes present are listed top-left with their colours (names from
    ``labels``, else the class ids), so a picture says what its colours mean.
    """
    if frame.shape[:2] != mask.shape[:2]:
        raise ValueError(f"frame {frame.shape[:2]} and mask {mask.shape[:2]} differ in size")
    colors = color_mask(mask)
    blended = cv2.addWeighted(frame, 1.0 - alpha, colors, alpha, 0.0)
    out = frame.copy()
    fg = mask != 0
    out[fg] = blended[fg]
    if legend:
        draw_legend(out, present_classes(mask), labels)
    return out


def draw_legend(image: np.ndarray, class_ids: Sequence[int], labels: Optional[Sequence[str]] = None) -> None:
    """Draw colour swatches and class names top-left, in place; sized to the image's height."""
    if not class_ids:
        return
    h, w = image.shape[:2]
    scale = max(0.35, min(1.2, h / 720.0 * 0.6))
    thick = max(1, int(round(scale * 2)))
    (_, text_h), base = cv2.getTextSize("Ag", cv2.FONT_HERSHEY_SIMPLEX, scale, thick)
    line = text_h + base + 6
    pad, swatch = 4, text_h + base
    names = [labels[i] if labels is not None and i < len(labels) else str(i) for i in class_ids]
    width = pad * 3 + swatch + max(cv2.getTextSize(n, cv2.FONT_HERSHEY_SIMPLEX, scale, thick)[0][0] for n in names)
    height = pad * 2 + line * len(names)
    box = image[:min(h, height), :min(w, width)]
    box[:] = (box.astype(np.uint16) // 3).astype(np.uint8)  # darken: the text stays readable
    cmap = pascal_colormap()
    for row, (cid, name) in enumerate(zip(class_ids, names)):
        y = pad + row * line
        color = tuple(int(c) for c in cmap[cid])
        cv2.rectangle(image, (pad, y + 2), (pad + swatch, y + 2 + swatch), color, -1)
        cv2.rectangle(image, (pad, y + 2), (pad + swatch, y + 2 + swatch), (255, 255, 255), 1)
        cv2.putText(image, name, (pad * 2 + swatch, y + 2 + text_h), cv2.FONT_HERSHEY_SIMPLEX, scale,
                    (255, 255, 255), thick, cv2.LINE_AA)
