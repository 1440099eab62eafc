"""Frame -> model input: letterbox (keep aspect ratio, pad bottom/right) or stretch.

Pure functions on numpy arrays. The geometry of each resize is kept in a :class:`Geometry` so that
postprocessing can crop the padding off the label map and map it back to the frame exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import cv2
import numpy as np

LETTERBOX = "letterbox"
STRETCH = "stretch"
MODES = (LETTERBOX, STRETCH)


@dataclass(frozen=True)
class Geometry:
    """Where the frame landed in the model input: top-left ``scaled_h x scaled_w``, rest padding."""

    frame_h: int
    frame_w: int
    scaled_h: int
    scaled_w: int
    input_h: int
    input_w: int

    @property
    def resized(self) -> bool:
        return (self.scaled_h, self.scaled_w) != (self.frame_h, self.frame_w)

    @property
    def padded(self) -> bool:
        return (self.scaled_h, self.scaled_w) != (self.input_h, self.input_w)

    def valid_region(self, out_h: int, out_w: int) -> Tuple[int, int]:
        """Size of the un-padded region in a model output of ``out_h x out_w``.

        Outputs may be smaller than the input (output stride without upsampling): scale the
        region, rounding to the nearest pixel, never 0.
        """
        if (out_h, out_w) == (self.input_h, self.input_w):
            return self.scaled_h, self.scaled_w
        h = max(1, min(out_h, int(round(self.scaled_h * out_h / self.input_h))))
        w = max(1, min(out_w, int(round(self.scaled_w * out_w / self.input_w))))
        return h, w


def letterbox_geometry(frame_h: int, frame_w: int, input_h: int, input_w: int) -> Geometry:
    """Scale the frame so it fits in the input keeping its aspect ratio (longest side fills)."""
    if frame_h <= 0 or frame_w <= 0:
        raise ValueError(f"empty frame {frame_w}x{frame_h}")
    scale = min(input_h / frame_h, input_w / frame_w)
    scaled_h = max(1, min(input_h, int(round(frame_h * scale))))
    scaled_w = max(1, min(input_w, int(round(frame_w * scale))))
    return Geometry(frame_h, frame_w, scaled_h, scaled_w, input_h, input_w)


def stretch_geometry(frame_h: int, frame_w: int, input_h: int, input_w: int) -> Geometry:
    return Geometry(frame_h, frame_w, input_h, input_w, input_h, input_w)


def interpolation_for(src_hw: Tuple[int, int], dst_hw: Tuple[int, int]) -> int:
    """INTER_AREA when shrinking (no aliasing on camera frames), INTER_LINEAR when enlarging."""
    shrinking = dst_hw[0] * dst_hw[1] < src_hw[0] * src_hw[1]
    return cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR


def resize_into(frame: np.ndarray, canvas: np.ndarray, geometry: Geometry, pad_value) -> None:
    """Write the resized frame into the top-left of ``canvas`` and fill the rest with ``pad_value``.

    ``canvas`` is typically the interpreter's own input tensor (no extra copy). A frame already at
    the scaled size is copied, never resized.
    """
    sh, sw = geometry.scaled_h, geometry.scaled_w
    region = canvas[:sh, :sw]
    if not geometry.resized:
        np.copyto(region, frame, casting="unsafe")
    elif region.flags.c_contiguous and region.dtype == frame.dtype:
        cv2.resize(frame, (sw, sh), dst=region,
                   interpolation=interpolation_for(frame.shape[:2], (sh, sw)))
    else:
        resized = cv2.resize(frame, (sw, sh),
                             interpolation=interpolation_for(frame.shape[:2], (sh, sw)))
        np.copyto(region, resized, casting="unsafe")
    if sh < canvas.shape[0]:
        canvas[sh:, :] = pad_value
    if sw < canvas.shape[1]:
        canvas[:sh, sw:] = pad_value


def check_frame(frame: np.ndarray) -> None:
    if not isinstance(frame, np.ndarray) or frame.ndim != 3 or frame.shape[2] != 3:
        shape = getattr(frame, "shape", None)
        raise ValueError(f"expected an HxWx3 RGB frame, got shape {shape}")
    if frame.dtype != np.uint8:
        raise ValueError(f"expected a uint8 frame, got {frame.dtype}")


def letterbox(
    frame: np.ndarray,
    size: Tuple[int, int],
    pad_value: int = 128,
    out: Optional[np.ndarray] = None,
    mode: str = LETTERBOX,
) -> Tuple[np.ndarray, Geometry]:
    """Letterbox (or stretch) an RGB uint8 frame to ``size`` = (input_h, input_w).

    Pixels stay uint8 RGB; ``pad_value`` 128 is the pixel that normalises to 0 for the DeepLab
    convention ``real = pixel / 127.5 - 1`` within one quantization step (the Coral models' zero
    point). Returns the canvas (``out`` if given) and the geometry.
    """
    check_frame(frame)
    input_h, input_w = int(size[0]), int(size[1])
    geometry = make_geometry(frame.shape[0], frame.shape[1], input_h, input_w, mode)
    canvas = out if out is not None else np.empty((input_h, input_w, 3), np.uint8)
    resize_into(frame, canvas, geometry, pad_value)
    return canvas, geometry


def make_geometry(frame_h: int, frame_w: int, input_h: int, input_w: int, mode: str) -> Geometry:
    if mode == LETTERBOX:
        return letterbox_geometry(frame_h, frame_w, input_h, input_w)
    if mode == STRETCH:
        return stretch_geometry(frame_h, frame_w, input_h, input_w)
    raise ValueError(f"unknown preprocess mode '{mode}': choose {', '.join(MODES)}")
